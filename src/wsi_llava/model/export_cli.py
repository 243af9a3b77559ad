"""`wsi-llava export-tower CHECKPOINT --out tower.safetensors`: the command around
:func:`~wsi_llava.model.export.export_tower`; prints the stage-2 config lines that use the export."""

from __future__ import annotations

import argparse
import json
import os

from ..config import parse_overrides
from .export import export_tower
from .slide_encoder import SlideEncoderConfig


def stage2_snippet(path: str | os.PathLike, config: SlideEncoderConfig) -> str:
    """The stage-2 YAML lines that use an exported tower (``vision_config`` lists the non-default
    architecture fields; ``in_dim`` is set from the tile features)."""
    default = SlideEncoderConfig().architecture()
    changed = {k: v for k, v in config.architecture().items() if v != default[k] and k != "in_dim"}
    lines = ["vision_mode: wsi", f"vision_tower: {path}"]
    if changed:
        lines.append("vision_config: " + json.dumps(changed))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="stage-1 output or checkpoint-N folder, a WSI-LLaVA folder, or a weights file")
    parser.add_argument("--out", required=True, help="file to write: tower.safetensors (or .pth)")
    parser.add_argument("--vision-config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="SlideEncoderConfig fields when the checkpoint does not store them (e.g. num_heads=16)")


def main(args: argparse.Namespace) -> int:
    encoder = export_tower(args.checkpoint, args.out, **parse_overrides(args.vision_config))
    n = len(encoder.state_dict())
    c = encoder.config
    print(f"wrote {args.out}: {n} tensors, GigaPath key names (depth {c.depth}, width {c.embed_dim}, "
          f"tile features {c.in_dim}); checked with load_slide_encoder")
    print("use it in stage 2 with:\n" + stage2_snippet(args.out, c))
    return 0
