"""Dilated attention: reference vectors of the original, a loop-by-loop re-statement, dense equivalence,
mask semantics, gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from wsi_llava.model import slide_encoder
from wsi_llava.model.dilated_attention import (
    UNCOVERED_LSE,
    attention_with_lse,
    branch_attention,
    dilated_attention,
    sdpa_with_lse,
)

SMALL_SEGMENTS = [1024, 1448, 2048, 2896, 4096]
DILATIONS = [1, 2, 4, 8, 16]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"
# committed with the tests: the mini encoder's segments (64 … 1024) are all crossed or padded at N = 1500
MINI_N1500 = FIXTURES / "gigapath_mini_N1500_fp32.safetensors"


# ---------------------------------------------------------------------------------------------
# a slow, explicit re-statement of the semantics (loops over samples, branches, segments, groups)
# ---------------------------------------------------------------------------------------------
def naive_dilated(q, k, v, segments, dilations, mask=None):
    """q, k, v [B, L, H, Dh]; mask [B, L] (True = real). Each sample is cut to its last real token;
    zero rows (score 0, value 0) pad segments and dilation; masked tokens are no keys and zero queries.
    Outputs return to position ``s * w_r + slot`` (padded segments laid end to end, as the original)."""
    b_sz, length, heads, dh = q.shape
    scale = dh ** -0.5
    out = torch.zeros_like(q)
    for b in range(b_sz):
        real = torch.ones(length, dtype=torch.bool) if mask is None else mask[b]
        idx = torch.nonzero(real).flatten()
        ls = int(idx.max()) + 1 if len(idx) else 0
        if ls == 0:
            continue
        lses = torch.full((len(segments), ls, heads), -1e8)  # uncovered: the original's -1e8
        outs = torch.zeros(len(segments), ls, heads, dh, dtype=q.dtype)
        for bi, (w, r) in enumerate(zip(segments, dilations)):
            w_eff = min(w, ls)
            n = -(-ls // w_eff)
            w_r = -(-w_eff // r) * r
            hh = -(-heads // r)
            for s in range(n):
                for g in range(r):
                    hs = list(range(g * hh, min((g + 1) * hh, heads)))
                    if not hs:
                        continue
                    slots = list(range(g, w_r, r))
                    pos = [s * w_eff + loc if loc < w_eff and s * w_eff + loc < ls else None for loc in slots]
                    zero = torch.zeros(len(hs), dh, dtype=q.dtype)
                    keys = [zero if p is None else k[b, p, hs] for p in pos if p is None or real[p]]
                    vals = [zero if p is None else v[b, p, hs] for p in pos if p is None or real[p]]
                    if not keys:  # nothing real here
                        continue
                    kk, vv = torch.stack(keys, 1), torch.stack(vals, 1)  # [h, nk, dh]
                    for loc, p in zip(slots, pos):
                        j = s * w_r + loc
                        if j >= ls:
                            continue
                        qv = zero if p is None or not real[p] else q[b, p, hs]
                        sc = torch.einsum("hd,hkd->hk", qv, kk) * scale
                        lses[bi, j, hs] = torch.logsumexp(sc, -1)
                        outs[bi, j, hs] = torch.einsum("hk,hkd->hd", sc.softmax(-1), vv)
        wts = torch.softmax(lses, 0).detach()
        out[b, :ls] = (outs * wts.unsqueeze(-1)).sum(0) * real[:ls].view(ls, 1, 1)
    return out


def rand_qkv(b, length, heads, dh, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, length, heads, dh, generator=g).requires_grad_(requires_grad) for _ in range(3)]


# ---------------------------------------------------------------------------------------------
# the original's reference vectors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_reproduces_original_encoder_through_both_attention_paths(fused, monkeypatch, mini_reference_encoder):
    """The committed mini reference: the whole encoder's output, with every layer's dilated attention
    forced onto the fused or the public path."""
    model = mini_reference_encoder
    calls = []

    def forced(*args, **kw):
        calls.append(fused)
        return dilated_attention(*args, **kw, fused=fused)

    monkeypatch.setattr(slide_encoder, "dilated_attention", forced)
    d = load_file(str(MINI_N1500))
    with torch.no_grad():
        out = model(d["tile_embeds"], d["coords"])
    assert calls == [fused] * model.config.depth
    torch.testing.assert_close(out.tokens, d["encoder_out"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_reproduces_original_block0_dilated_output(fused, larger_reference):
    """Optional larger reference ("small" configuration, block-0 internals); skipped when absent."""
    d = load_file(str(larger_reference / "gigapath_small_N300_fp32.safetensors"))
    q, k, v = (d[f"l0.{n}"].view(1, 301, 16, 24) for n in "qkv")
    out = dilated_attention(q, k, v, SMALL_SEGMENTS, DILATIONS, fused=fused).reshape(1, 301, 384)
    torch.testing.assert_close(out, d["l0.dilated_out"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# against the loop-by-loop statement
# ---------------------------------------------------------------------------------------------
GEOMETRIES = [  # (segments, dilations, heads, lengths)
    ([8, 12, 16, 24], [1, 2, 4, 8], 8, [5, 16, 17, 35]),  # all-linear layouts, padding everywhere
    ([6, 10], [1, 4], 4, [7, 25]),  # 10 % 4 != 0 with several segments: the original's shifted re-assembly
    ([8, 12], [1, 4], 6, [9, 30]),  # heads not divisible by the dilation
    ([4, 64], [2, 16], 16, [3, 13]),  # dilation larger than the sequence, no r=1 branch
]


@pytest.mark.parametrize("segments,dilations,heads,lengths", GEOMETRIES)
def test_matches_loop_statement_without_mask(segments, dilations, heads, lengths):
    for length in lengths:
        q, k, v = rand_qkv(2, length, heads, 4, seed=length)
        got = dilated_attention(q, k, v, segments, dilations)
        want = naive_dilated(q, k, v, segments, dilations)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"L={length}")


@pytest.mark.parametrize("segments,dilations,heads,lengths", GEOMETRIES)
def test_matches_loop_statement_with_holes_and_padding(segments, dilations, heads, lengths):
    g = torch.Generator().manual_seed(1)
    for length in lengths:
        q, k, v = rand_qkv(4, length, heads, 4, seed=100 + length)
        mask = torch.rand(4, length, generator=g) > 0.3
        mask[0] = True
        mask[1, length // 2:] = False  # trailing padding
        mask[2, length // 2 + 1:] = False
        mask[:, 0] = True
        got = dilated_attention(q, k, v, segments, dilations, mask)
        want = naive_dilated(q, k, v, segments, dilations, mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"L={length}")


def test_dense_equivalence_within_first_segment():
    q, k, v = rand_qkv(2, 300, 16, 24, seed=3)
    got = dilated_attention(q, k, v, [1024], [1])
    t = [x.transpose(1, 2) for x in (q, k, v)]
    scores = t[0] @ t[1].transpose(-1, -2) / math.sqrt(24)
    dense = (scores.softmax(-1) @ t[2]).transpose(1, 2)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(*t).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_branch_lse_is_logsumexp_of_the_group_scores():
    q, k, v = rand_qkv(1, 12, 4, 8, seed=4)
    out, lse = branch_attention(q, k, v, 1024, 2)  # one segment of 12, two head groups
    scale = 8 ** -0.5
    for h in range(4):
        g = h // 2
        idx = torch.arange(g, 12, 2)
        sc = torch.einsum("qd,kd->qk", q[0, idx, h], k[0, idx, h]) * scale
        torch.testing.assert_close(lse[0, idx, h], sc.logsumexp(-1), rtol=1e-5, atol=1e-5)
        other = torch.arange(1 - g, 12, 2)
        assert torch.all(lse[0, other, h] == UNCOVERED_LSE)
        assert torch.all(out[0, other, h] == 0)


def test_fused_kernel_and_public_path_agree_with_gradients():
    q1, k1, v1 = rand_qkv(2, 37, 8, 8, seed=5, requires_grad=True)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q1, k1, v1))
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 30:] = False
    a = dilated_attention(q1, k1, v1, [8, 16], [1, 2], mask, fused=True)
    b = dilated_attention(q2, k2, v2, [8, 16], [1, 2], mask, fused=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(a)
    (a * w).sum().backward()
    (b * w).sum().backward()
    for x, y in ((q1, q2), (k1, k2), (v1, v2)):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)


def test_sdpa_with_lse_is_exact():
    q, k, v = rand_qkv(3, 5, 2, 8, seed=6)
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # [G, h, m, Dh]
    bias = torch.zeros(3, 1, 1, 5)
    bias[1, ..., 3:] = float("-inf")
    out, lse = sdpa_with_lse(q, k, v, bias)
    out2, lse2 = attention_with_lse(q, k, v, bias, fused=True)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) + bias
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse2, lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, scores.softmax(-1) @ v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)


def test_gradients_match_loop_statement():
    q1, k1, v1 = rand_qkv(1, 21, 4, 4, seed=7, requires_grad=True)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q1, k1, v1))
    a = dilated_attention(q1, k1, v1, [8, 12], [1, 2])
    b = naive_dilated(q2, k2, v2, [8, 12], [1, 2])
    w = torch.randn_like(a)
    (a * w).sum().backward()
    (b * w).sum().backward()
    for x, y in ((q1, q2), (k1, k2), (v1, v2)):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# mask semantics
# ---------------------------------------------------------------------------------------------
def test_padding_never_changes_real_outputs():
    segments, dilations = [16, 24, 32, 48], [1, 2, 4, 8]
    lengths = [5, 19, 33, 70]
    total = 80
    qs, ks, vs = rand_qkv(len(lengths), total, 8, 4, seed=8)
    mask = torch.zeros(len(lengths), total, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    qs[~mask] = float("nan")  # whatever sits in padding must not leak
    ks[~mask] = 1e4
    vs[~mask] = float("inf")
    batched = dilated_attention(qs, ks, vs, segments, dilations, mask)
    assert torch.isfinite(batched).all()
    assert torch.all(batched[~mask] == 0)
    for i, n in enumerate(lengths):
        alone = dilated_attention(qs[i:i + 1, :n], ks[i:i + 1, :n], vs[i:i + 1, :n], segments, dilations)
        torch.testing.assert_close(batched[i:i + 1, :n], alone, rtol=1e-5, atol=1e-6, msg=f"length {n}")


def test_all_true_mask_equals_no_mask_and_padding_is_masked_not_attended():
    q, k, v = rand_qkv(1, 45, 8, 4, seed=9)
    none = dilated_attention(q, k, v, [16, 32], [1, 2])
    ones = dilated_attention(q, k, v, [16, 32], [1, 2], torch.ones(1, 45, dtype=torch.bool))
    assert torch.equal(none, ones)
    # a masked token is no key: changing it changes nothing for the others
    mask = torch.ones(1, 45, dtype=torch.bool)
    mask[0, 10] = False
    k2, v2 = k.clone(), v.clone()
    k2[0, 10] += 5.0
    v2[0, 10] -= 3.0
    a = dilated_attention(q, k, v, [16, 32], [1, 2], mask)
    b = dilated_attention(q, k2, v2, [16, 32], [1, 2], mask)
    assert torch.equal(a, b)
    assert not torch.allclose(a, none)  # and it really was removed


def test_bad_shapes_are_reported():
    q, k, v = rand_qkv(1, 8, 2, 4)
    with pytest.raises(ValueError, match="key_padding_mask"):
        dilated_attention(q, k, v, [4], [1], torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="equal length"):
        dilated_attention(q, k, v, [4, 8], [1])
    with pytest.raises(ValueError, match=r"\[B, L, H, Dh\]"):
        dilated_attention(q[0], k[0], v[0], [4], [1])


def test_short_tail_without_autograd_equals_the_padded_computation(monkeypatch):
    """Without autograd, a mostly-padded last segment is cut to its real rows and the zero rows are
    added back in closed form; the result equals the full padded computation (run with autograd)."""
    import wsi_llava.model.dilated_attention as DA

    calls = []
    real = DA._attention_short_tail
    monkeypatch.setattr(DA, "_attention_short_tail", lambda *a: calls.append(a[4]) or real(*a))
    segments, dilations = [8, 12, 40], [1, 2, 4]
    for length in (17, 25, 30):  # several segments, L not a multiple of w
        q, k, v = rand_qkv(2, length, 8, 4, seed=length)
        with torch.no_grad():
            fast = dilated_attention(q, k, v, segments, dilations)
        n_fast = len(calls)
        assert n_fast > 0
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        slow = dilated_attention(qg, kg, vg, segments, dilations)
        assert len(calls) == n_fast  # autograd: the plain padded path
        torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast, naive_dilated(q, k, v, segments, dilations), rtol=1e-5, atol=1e-5)
    # L = 17, w = 8: 3 segments, the last holds 1 real position of 8 → 1 row per group instead of 8
    assert calls[0] == 1
    # with a key padding mask the plain path runs (the mask defines its own zero rows)
    calls.clear()
    q, k, v = rand_qkv(2, 17, 8, 4)
    with torch.no_grad():
        dilated_attention(q, k, v, segments, dilations, torch.ones(2, 17, dtype=torch.bool).index_fill_(1, torch.tensor([16]), False))
    assert calls == []


def test_fused_kernels_are_self_checked_once_and_dropped_when_wrong(monkeypatch):
    """A device's fused kernel (the CUDA flash op on a GPU) is compared once with the public path;
    a kernel that disagrees or fails is not used (warning), so it can cost speed, never correctness."""
    import wsi_llava.model.attention_lse as DA

    monkeypatch.setattr(DA, "_VERIFIED", {})
    cpu = torch.device("cpu")
    assert DA._verified(DA._fused_cpu, cpu, torch.float32, 8)

    def off_by_one(q, k, v, bias, scale):
        out, lse = DA._fused_cpu(q, k, v, bias, scale)
        return out, lse + 1.0  # e.g. a log2 log-sum-exp, or a changed private op

    def broken(q, k, v, bias, scale):
        raise RuntimeError("no kernel image is available")

    for kernel, why in ((off_by_one, "disagreed"), (broken, "failed")):
        with pytest.warns(RuntimeWarning, match=why):
            assert not DA._verified(kernel, cpu, torch.bfloat16 if kernel is broken else torch.float16, 16)
    # remembered: no second check, no second warning
    import warnings as W
    with W.catch_warnings():
        W.simplefilter("error")
        assert not DA._verified(off_by_one, cpu, torch.float16, 16)
        assert DA._verified(DA._fused_cpu, cpu, torch.float32, 8)


def test_gpu_check_script_runs_on_cpu():
    """bench/gpu_check.py (the one prepared script for a lent GPU) stays runnable: smoke run on CPU."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    res = subprocess.run([sys.executable, str(script), "--device", "cpu", "--quick", "--repeats", "1", "--tiles", "300"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "1. correctness" in out and "2. speed" in out and "3. full-size encoder, 300 tiles" in out
    err = float(out.split("float32   error ")[1].split()[0])
    assert err < 1e-5  # the same float32 computation on the same device
