"""Test helper: the ``wsi-llava`` CLI under ``torchrun`` with each rank's trainable weights written out.

Launched by the torchrun tests as ``python -m torch.distributed.run … -m ddp_probe DUMP_DIR train CONFIG``
with this folder on ``PYTHONPATH``. Every ``Trainer`` the run creates gets :class:`DumpTrainable`, which
writes ``DUMP_DIR/rank<R>_begin.safetensors`` (before the first step) and ``rank<R>_end.safetensors``
(after the last) with that process's trainable parameters, so a test can check that data-parallel
ranks stayed identical and that training moved them. Nothing here is used by the package itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import Trainer, TrainerCallback


class DumpTrainable(TrainerCallback):
    """Writes this rank's trainable parameters (names as ``model.named_parameters()`` gives them)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)

    def _dump(self, args, model, tag: str) -> None:
        from safetensors.torch import save_file

        weights = {n: p.detach().cpu().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(self.out_dir / f"rank{args.process_index}_{tag}.safetensors"))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._dump(args, model, "begin")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._dump(args, model, "end")


def install(out_dir: str | Path) -> None:
    """Give every ``Trainer`` created from now on in this process a :class:`DumpTrainable`."""
    original = Trainer.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(DumpTrainable(out_dir))

    Trainer.__init__ = __init__


def load_dumps(out_dir: str | Path, world_size: int) -> tuple[list[dict], list[dict]]:
    """``(begin, end)``: per rank, name → tensor, as :class:`DumpTrainable` wrote them."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    return ([load_file(out_dir / f"rank{r}_begin.safetensors") for r in range(world_size)],
            [load_file(out_dir / f"rank{r}_end.safetensors") for r in range(world_size)])


def main(argv: list[str]) -> int:
    install(argv[0])
    from wsi_llava.cli import main as cli

    return cli(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
