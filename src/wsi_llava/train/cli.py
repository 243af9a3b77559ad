"""`wsi-llava train CONFIG.yaml [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import ConfigError, TrainConfig, load_config
from ..errors import MissingFileError

#: Config keys naming an input file or folder → what to give instead when it does not exist.
INPUT_FILE_KEYS = {
    "vision_tower": "a slide-encoder weights file (slide_encoder.pth, tower.safetensors) or a saved model "
                    "folder, or remove the key for a randomly initialised encoder",
    "projector_path": "the projector.safetensors a stage-2 run wrote into its output_dir, or remove the key to "
                      "start from a new projector",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config in the LLaMA-Factory dialect (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys (values as YAML)")


def check_input_files(cfg: TrainConfig) -> None:
    """Fail before any model or data is loaded when a file a config key names does not exist
    (:class:`ConfigError` naming the config file, the key, the path and what to give instead)."""
    for key, hint in INPUT_FILE_KEYS.items():
        value = getattr(cfg.model, key)
        path = cfg.resolve(value)
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{cfg.source}: {key}: {path} does not exist; give {hint}")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    check_input_files(cfg)
    from .final import marker_stamp

    out_dir = cfg.resolve(cfg.training["output_dir"])
    stamp = marker_stamp(out_dir)
    try:
        if cfg.finetuning.stage == "contrastive":
            from .contrastive import run_contrastive

            out = run_contrastive(cfg)
        else:
            from .run import run_sft

            out = run_sft(cfg)
    except MissingFileError as e:  # a path from the config (llm_name_or_path, …): say which config
        raise ConfigError(f"{cfg.source}: {e}") from e
    if stamp is not None and marker_stamp(out_dir) == stamp:  # no final save happened: nothing was left to do
        print(f"already complete: {out} (nothing to do)")
    else:
        print(f"saved to {out}")
    return 0
