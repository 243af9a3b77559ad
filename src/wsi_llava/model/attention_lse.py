"""Softmax attention that also returns its per-row log-sum-exp, the building block of LongNet's
branch mixing (:mod:`wsi_llava.model.dilated_attention`).

Two paths, same result: a fused kernel that yields the log-sum-exp itself (the one
``F.scaled_dot_product_attention`` runs: on CPU the flash kernel; on CUDA the flash kernel for
fp16/bf16 without a mask, checked once per device, dtype and head width against the public path),
called through its aten op because that is the only way to get its log-sum-exp; otherwise
``F.scaled_dot_product_attention`` plus an exact, chunked, gradient-free second pass
(:func:`sdpa_with_lse`).

Shapes: G groups (batch x segments x head groups), h heads, m keys/queries, Dh head width.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

__all__ = ["attention_with_lse", "sdpa_with_lse"]

#: most float32 scores held at once by the gradient-free log-sum-exp pass of :func:`sdpa_with_lse`.
LSE_CHUNK_ELEMENTS = 1 << 22


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Public-API path: ``F.scaled_dot_product_attention`` plus an exact, chunked, gradient-free lse pass.

    q, k, v [G, h, m, Dh]; bias None or [G, 1, 1, m] additive (0 / -inf) → out [G, h, m, Dh], lse [G, h, m]
    float32. Extra memory: one [chunk, h, m, m] float32 block, ``LSE_CHUNK_ELEMENTS`` elements at most.
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    g, h, m = q.shape[:3]
    per_group = max(1, h * m * k.shape[2])
    step = max(1, LSE_CHUNK_ELEMENTS // per_group)
    lse = torch.empty(g, h, m, dtype=torch.float32, device=q.device)
    with torch.no_grad():
        for i in range(0, g, step):  # bounded memory; each chunk is one batched matmul
            scores = torch.matmul(q[i:i + step].float(), k[i:i + step].float().transpose(-1, -2)) * s
            if bias is not None:
                scores = scores + bias[i:i + step].float()
            lse[i:i + step] = torch.logsumexp(scores, dim=-1)
    return out, lse


def _fused_cpu(q, k, v, bias, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias, scale=scale)


def _fused_cuda_flash(q, k, v, bias, scale):
    """The CUDA flash kernel that ``F.scaled_dot_product_attention`` picks for fp16/bf16 without a
    mask, called through its aten op for its log-sum-exp (natural log, [G, h, m] float32)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
    return out, lse


#: (kernel, device, dtype, head width) → whether the kernel passed its one-time self-check
_VERIFIED: dict[tuple[str, str, torch.dtype, int], bool] = {}


def _verified(kernel, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Run ``kernel`` once on a small random problem on ``device`` and compare its output and
    log-sum-exp with :func:`sdpa_with_lse`; remembered per (device, dtype, head width). A kernel
    that fails or disagrees is not used again (a warning says so) and the public path runs instead,
    so a private op changing under a new PyTorch can cost speed, never correctness."""
    key = (getattr(kernel, "__name__", repr(kernel)), str(device), dtype, head_dim)
    if key not in _VERIFIED:
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(2, 2, 80, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        try:
            with torch.no_grad():
                out, lse = kernel(q, k, v, None, None)
                ref_out, ref_lse = sdpa_with_lse(q, k, v)
            ok = (tuple(lse.shape) == tuple(ref_lse.shape)
                  and torch.allclose(out.float(), ref_out.float(), rtol=tol, atol=tol)
                  and torch.allclose(lse.float(), ref_lse.float(), rtol=tol, atol=tol))
            why = "disagreed with F.scaled_dot_product_attention"
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
            ok, why = False, f"failed ({type(e).__name__}: {e})"
        if not ok:
            warnings.warn(f"dilated attention: the fused {getattr(kernel, '__name__', 'kernel')} on {device} "
                          f"({dtype}, head width {head_dim}) {why}; using the public SDPA path (slower)",
                          RuntimeWarning, stacklevel=3)
        _VERIFIED[key] = ok
    return _VERIFIED[key]


def _fused_kernel(q: torch.Tensor, bias: torch.Tensor | None):
    """The kernel that yields attention and its log-sum-exp in one pass for these inputs, or None."""
    if q.device.type == "cpu":
        return _fused_cpu if q.dtype in (torch.float32, torch.bfloat16, torch.float16) else None
    if (q.device.type == "cuda" and bias is None and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and _verified(_fused_cuda_flash, q.device, q.dtype, q.shape[-1])):
        return _fused_cuda_flash
    return None


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                       scale: float | None = None, *, fused: bool | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning its per-row log-sum-exp.

    q, k, v [G, h, m, Dh]; bias None or additive [G, 1, 1, m] in q's dtype (0 = key kept, -inf = key
    removed) → out [G, h, m, Dh], lse [G, h, m] float32 (no gradient flows through lse).
    ``fused`` (default ``None`` = ``True``) uses a kernel that returns the log-sum-exp itself when the
    device has one: the CPU flash kernel (the one SDPA runs there); on CUDA, the flash kernel for
    fp16/bf16 without a mask (checked once against the public path, see :func:`_verified`).
    Otherwise, or with ``fused=False``, :func:`sdpa_with_lse`: the public SDPA plus a second,
    chunked pass for the log-sum-exp.
    """
    kernel = None if fused is False else _fused_kernel(q, bias)
    if kernel is not None:
        out, lse = kernel(q, k, v, bias, scale)
        return out, lse.detach()
    return sdpa_with_lse(q, k, v, bias, scale)

