"""One rule for numeric precision: bf16/fp16 where this machine runs them fast, else float32.

``bf16: true`` (or ``--precision bf16``) means "use bfloat16 where it is fast". On a GPU that is
bf16 where the device supports it. On a CPU it depends on the processor: with native bf16
instructions (AVX-512 BF16, AMX) a bf16 matmul is as fast as float32 or faster; without them (AVX2
laptops, many AMD EPYC servers) PyTorch runs it on a scalar fallback, many times slower than float32
(README, "Precision", gives a measured ratio). So on a CPU we time one small bf16 matmul against
float32 once per process (:func:`cpu_half_speed`) and fall back to float32 with one log line saying
why. ``force`` (``force_precision: true``,
``--force-precision``) uses exactly what was asked, fast or not.

fp16 on a CPU is always slow outside a few server chips; it falls back to float32 unless forced.

The same :func:`resolve_precision` decides for ``train`` (stages 1-3), ``predict``, ``chat``,
``serve``, ``eval --model``, ``encode`` and ``embed``.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""Accepted names. ``auto`` (inference default): bf16 on a GPU that supports it, float32 on a CPU (so
answers on a CPU do not depend on which CPU it is); ``bf16``/``fp16``: that where it is fast."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: a half-precision matmul counts as fast when it takes at most this multiple of the float32 time
#: (native bf16 runs at 0.3-1x; the scalar fallback at 20-100x)
FAST_RATIO = 2.0


@dataclass(frozen=True)
class Precision:
    """What runs: ``name`` (fp32/bf16/fp16), its ``dtype``, and ``reason`` (one line for the log)."""

    name: str
    dtype: torch.dtype
    reason: str

    @property
    def is_half(self) -> bool:
        return self.name != "fp32"


@functools.lru_cache(maxsize=None)
def cpu_half_speed(dtype: torch.dtype = torch.bfloat16, size: int = 256, repeats: int = 5) -> float:
    """Time of a ``size``³ matmul in ``dtype`` over the same in float32 on this CPU (best of
    ``repeats``; measured once per process). ~0.3-1 with native bf16, 20-100 on the scalar fallback."""
    a32 = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    b32 = torch.randn(size, size, generator=torch.Generator().manual_seed(1))

    def best(a, b) -> float:
        a @ b  # warm-up (kernel selection, page faults)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    try:
        return best(a32.to(dtype), b32.to(dtype)) / max(best(a32, b32), 1e-9)
    except RuntimeError:  # the build has no kernel for it at all
        return float("inf")


def _device_type(device: str | torch.device | None) -> str:
    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def resolve_precision(requested: str | None, device: str | torch.device | None = None, *,
                      force: bool = False, speed_probe=cpu_half_speed) -> Precision:
    """The precision to run for ``requested`` (one of :data:`PRECISIONS`; None = fp32) on ``device``.

    ``speed_probe(dtype) -> float`` gives a CPU's half/float32 time ratio (injectable for tests).
    Falling back from what was asked is logged once at INFO level with the reason."""
    requested = (requested or "fp32").lower()
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is unknown; expected one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return Precision("fp32", torch.float32, "float32 as asked")
    kind = _device_type(device)
    if force:
        if requested == "auto":
            raise ValueError("force needs an explicit precision (bf16 or fp16), not auto")
        return Precision(requested, _DTYPES[requested], f"{requested} forced")
    if kind == "cuda":
        if requested == "fp16":
            return Precision("fp16", torch.float16, "fp16 on the GPU")
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", torch.bfloat16, "bf16 on the GPU")
        return _fallback(requested, "this GPU has no bf16 support")
    if kind != "cpu":
        return Precision(requested if requested != "auto" else "fp32",
                         _DTYPES[requested if requested != "auto" else "fp32"], f"{kind} device as asked")
    if requested == "auto":
        return Precision("fp32", torch.float32, "float32 on the CPU (auto)")
    if requested == "fp16":
        return _fallback("fp16", "fp16 on a CPU runs on a slow fallback (use bf16, or force_precision)")
    ratio = speed_probe(torch.bfloat16)
    capability = torch.backends.cpu.get_cpu_capability()
    if ratio <= FAST_RATIO:
        return Precision("bf16", torch.bfloat16,
                         f"bf16 on this CPU ({capability}): a bf16 matmul takes {ratio:.2f}x the float32 time")
    return _fallback(requested, f"this CPU ({capability}) has no fast bf16: a bf16 matmul takes {ratio:.0f}x the "
                                "float32 time (force it with force_precision: true / --force-precision)")


def _fallback(requested: str, why: str) -> Precision:
    if requested != "auto":
        _log_once(f"{requested} requested, running float32: {why}")
    return Precision("fp32", torch.float32, f"float32: {why}")


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logger.warning(message)


def training_precision(training: dict, force: bool = False, speed_probe=cpu_half_speed) -> dict:
    """``training`` (TrainingArguments keys) with ``bf16``/``fp16`` decided by :func:`resolve_precision`.

    Without a GPU it also sets ``use_cpu`` (so ``torchrun`` gives CPU DDP over gloo); bf16 on a CPU
    then runs through CPU autocast (``TrainingArguments(bf16=True, use_cpu=True)``)."""
    training = dict(training)
    on_gpu = torch.cuda.is_available() and not training.get("use_cpu")
    if not on_gpu:
        training.setdefault("use_cpu", True)
    requested = "fp16" if training.get("fp16") else "bf16" if training.get("bf16") else "fp32"
    if requested == "fp32":
        return training
    chosen = resolve_precision(requested, "cuda" if on_gpu else "cpu", force=force, speed_probe=speed_probe)
    training["bf16"] = chosen.name == "bf16"
    training["fp16"] = chosen.name == "fp16"
    logger.info("training precision: %s", chosen.reason)
    return training


def add_precision_arguments(parser, default: str = "auto", device: bool = False) -> None:
    """``--precision`` and ``--force-precision`` for inference commands (and ``--device`` if asked)."""
    if device:
        parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    parser.add_argument("--precision", choices=PRECISIONS, default=default,
                        help="auto (default): bf16 on a GPU, float32 on a CPU; "
                             "bf16/fp16: that where it is fast, else float32 (logged); fp32: always float32")
    parser.add_argument("--force-precision", action="store_true",
                        help="use --precision exactly as given even where it runs slowly")
