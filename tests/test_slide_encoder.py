"""Slide encoder: the original's reference vectors, positions, masks, tower outputs, loading."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from wsi_llava.model.slide_encoder import (
    SlideEncoder,
    SlideEncoderConfig,
    load_slide_encoder,
    sincos_position_rows,
)


def position_index(coords: torch.Tensor, slide_ngrids: int = 1000, tile_size: int = 256) -> torch.Tensor:
    """The original's position-table row: floor(x/256) * slide_ngrids + floor(y/256) + 1 → int64 [...]
    (a test oracle: the encoder computes positions from the coordinates, :func:`sincos_position_rows`)."""
    g = torch.floor(coords.to(torch.float64) / float(tile_size))
    return (g[..., 0] * slide_ngrids + g[..., 1]).long() + 1

SMALL = dict(num_heads=16, slide_ngrids=64, segment_lengths=[1024, 1448, 2048, 2896, 4096])


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"
# committed with the tests (tests/test_self_contained.py checks they exist and are collected)
MINI_CASES = [FIXTURES / "gigapath_mini_N300_fp32.safetensors", FIXTURES / "gigapath_mini_N1500_fp32.safetensors"]


@pytest.fixture(scope="module")
def small_model(larger_reference) -> SlideEncoder:
    """The optional larger ("small" configuration) reference encoder; skipped when absent."""
    return load_slide_encoder(larger_reference / "gigapath_small_state_dict.safetensors", **SMALL)


@pytest.fixture(scope="module")
def reference(larger_reference):
    def load(name: str) -> dict[str, torch.Tensor]:
        return load_file(str(larger_reference / f"{name}.safetensors"))
    return load


def tiny_config(**kw) -> SlideEncoderConfig:
    base = dict(in_dim=12, embed_dim=32, depth=2, num_heads=4, segment_lengths=[8, 16], dilations=[1, 2])
    return SlideEncoderConfig(**{**base, **kw})


def grid_coords(n: int, side: int = 7, origin=(1000.0, 2000.0)) -> torch.Tensor:
    i = torch.arange(n)
    return torch.stack([origin[0] + (i % side) * 256.0, origin[1] + (i // side) * 256.0], -1).unsqueeze(0)


def close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# the original's reference vectors: committed "mini" configuration
# ---------------------------------------------------------------------------------------------
def test_mini_reference_config_is_the_documented_one(mini_reference_encoder):
    cfg = mini_reference_encoder.config
    assert (cfg.in_dim, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.slide_ngrids) == (96, 64, 2, 4, 64)
    assert cfg.segment_lengths == (64, 128, 256, 512, 1024) and cfg.dilations == (1, 2, 4, 8, 16)


@pytest.mark.parametrize("path", MINI_CASES, ids=lambda p: p.stem)
def test_reproduces_mini_reference(mini_reference_encoder, path):
    d = load_file(str(path))
    assert torch.equal(position_index(d["coords"], mini_reference_encoder.config.slide_ngrids), d["pos_index"])
    with torch.no_grad():
        out = mini_reference_encoder(d["tile_embeds"], d["coords"])
        close(out.tokens, d["encoder_out"])
        close(mini_reference_encoder.embed_slide(out, "cls"), d["out_cls_default"])
        close(mini_reference_encoder.embed_slide(out, "mean"), d["out_gap_default"])


# ---------------------------------------------------------------------------------------------
# the original's reference vectors: optional larger "small" configuration (skipped when absent)
# ---------------------------------------------------------------------------------------------
def test_reproduces_reference_n300_including_internals(small_model, reference):
    d = reference("gigapath_small_N300_fp32")
    assert torch.equal(position_index(d["coords"], 64), d["pos_index"])
    attn = small_model.encoder.layers[0].self_attn
    seen = {}
    hooks = [
        attn.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o)),
        attn.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o)),
        attn.v_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o)),
        attn.inner_attn_ln.register_forward_hook(lambda m, i, o: seen.__setitem__("dilated_out", i[0])),
        attn.out_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("self_attn_out", o)),
    ]
    try:
        with torch.no_grad():
            out = small_model(d["tile_embeds"], d["coords"], output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    for name in ("q", "k", "v", "dilated_out", "self_attn_out"):
        close(seen[name], d[f"l0.{name}"])
    close(out.hidden_states[0], d["encoder_states.0"])
    close(out.hidden_states[1], d["encoder_states.1"])
    with torch.no_grad():
        cls_all = torch.stack([small_model.norm(s)[:, 0] for s in out.hidden_states])
        close(cls_all, d["out_cls_all_layers"])
        close(out.tokens, d["encoder_out"])
        close(small_model.embed_slide(out, "cls"), d["out_cls_default"])
        close(small_model.embed_slide(out, "mean"), d["out_gap_default"])
    assert len(out.hidden_states) == small_model.config.depth + 1
    close(small_model.encoder.layer_norm(out.hidden_states[-1]), out.tokens, 1e-6)


def test_reproduces_reference_n3000_across_segments(small_model, reference):
    d = reference("gigapath_small_N3000_fp32")
    assert torch.equal(position_index(d["coords"], 64), d["pos_index"])
    with torch.no_grad():
        out = small_model(d["tile_embeds"], d["coords"])
        close(out.tokens, d["encoder_out"])
        close(small_model.embed_slide(out, "cls"), d["out_cls_default"])
        close(small_model.embed_slide(out, "mean"), d["out_gap_default"])
    assert out.hidden_states is None


# ---------------------------------------------------------------------------------------------
# positions
# ---------------------------------------------------------------------------------------------
def original_table(embed_dim: int, grid: int) -> np.ndarray:
    """The original's table, re-stated: meshgrid (w first), [emb(grid[0]) | emb(grid[1])], CLS row 0."""
    gh = np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gh, gh), axis=0).reshape(2, -1)

    def emb(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=float) / (dim / 2.0))
        out = np.einsum("m,d->md", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([emb(embed_dim // 2, g[0]), emb(embed_dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), table], axis=0).astype(np.float32)


def test_position_rows_equal_the_original_table_in_its_range():
    grid, dim = 9, 16
    table = torch.from_numpy(original_table(dim, grid))
    xs, ys = torch.meshgrid(torch.arange(grid) * 256.0 + 17, torch.arange(grid) * 256.0 + 255, indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], -1).unsqueeze(0)
    rows = sincos_position_rows(coords, dim)
    assert torch.equal(rows[0], table[position_index(coords, grid)[0]])


def test_huge_coordinates_give_distinct_finite_positions_without_wrap_around():
    coords = torch.tensor([[[300_000.0, 5_000.0], [5_000.0, 300_000.0], [1_000_000.0, 2_000_000.0],
                            [0.0, 256_000.0 + 256.0], [256.0, 0.0]]])
    rows = sincos_position_rows(coords, 768)
    assert torch.isfinite(rows).all()
    assert torch.cdist(rows[0], rows[0]).add(torch.eye(5) * 10).min() > 1e-3  # all distinct
    # the original table (slide_ngrids 1000) wraps y-cell 1001 of x-cell 0 onto x-cell 1, y-cell 1
    assert position_index(coords[:, 3:4], 1000) == position_index(torch.tensor([[[256.0, 256.0]]]), 1000)
    assert not torch.allclose(rows[0, 3], sincos_position_rows(torch.tensor([[[256.0, 256.0]]]), 768)[0, 0])


# ---------------------------------------------------------------------------------------------
# tower behaviour
# ---------------------------------------------------------------------------------------------
def test_padding_never_changes_real_outputs():
    torch.manual_seed(0)
    model = SlideEncoder(tiny_config()).eval()
    lengths, total = [11, 29], 40
    feats = torch.randn(2, total, 12)
    coords = torch.cat([grid_coords(total), grid_coords(total, side=5)])
    mask = torch.zeros(2, total, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    feats[~mask] = float("nan")  # padding content must not matter
    coords[~mask] = 1e9
    with torch.no_grad():
        batched = model(feats, coords, mask, output_hidden_states=True)
        for i, n in enumerate(lengths):
            alone = model(feats[i:i + 1, :n], coords[i:i + 1, :n])
            close(batched.tokens[i:i + 1, : n + 1], alone.tokens, 1e-5)
            close(batched.cls_attention[i:i + 1, :n], alone.cls_attention, 1e-5)
            close(batched.keys[i:i + 1, :n], alone.keys, 1e-5)
            close(model.embed_slide(batched, "mean")[i:i + 1], model.embed_slide(alone, "mean"), 1e-5)
    for t in (batched.tokens[:, 1:], batched.keys, batched.cls_attention, batched.hidden_states[-1][:, 1:]):
        assert torch.isfinite(t).all()
        assert torch.all(t[~mask] == 0)


def test_cls_attention_is_full_width_softmax_of_last_block_cls_query():
    torch.manual_seed(1)
    model = SlideEncoder(tiny_config()).eval()
    feats, coords = torch.randn(1, 20, 12), grid_coords(20)
    mask = torch.ones(1, 20, dtype=torch.bool)
    mask[0, 15:] = False
    last = model.encoder.layers[-1].self_attn
    seen = {}
    h1 = last.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    h2 = last.k_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o))
    with torch.no_grad():
        out = model(feats, coords, mask)
    h1.remove()
    h2.remove()
    q, k = seen["q"], seen["k"]
    scores = (q[0, 0] @ k[0, :16].T) / math.sqrt(32)  # CLS + 15 real tiles
    want = torch.softmax(scores, -1)[1:]
    close(out.cls_attention[0, :15], want, 1e-6)
    assert torch.all(out.cls_attention[0, 15:] == 0)
    close(out.keys[0, :15], k[0, 1:16], 1e-6)
    assert out.cls_attention.shape == (1, 20) and out.keys.shape == (1, 20, 32) and out.tokens.shape == (1, 21, 32)


def test_dropout_and_drop_path_only_in_train_mode():
    torch.manual_seed(2)
    plain = SlideEncoder(tiny_config())
    noisy = SlideEncoder(tiny_config(dropout=0.5, drop_path_rate=0.5))
    noisy.load_state_dict(plain.state_dict())
    feats, coords = torch.randn(2, 9, 12), torch.cat([grid_coords(9)] * 2)
    plain.eval()
    noisy.eval()
    with torch.no_grad():
        assert torch.equal(plain(feats, coords).tokens, noisy(feats, coords).tokens)
        noisy.train()
        assert not torch.allclose(noisy(feats, coords).tokens, plain(feats, coords).tokens)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(3)
    a = SlideEncoder(tiny_config()).train()
    b = SlideEncoder(tiny_config()).train()
    b.load_state_dict(a.state_dict())
    b.gradient_checkpointing_enable()
    assert b.gradient_checkpointing
    feats, coords = torch.randn(1, 13, 12), grid_coords(13)
    mask = torch.ones(1, 13, dtype=torch.bool)
    mask[0, 10:] = False
    for m in (a, b):
        out = m(feats, coords, mask)
        (out.tokens.square().sum() + out.cls_attention.sum() + out.keys.sum()).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if name.startswith("norm."):  # the slide head is only used by embed_slide
            assert pa.grad is None and pb.grad is None
            continue
        assert pa.grad is not None and pa.grad.abs().sum() > 0, name
        close(pa.grad, pb.grad, 1e-5)


def test_chunked_ffn_equals_unchunked():
    torch.manual_seed(4)
    whole = SlideEncoder(tiny_config(ffn_chunk_tokens=0)).eval()
    chunked = SlideEncoder(tiny_config(ffn_chunk_tokens=7)).eval()
    chunked.load_state_dict(whole.state_dict())
    feats, coords = torch.randn(2, 30, 12), torch.cat([grid_coords(30)] * 2)
    with torch.no_grad():
        close(chunked(feats, coords).tokens, whole(feats, coords).tokens, 1e-6)


def test_empty_slide_and_bad_inputs():
    model = SlideEncoder(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 0, 12), torch.zeros(1, 0, 2))
    assert out.tokens.shape == (1, 1, 32) and out.cls_attention.shape == (1, 0)
    with pytest.raises(ValueError, match=r"\[B, N, 12\]"):
        model(torch.zeros(1, 5, 13), torch.zeros(1, 5, 2))
    with pytest.raises(ValueError, match="coords"):
        model(torch.zeros(1, 5, 12), torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="mask"):
        model(torch.zeros(1, 5, 12), torch.zeros(1, 5, 2), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pool"):
        model.embed_slide(out, "max")
    with pytest.raises(ValueError, match="num_heads"):
        SlideEncoderConfig(embed_dim=30, num_heads=4)


def test_published_architecture_has_the_original_247_keys():
    with torch.device("meta"):
        model = SlideEncoder()
    sd = model.state_dict()
    assert len(sd) == 247
    assert sd["cls_token"].shape == (1, 1, 768)
    assert sd["patch_embed.proj.weight"].shape == (768, 1536)
    assert sd["encoder.layers.11.ffn.fc1.weight"].shape == (3072, 768)
    assert sd["encoder.layers.11.ffn.fc2.weight"].shape == (768, 3072)
    assert sd["encoder.layers.0.ffn.ffn_layernorm.weight"].shape == (3072,)
    assert {"encoder.layer_norm.weight", "norm.bias", "encoder.layers.5.self_attn.inner_attn_ln.bias",
            "encoder.layers.5.self_attn_layer_norm.weight", "encoder.layers.5.final_layer_norm.bias"} <= set(sd)
    cfg = SlideEncoderConfig()
    assert cfg.segment_lengths == (1024, 5792, 32768, 185363, 1048576) and cfg.dilations == (1, 2, 4, 8, 16)
    assert model.norm.eps == 1e-6 and model.encoder.layer_norm.eps == 1e-5


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def test_load_published_format_bare_dict_and_safetensors(tmp_path):
    torch.manual_seed(5)
    src = SlideEncoder(tiny_config(in_dim=20, embed_dim=48, depth=3, num_heads=4))
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    feats, coords = torch.randn(1, 6, 20), grid_coords(6)
    with torch.no_grad():
        want = src.eval()(feats, coords).tokens
    torch.save({"model": {**sd, "pos_embed": torch.zeros(1, 5, 48)}}, tmp_path / "slide_encoder.pth")
    torch.save(sd, tmp_path / "bare.pt")
    save_file(sd, str(tmp_path / "w.safetensors"))
    overrides = dict(num_heads=4, segment_lengths=[8, 16], dilations=[1, 2])
    for source in (tmp_path / "slide_encoder.pth", str(tmp_path / "bare.pt"), tmp_path / "w.safetensors", sd):
        model = load_slide_encoder(source, **overrides)
        assert not model.training
        assert (model.config.in_dim, model.config.embed_dim, model.config.depth) == (20, 48, 3)
        for k, v in model.state_dict().items():
            assert torch.equal(v, sd[k]), k
        with torch.no_grad():
            assert torch.equal(model(feats, coords).tokens, want)


def test_strict_loading_lists_missing_unexpected_and_mismatched_keys(tmp_path):
    sd = SlideEncoder(tiny_config()).state_dict()
    broken = dict(sd)
    del broken["encoder.layers.1.ffn.fc2.bias"]
    broken["encoder.layers.0.self_attn.rel_pos.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        load_slide_encoder(broken, num_heads=4, segment_lengths=[8, 16], dilations=[1, 2])
    text = str(err.value)
    assert "missing keys (1)" in text and "encoder.layers.1.ffn.fc2.bias" in text
    assert "unexpected keys (1)" in text and "encoder.layers.0.self_attn.rel_pos.weight" in text
    with pytest.raises(ValueError, match=r"shape mismatches \(10\)") as err:
        load_slide_encoder(sd, num_heads=4, mlp_ratio=2.0, segment_lengths=[8], dilations=[1])
    assert "encoder.layers.0.ffn.fc1.weight: weights (128, 32) vs model (64, 32)" in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_slide_encoder(tmp_path / "nope.pth")
    with pytest.raises(TypeError, match="unknown SlideEncoderConfig"):
        load_slide_encoder(sd, num_head=4)
