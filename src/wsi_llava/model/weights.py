"""Reading a weights file into a state dict, for every encoder that loads published weights.

safetensors, or a PyTorch pickle read with ``torch.load(weights_only=True)`` (a file that needs a
class to unpickle is refused, never run); a ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper is
unwrapped; every value must be a tensor. Errors name the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import MissingFileError

WRAPPERS = ("model", "state_dict")


def read_state_dict(source, what: str, error: type[Exception] = ValueError) -> tuple[dict[str, torch.Tensor], str]:
    """``source`` (a file path or a mapping) → ``(state dict, where)``; ``what`` names the weights in
    messages ("slide encoder", "tile encoder"); unreadable files raise ``error``."""
    if isinstance(source, Mapping):
        sd, where = source, "the given state dict"
    else:
        path = Path(os.fspath(source))
        where = str(path)
        if not path.is_file():
            raise MissingFileError(f"{what} weights not found: {path}; check the path")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                sd = load_file(str(path))
            else:
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named (a pickle needing a class is refused)
            first = str(e).splitlines()[0] if str(e) else ""
            raise error(f"{path}: cannot read {what} weights ({type(e).__name__}: {first}; pickles are read "
                        "with weights_only=True)") from e
    for wrapper in WRAPPERS:
        if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise error(f"{where}: not a state dict (a {type(sd).__name__})")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise error(f"{where}: not a state dict of tensors (non-tensor entries: {bad[:5]})")
    return dict(sd), where


def mismatch_report(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], where: str,
                    what: str) -> str | None:
    """Every missing key, unexpected key and shape mismatch of ``sd`` against a model's state dict
    ``own``, as one message (``where`` does not match ``what``: …); None when they fit exactly."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: weights {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    if not (missing or unexpected or shapes):
        return None

    def block(title: str, items: list[str]) -> str:
        if not items:
            return ""
        shown = "\n".join(f"    {k}" for k in items[:40])
        more = f"\n    ... and {len(items) - 40} more" if len(items) > 40 else ""
        return f"\n  {title} ({len(items)}):\n{shown}{more}"

    return (f"{where} does not match {what}:" + block("missing keys", missing) + block("unexpected keys", unexpected)
            + block("shape mismatches", shapes))
