"""`wsi-llava train CONFIG.yaml [key=value ...]`."""

from __future__ import annotations

import argparse
import logging

from ..config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config in the LLaMA-Factory dialect (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys (values as YAML)")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    if cfg.finetuning.stage == "contrastive":
        from .contrastive import run_contrastive

        out = run_contrastive(cfg)
    else:
        from .run import run_sft

        out = run_sft(cfg)
    print(f"saved to {out}")
    return 0
