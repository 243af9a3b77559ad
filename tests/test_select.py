"""Tests for model/select.py: selector guarantees, algorithms, and the PruMerge reference vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wsi_llava.model.select import (
    SELECTORS,
    SelectOptions,
    adaptive_keep_counts,
    fill_by_cycling,
    hilbert_keys,
    prumerge_reference,
    prumerge_reference_parts,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"
# committed with the tests, so these never collect nothing (tests/test_self_contained.py checks it)
PRUMERGE_FILES = [FIXTURES / "prumerge_prumerge_N576_C32_adaptive.safetensors",
                  FIXTURES / "prumerge_plus_N576_C32_adaptive.safetensors"]
# optional larger vectors of the same kind (the ``larger_reference`` fixture skips when absent)
LARGER_PRUMERGE = ["prumerge_prumerge_N144_C64_adaptive", "prumerge_prumerge_clipL_N576_C1024_adaptive",
                   "prumerge_plus_clipL_N576_C1024_adaptive"]


def make_batch(b: int, n: int, d: int, n_real: list[int], seed: int = 0, dk: int = 8, pad_value=float("nan")):
    """Random inputs with padding at the end of each row; padded entries hold ``pad_value``."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(n)[None, :] < torch.tensor(n_real)[:, None]
    tokens = torch.randn(b, n, d, generator=g)
    keys = torch.randn(b, n, dk, generator=g)
    attn = torch.softmax(torch.randn(b, n, generator=g) * 2, dim=1)
    side = int(np.ceil(np.sqrt(n)))
    grid = torch.stack([torch.arange(n) % side, torch.arange(n) // side], dim=1).float() * 256
    coords = grid[None].expand(b, n, 2).clone()
    query = torch.randn(b, d, generator=g)
    pad = ~mask
    tokens[pad] = pad_value
    keys[pad] = pad_value
    attn = attn.masked_fill(pad, 0.0)
    coords[pad] = pad_value
    return dict(tokens=tokens, mask=mask, keys=keys, cls_attention=attn, coords=coords, query=query)


def run(name: str, batch: dict, k: int, **kw):
    kwargs = {key: v for key, v in batch.items() if key not in ("tokens", "mask")}
    kwargs.update(kw)
    return SELECTORS[name](batch["tokens"], batch["mask"], k, **kwargs)


ALL_OPTIONS = [
    ("none", None),
    ("random_sample", None),
    ("prumerge", SelectOptions()),
    ("prumerge", SelectOptions(budget="adaptive")),
    ("prumerge", SelectOptions(budget="adaptive", order="score")),
    ("prumerge_plus", SelectOptions()),
    ("prumerge_plus", SelectOptions(budget="adaptive")),
    ("prumerge_plus", SelectOptions(budget="adaptive", order="score", plus_topk_fraction=0.2)),
    ("prompt_topk", SelectOptions()),
    ("prompt_topk", SelectOptions(similarity_weighting=True, order="score")),
    ("feature_outlier", SelectOptions()),
    ("feature_outlier", SelectOptions(budget="adaptive", order="score")),
]


def test_selector_names():
    assert set(SELECTORS) == {"none", "random_sample", "prumerge", "prumerge_plus", "prompt_topk", "feature_outlier"}


@pytest.mark.parametrize("name,opts", ALL_OPTIONS)
def test_exact_k_and_never_padding_over_random_masks(name, opts):
    rng = np.random.default_rng(123)
    for trial in range(25):
        b = int(rng.integers(1, 4))
        n = int(rng.integers(1, 70 if trial % 2 else 400))
        k = int(rng.integers(1, 40))
        n_real = [int(rng.integers(1, n + 1)) for _ in range(b)]
        batch = make_batch(b, n, 6, n_real, seed=trial)
        gen = torch.Generator().manual_seed(trial) if name == "random_sample" and trial % 2 else None
        sel = run(name, batch, k, options=opts, generator=gen)
        assert sel.tokens.shape == (b, k, 6) and sel.indices.shape == (b, k)
        assert sel.indices.dtype == torch.int64
        picked = batch["mask"].gather(1, sel.indices)
        assert bool(picked.all()), f"{name} picked padding: n={n} k={k} n_real={n_real}"
        assert torch.isfinite(sel.tokens).all(), f"{name} let padding NaN into the tokens"
        for row in range(b):
            nr = n_real[row]
            want = min(k, nr)
            if name == "prumerge" and opts.budget == "adaptive":
                want = min(max(int(adaptive_keep_counts(batch["cls_attention"][row:row + 1],
                                                        batch["mask"][row:row + 1])), 1), k, nr)
            if name == "feature_outlier" and opts.budget == "adaptive":
                want = min(max(int(adaptive_keep_counts(sel.scores[row:row + 1], batch["mask"][row:row + 1])), 1), k, nr)
            got = sel.indices[row]
            assert got.unique().numel() == want
            assert got[:want].unique().numel() == want  # cycling repeats the first `want`
            assert torch.equal(got, got[:want].repeat(k // want + 1)[:k])
            if name in ("prumerge", "prompt_topk"):  # plain per-row statement of top-K
                score = batch["cls_attention"][row, :nr] if name == "prumerge" else torch.nn.functional.cosine_similarity(
                    batch["tokens"][row, :nr], batch["query"][row][None], dim=-1)
                assert set(got.tolist()) == set(score.topk(want).indices.tolist())
            if name == "prumerge_plus" and opts.budget == "fixed":
                n_att = min(round(k * opts.plus_topk_fraction), nr)
                top = batch["cls_attention"][row, :nr].topk(n_att).indices
                assert set(top.tolist()) <= set(got.tolist())
        if sel.scores is not None:
            assert sel.scores.shape == (b, n)
            assert bool((sel.scores[~batch["mask"]] == 0).all())
            assert torch.isfinite(sel.scores).all()


@pytest.mark.parametrize("name,opts", ALL_OPTIONS)
def test_padding_content_is_irrelevant(name, opts):
    with_nan = make_batch(2, 40, 5, [40, 23], seed=7, pad_value=float("nan"))
    with_zero = make_batch(2, 40, 5, [40, 23], seed=7, pad_value=0.0)
    a = run(name, with_nan, 16, options=opts)
    z = run(name, with_zero, 16, options=opts)
    assert torch.equal(a.indices, z.indices)
    torch.testing.assert_close(a.tokens, z.tokens)


@pytest.mark.parametrize("name,opts", ALL_OPTIONS)
def test_deterministic(name, opts):
    batch = make_batch(2, 50, 5, [50, 31], seed=3)
    a = run(name, batch, 12, options=opts)
    b = run(name, batch, 12, options=opts)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.tokens, b.tokens)


def test_every_selector_has_the_one_signature_without_a_training_flag():
    import inspect

    want = ["tokens", "mask", "k", "cls_attention", "keys", "query", "coords", "generator", "options"]
    for name, selector in SELECTORS.items():
        assert list(inspect.signature(selector).parameters) == want, name
    with pytest.raises(TypeError, match="training"):
        run("none", make_batch(1, 5, 4, [5]), 2, training=True)


def test_spatial_order_is_default():
    batch = make_batch(2, 60, 5, [60, 44], seed=1)
    for name in SELECTORS:
        sel = run(name, batch, 20)
        assert bool((sel.indices.diff(dim=1) > 0).all()), name


def test_random_sample_seeded_and_uniform():
    batch = make_batch(2, 100, 4, [100, 57], seed=0)
    s1 = run("random_sample", batch, 10, generator=torch.Generator().manual_seed(5))
    s2 = run("random_sample", batch, 10, generator=torch.Generator().manual_seed(5))
    s3 = run("random_sample", batch, 10, generator=torch.Generator().manual_seed(6))
    assert torch.equal(s1.indices, s2.indices)
    assert not torch.equal(s1.indices, s3.indices)
    assert s1.scores is None
    # uniform over the real tiles of a padded row: every real tile drawn, about equally often
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(100)
    for _ in range(300):
        counts += torch.bincount(run("random_sample", batch, 10, generator=gen).indices[1], minlength=100)
    assert counts[57:].sum() == 0
    assert counts[:57].min() > 20 and counts[:57].max() < 110  # expectation 300*10/57 ≈ 53


def test_random_sample_without_generator_is_evenly_spaced():
    batch = make_batch(1, 100, 4, [40], seed=0)
    sel = run("random_sample", batch, 8)
    assert sel.indices[0].tolist() == [0, 5, 10, 15, 20, 25, 30, 35]


def test_fill_by_cycling_when_fewer_real_than_k():
    batch = make_batch(2, 10, 4, [3, 10], seed=0)
    none = run("none", batch, 7)
    assert none.indices.tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 6]]
    torch.testing.assert_close(none.tokens[0, 3], batch["tokens"][0, 0])
    rnd = run("random_sample", batch, 7, generator=torch.Generator().manual_seed(0))
    assert rnd.indices[0].tolist() == [0, 1, 2, 0, 1, 2, 0]
    for name in ("prumerge", "prumerge_plus", "prompt_topk"):
        sel = run(name, batch, 7)
        assert sel.indices[0].tolist() == [0, 1, 2, 0, 1, 2, 0], name
        torch.testing.assert_close(sel.tokens[0, 0], sel.tokens[0, 3])
    # k larger than N itself
    big = run("prompt_topk", batch, 23)
    assert big.indices.shape == (2, 23) and big.indices[1, 10:20].tolist() == list(range(10))


def test_fill_by_cycling_helper_and_errors():
    cand = torch.tensor([[4, 9, 2, 7], [1, 3, 5, 8]])
    out = fill_by_cycling(cand, torch.tensor([2, 4]), 6)
    assert out.tolist() == [[4, 9, 4, 9, 4, 9], [1, 3, 5, 8, 1, 3]]
    with pytest.raises(ValueError, match=r"batch rows \[0\]"):
        fill_by_cycling(cand, torch.tensor([0, 4]), 3)


def test_prompt_topk_picks_planted_query_similar_tiles():
    g = torch.Generator().manual_seed(0)
    b, n, d = 2, 500, 64
    tokens = torch.randn(b, n, d, generator=g)
    query = torch.randn(b, d, generator=g)
    planted = [torch.tensor([3, 77, 150, 299, 480, 481]), torch.tensor([10, 11, 12, 200, 201, 350])]
    for row, idx in enumerate(planted):
        tokens[row, idx] = query[row] * 3 + 0.3 * torch.randn(len(idx), d, generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 400:] = False
    sel = SELECTORS["prompt_topk"](tokens, mask, 6, query=query)
    assert sel.indices.tolist() == [t.tolist() for t in planted]
    assert sel.scores[0, planted[0]].min() > 0.9 and sel.scores[0].median() < 0.3
    torch.testing.assert_close(sel.tokens, tokens.gather(1, sel.indices[..., None].expand(-1, -1, d)))


def test_prompt_topk_weighting_gradient_reaches_query():
    batch = make_batch(2, 30, 8, [30, 20], seed=2, pad_value=float("nan"))
    for weighting in (True, False):
        query = batch["query"].clone().requires_grad_(True)
        tokens = batch["tokens"].clone().requires_grad_(True)
        opts = SelectOptions(similarity_weighting=weighting)
        sel = SELECTORS["prompt_topk"](tokens, batch["mask"], 5, query=query, options=opts)
        (sel.tokens * torch.linspace(-1, 1, 8)).sum().backward()
        if weighting:
            assert query.grad is not None and torch.isfinite(query.grad).all()
            assert query.grad.abs().sum() > 0
            weights = sel.tokens[..., 0] / tokens.detach()[..., 0].gather(1, sel.indices)
            torch.testing.assert_close(weights.mean(1), torch.ones(2))
        else:
            assert query.grad is None
        assert torch.isfinite(tokens.grad).all()
        assert bool((tokens.grad[~batch["mask"]] == 0).all())


def test_prumerge_keeps_top_attention_tiles_and_merges():
    b, n, d = 2, 200, 16
    batch = make_batch(b, n, d, [200, 150], seed=4, pad_value=0.0)
    attn = torch.full((b, n), 1e-4)
    top = [torch.tensor([5, 40, 41, 99, 120]), torch.tensor([0, 17, 60, 61, 149])]
    for row, idx in enumerate(top):
        attn[row, idx] = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1])
    attn[1, 150:] = 0
    batch["cls_attention"] = attn
    sel = run("prumerge", batch, 5)
    assert sel.indices.tolist() == [t.tolist() for t in top]
    by_score = run("prumerge", batch, 5, options=SelectOptions(order="score"))
    assert by_score.indices.tolist() == [t.tolist() for t in top]  # planted in descending order here
    plain = run("prumerge", batch, 5, options=SelectOptions(merge_neighbours=0))
    torch.testing.assert_close(plain.tokens, batch["tokens"].gather(1, plain.indices[..., None].expand(-1, -1, d)))
    # merged = own + Σ attn_j x_j over the 32 most key-similar other real tiles (plain statement)
    for row in range(b):
        nr = int(batch["mask"][row].sum())
        keys = torch.nn.functional.normalize(batch["keys"][row, :nr], dim=-1)
        for slot, c in enumerate(sel.indices[row].tolist()):
            sim = keys @ keys[c]
            sim[c] = -float("inf")
            nb = sim.topk(32).indices
            expect = batch["tokens"][row, c] + (attn[row, nb, None] * batch["tokens"][row, nb]).sum(0)
            torch.testing.assert_close(sel.tokens[row, slot], expect)
    assert bool((sel.scores[1, 150:] == 0).all()) and sel.scores[0, 5] == 0.5


def test_prumerge_adaptive_budget_cycles_outliers():
    batch = make_batch(1, 300, 8, [300], seed=5, pad_value=0.0)
    attn = torch.full((1, 300), 1.0)
    attn[0, [10, 20, 30]] = torch.tensor([50.0, 40.0, 30.0])
    batch["cls_attention"] = attn / attn.sum()
    sel = run("prumerge", batch, 8, options=SelectOptions(budget="adaptive"))
    assert sel.indices[0].tolist() == [10, 20, 30, 10, 20, 30, 10, 20]
    capped = run("prumerge", batch, 2, options=SelectOptions(budget="adaptive", order="score"))
    assert capped.indices[0].tolist() == [10, 20]
    batch["cls_attention"] = torch.full((1, 300), 1 / 300)  # no outlier: one token, cycled
    flat = run("prumerge", batch, 4, options=SelectOptions(budget="adaptive"))
    assert flat.indices[0].unique().numel() == 1


def test_adaptive_keep_counts_matches_numpy_per_row():
    g = torch.Generator().manual_seed(9)
    scores = torch.softmax(torch.randn(4, 333, generator=g) * 3, dim=1)
    n_real = [333, 200, 57, 1]
    mask = torch.arange(333)[None, :] < torch.tensor(n_real)[:, None]
    got = adaptive_keep_counts(scores, mask)
    for row, n in enumerate(n_real):
        a = scores[row, :n].numpy()
        q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
        ratio = len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / n
        assert got[row].item() == int(n * ratio)
    assert got[:3].min() > 0


def test_prumerge_plus_attention_plus_uniform_spatial_tiles():
    side = 32
    n = side * side
    batch = make_batch(1, n, 8, [n], seed=6, pad_value=0.0)
    attn = torch.full((1, n), 1e-3)
    hot = torch.tensor([0, 1, 2, 3, 32, 33, 34, 35])  # all in the top-left corner
    attn[0, hot] = 1.0
    batch["cls_attention"] = attn
    sel = run("prumerge_plus", batch, 16, options=SelectOptions(plus_topk_fraction=0.5))
    idx = sel.indices[0]
    assert idx.unique().numel() == 16
    assert set(hot.tolist()) <= set(idx.tolist())
    spatial = torch.tensor(sorted(set(idx.tolist()) - set(hot.tolist())))
    x, y = spatial % side, spatial // side
    quadrants = ((x >= side // 2).long() * 2 + (y >= side // 2).long()).tolist()
    assert sorted(quadrants) == [0, 0, 1, 1, 2, 2, 3, 3]  # 8 spatial tiles, 2 per quadrant
    # the same over a tissue shape that is not a rectangle: only the lower-right triangle is real
    tri = torch.tensor([(i % side) + (i // side) >= side for i in range(n)])
    batch["mask"] = tri[None]
    sel = run("prumerge_plus", batch, 12, options=SelectOptions(plus_topk_fraction=0.0))
    assert bool(tri[sel.indices[0]].all()) and sel.indices[0].unique().numel() == 12
    # adaptive: the outliers (the 8 hot tiles) then spatial tiles up to k
    batch["mask"] = torch.ones(1, n, dtype=torch.bool)
    ada = run("prumerge_plus", batch, 20, options=SelectOptions(budget="adaptive", order="score"))
    assert ada.indices[0, :8].sort().values.tolist() == hot.tolist()
    assert ada.indices[0].unique().numel() == 20


def test_prumerge_plus_requires_coords():
    batch = make_batch(1, 20, 4, [20], seed=0)
    batch["coords"] = None
    with pytest.raises(ValueError, match="coords"):
        run("prumerge_plus", batch, 4)


def test_hilbert_keys_walk_a_full_grid_by_unit_steps():
    side = 8
    i = torch.arange(side * side)
    coords = (torch.stack([i % side, i // side], dim=1).float() * 256)[None]
    keys = hilbert_keys(coords, torch.ones(1, side * side, dtype=torch.bool), bits=3)
    assert keys[0].sort().values.tolist() == list(range(side * side))
    path = coords[0, keys[0].argsort()] / 256
    assert bool(((path[1:] - path[:-1]).abs().sum(1) == 1).all())


def check_prumerge_reference(path: Path):
    ref = load_file(str(path))
    plus = path.stem.startswith("prumerge_plus")
    parts = prumerge_reference_parts(ref["q"], ref["k"], ref["hidden_states"], plus=plus, adaptive=True)
    assert parts.n_topk == int(ref["n_topk"].item())
    ratio = ref["reduction_ratio"]  # stored as float64 or float32: compare at the stored precision
    assert torch.equal(torch.tensor([parts.reduction_ratio], dtype=torch.float64).to(ratio.dtype), ratio.view(1))
    for key in ("keep_idx", "complement_idx", "neighbor_idx"):
        assert torch.equal(getattr(parts, key), ref[key]), key
    for key in ("merged_kept", "extra_token", "out"):
        torch.testing.assert_close(getattr(parts, key), ref[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.cls_attn, ref["cls_attn"], rtol=1e-5, atol=1e-6)
    out = prumerge_reference(ref["q"], ref["k"], ref["hidden_states"], plus=plus, adaptive=True)
    torch.testing.assert_close(out, ref["out"], rtol=1e-5, atol=1e-5)


def check_slide_prumerge(path: Path):
    """The slide selector keeps and merges what the original keeps first (its top-K by CLS attention;
    PruMerge+ then adds spatial picks, which the slide selector does differently). The original pools
    the adaptive budget over the batch, the slide selector counts per row: equal only for B = 1."""
    ref = load_file(str(path))
    n_topk = int(ref["n_topk"].item())
    for b in range(ref["q"].shape[0]):
        tokens, keys, attn = ref["hidden_states"][b:b + 1, 1:], ref["k"][b:b + 1, 1:], ref["cls_attn"][b:b + 1]
        keep, merged = ref["keep_idx"][b:b + 1, :n_topk], ref["merged_kept"][b:b + 1, :n_topk]
        mask = torch.ones(attn.shape, dtype=torch.bool)
        sel = SELECTORS["prumerge"](tokens, mask, n_topk, cls_attention=attn, keys=keys,
                                    options=SelectOptions(order="score"))
        assert torch.equal(sel.indices, keep)
        torch.testing.assert_close(sel.tokens, merged, rtol=1e-5, atol=1e-5)
        if ref["q"].shape[0] == 1:
            assert adaptive_keep_counts(attn, mask).tolist() == [n_topk]
            ada = SELECTORS["prumerge"](tokens, mask, n_topk + 5, cls_attention=attn, keys=keys,
                                        options=SelectOptions(order="score", budget="adaptive"))
            assert torch.equal(ada.indices[:, :n_topk], keep)
            assert torch.equal(ada.indices[:, n_topk:], keep[:, :5])


@pytest.mark.parametrize("path", PRUMERGE_FILES, ids=lambda p: p.stem)
def test_prumerge_reference_reproduces_original(path):
    check_prumerge_reference(path)


@pytest.mark.parametrize("path", PRUMERGE_FILES, ids=lambda p: p.stem)
def test_slide_prumerge_agrees_with_reference(path):
    check_slide_prumerge(path)


@pytest.mark.parametrize("name", LARGER_PRUMERGE)
def test_prumerge_reproduces_original_larger(name, larger_reference):
    check_prumerge_reference(larger_reference / f"{name}.safetensors")


@pytest.mark.parametrize("name", LARGER_PRUMERGE)
def test_slide_prumerge_agrees_with_larger_reference(name, larger_reference):
    check_slide_prumerge(larger_reference / f"{name}.safetensors")


def test_reference_fixed_ratio_and_batch():
    g = torch.Generator().manual_seed(0)
    q, k, h = (torch.randn(2, 145, 32, generator=g) for _ in range(3))
    parts = prumerge_reference_parts(q, k, h, adaptive=False)
    assert parts.n_topk == 18 and parts.out.shape == (2, 19, 32)
    # every row: kept ∪ complement is a partition of the patches
    full = torch.cat([parts.keep_idx, parts.complement_idx], dim=1).sort(dim=1).values
    assert torch.equal(full, torch.arange(144).expand(2, -1))
    with pytest.raises(ValueError, match="B == 1"):
        prumerge_reference_parts(q, k, h, plus=True, adaptive=True)


def test_errors_name_the_problem():
    batch = make_batch(2, 10, 4, [10, 10], seed=0)
    with pytest.raises(ValueError, match="cls_attention"):
        run("prumerge", batch, 3, cls_attention=None)
    with pytest.raises(ValueError, match="keys"):
        run("prumerge", batch, 3, keys=None)
    with pytest.raises(ValueError, match="`keys` must be 3-D"):
        run("prumerge", batch, 3, keys=batch["keys"][..., 0])
    nan_keys = batch["keys"].clone()
    nan_keys[0, 2, 1] = float("inf")
    with pytest.raises(ValueError, match="`keys` is NaN/Inf at batch row 0, tile 2"):
        run("prumerge_plus", batch, 3, keys=nan_keys)
    with pytest.raises(ValueError, match="query"):
        run("prompt_topk", batch, 3, query=None)
    with pytest.raises(ValueError, match=r"zero or NaN/Inf in batch rows \[1\]"):
        run("prompt_topk", batch, 3, query=torch.stack([batch["query"][0], torch.zeros(4)]))
    bad = batch["cls_attention"].clone()
    bad[1, 4] = float("nan")
    with pytest.raises(ValueError, match="batch row 1, tile 4"):
        run("prumerge", batch, 3, cls_attention=bad)
    empty = dict(batch, mask=torch.tensor([[True] * 10, [False] * 10]))
    with pytest.raises(ValueError, match=r"batch rows \[1\] have no real tile"):
        run("none", empty, 3)
    with pytest.raises(ValueError, match="k"):
        run("none", batch, 0)
    with pytest.raises(ValueError, match="budget"):
        SelectOptions(budget="sometimes")
    with pytest.raises(ValueError, match="did you mean 'merge_neighbours'"):
        SelectOptions.from_mapping({"merge_neighbors": 16})
    assert SelectOptions.from_mapping({"budget": "adaptive"}).budget == "adaptive"


@pytest.mark.parametrize("values,message", [
    ({"merge_neighbours": "8"}, "merge_neighbours must be an int, got '8'"),
    ({"merge_neighbours": 2.5}, "merge_neighbours must be an int"),
    ({"merge_neighbours": True}, "merge_neighbours must be an int"),
    ({"similarity_weighting": 1}, "similarity_weighting must be a bool"),
    ({"iqr_whisker": "wide"}, "iqr_whisker must be a float"),
    ({"budget": 3}, "budget must be a str"),
])
def test_select_options_from_mapping_checks_value_types(values, message):
    with pytest.raises(ValueError, match=message):
        SelectOptions.from_mapping(values)


def test_select_options_from_mapping_accepts_an_int_for_a_float():
    assert SelectOptions.from_mapping({"iqr_whisker": 2, "plus_topk_fraction": 1}).iqr_whisker == 2


def test_feature_outlier_finds_the_tiles_unlike_their_slide_whatever_the_slide_offset():
    """Two planted tiles per slide, a large per-slide offset on every tile, padding: the planted tiles
    rank first (the median cancels the offset); the adaptive budget keeps about as many as were planted."""
    g = torch.Generator().manual_seed(0)
    b, n, d = 3, 40, 16
    tokens = torch.randn(b, n, d, generator=g) + 6.0 * torch.randn(b, 1, d, generator=g)  # slide offsets
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 30:] = False
    tokens[1, 30:] = float("nan")  # padding never scores, even NaN
    planted = torch.tensor([[3, 17], [5, 29], [0, 39]])
    direction = torch.randn(b, 1, d, generator=g)
    direction = 12.0 * direction / direction.norm(dim=-1, keepdim=True)
    tokens.scatter_add_(1, planted[..., None].expand(b, 2, d), direction.expand(b, 2, d))
    sel = SELECTORS["feature_outlier"](tokens, mask, 2)
    assert torch.equal(sel.indices, planted)  # spatial order: ascending index
    assert torch.isfinite(sel.scores).all() and bool((sel.scores[1, 30:] == 0).all())
    ada = SELECTORS["feature_outlier"](tokens, mask, 8, options=SelectOptions(budget="adaptive", order="score"))
    assert all(set(ada.indices[i, :2].tolist()) == set(planted[i].tolist()) for i in range(b))
