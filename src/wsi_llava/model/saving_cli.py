"""`wsi-llava export-merged RUN OUT`: a trained model (parts + base-LM reference, or a full folder) as one
full folder, LoRA merged, that loads without the base LM (:func:`~wsi_llava.model.saving.export_merged`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MissingFileError
from .saving import export_merged


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a trained WSI-LLaVA folder (a stage-2/3 output_dir or a checkpoint-N)")
    parser.add_argument("out", help="new folder for the merged model (loads without the base LM)")


def main(args: argparse.Namespace) -> int:
    if not Path(args.run).is_dir():
        raise MissingFileError(f"{args.run} does not exist; give a stage-2/3 output_dir")
    out = export_merged(args.run, args.out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: the full model ({size / 1e6:.1f} MB), loads without the base LM")
    return 0
