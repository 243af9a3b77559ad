"""Tower-output cache: `wsi-llava encode` files, sampling like load_slide, resume, and training / predict
from the cache giving what running the frozen tower gives."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from wsi_llava.cli import main as cli
from wsi_llava.data.collate import SlideCollator
from wsi_llava.data.dataset import SlideQADataset
from wsi_llava.data.manifest import load_manifest
from wsi_llava.data.prompts import PromptBuilder
from wsi_llava.data.slides import SlideError, load_slide
from wsi_llava.data.tower_cache import (TowerCache, TowerCacheError, cache_file_name, cache_for_model,
                                        canonical_layer, tower_identity)
from wsi_llava.infer.embed import unique_slides
from wsi_llava.infer.encode import build_tower_cache
from wsi_llava.model.export import save_tower
from wsi_llava.model.slide_encoder import SlideEncoder, SlideEncoderConfig, load_slide_encoder
from wsi_llava.model.wsi_llava import WsiLlavaForConditionalGeneration

pytestmark = pytest.mark.timeout(300)

ENC = dict(embed_dim=16, depth=2, num_heads=2, segment_lengths=[32, 64], dilations=[1, 2])


def write_config(path: Path, **kw) -> Path:
    path.write_text(yaml.safe_dump(kw, sort_keys=False))
    return path


def raw_coords_xy(path) -> np.ndarray:
    """A slide H5's coordinates in file order, as (x, y)."""
    with h5py.File(path, "r") as f:
        return f["coords_yx"][:][:, ::-1].astype(np.float32) if "coords_yx" in f else f["coords"][:].astype(np.float32)


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    torch.manual_seed(11)
    enc = SlideEncoder(SlideEncoderConfig(in_dim=16, **ENC))
    return save_tower(enc, tmp_path_factory.mktemp("tower") / "tower.safetensors")


@pytest.fixture(scope="module")
def encoder(tower):
    return load_slide_encoder(tower, **ENC)


@pytest.fixture(scope="module")
def cache_dir(tower, cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "tower_cache"
    assert cli(["encode", "--vision-tower", str(tower), "--data", str(cohort.all_csv), "--out", str(out),
                "--device", "cpu", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def slides(cohort):
    return unique_slides(load_manifest(cohort.all_csv))


def full_tower_output(encoder, path, layer=-1):
    s = load_slide(path, None)
    with torch.no_grad():
        out = encoder(torch.from_numpy(s.features)[None], torch.from_numpy(s.coords)[None],
                      output_hidden_states=layer != -1)
    tokens = out.tokens if layer == -1 else out.hidden_states[layer]
    return s, tokens[0], out.cls_attention[0], out.keys[0]


# ------------------------------------------------------------------------------------------ files


def test_encode_writes_one_file_per_slide_with_the_tower_outputs_in_file_order(cache_dir, slides, encoder, tower):
    names = sorted(p.name for p in cache_dir.iterdir())
    assert names == sorted(cache_file_name(r.slide_id) for r in slides)
    ident = tower_identity(encoder)
    for r in slides[:4]:  # includes a slide stored as coords_yx (every third)
        s, tokens, cls_attn, keys = full_tower_output(encoder, r.h5_path)
        with h5py.File(cache_dir / cache_file_name(r.slide_id), "r") as f:
            n = s.n_total
            assert f["tokens"].dtype == np.float16 and f["tokens"].shape == (n, 16)
            assert f["keys"].dtype == np.float16 and f["keys"].shape == (n, 16)
            assert f["cls_attention"].dtype == np.float32 and f["cls_attention"].shape == (n,)
            assert f["cls_token"].shape == (16,) and f["coords"].shape == (n, 2)
            assert f["tokens"].chunks is None and f["keys"].chunks is None  # contiguous: memory-mapped reads
            assert f.attrs["tower_sha256"] == ident.sha256 and int(f.attrs["select_layer"]) == -1
            assert int(f.attrs["n_tiles"]) == n and f.attrs["source_h5"] == r.h5_path
            assert f.attrs["slide_id"] == r.slide_id
            coords = f["coords"][:]
            assert np.array_equal(coords, raw_coords_xy(r.h5_path))  # row i = tile i of the source file
            # map the tower's spatial rows to file rows through the coordinates
            row_of = {tuple(c): i for i, c in enumerate(coords)}
            rows = np.array([row_of[tuple(c)] for c in s.coords])
            np.testing.assert_allclose(f["tokens"][:][rows], tokens[1:].numpy(), rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(f["keys"][:][rows], keys.numpy(), rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(f["cls_attention"][:][rows], cls_attn.numpy(), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(f["cls_token"][:], tokens[0].numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seeded", [True, False])
def test_read_samples_the_same_tiles_as_load_slide(cache_dir, slides, encoder, seeded):
    cache = TowerCache(cache_dir, tower_identity(encoder))
    for r in slides[:6]:
        for k in (7, 33, 500):
            rng_a = np.random.default_rng([0, 1, 2]) if seeded else None
            rng_b = np.random.default_rng([0, 1, 2]) if seeded else None
            got = cache.read(r.slide_id, k, rng_a)
            ref = load_slide(r.h5_path, k, rng_b)
            assert np.array_equal(got.coords, ref.coords)  # same tiles, same spatial order
            t = got.tower_outputs
            assert got.features.shape == (len(ref.coords), 0)  # no tile features: the tower outputs stand in
            assert t.tokens.shape == (len(ref.coords) + 1, 16) and t.keys.shape == (len(ref.coords), 16)
            full = cache.read(r.slide_id, None)
            ft = full.tower_outputs
            pos = {tuple(c): i for i, c in enumerate(full.coords)}
            rows = [pos[tuple(c)] for c in got.coords]
            assert torch.equal(t.tokens[1:], ft.tokens[1:][rows])
            assert torch.equal(t.cls_attention, ft.cls_attention[rows])
            assert torch.equal(t.tokens[0], ft.tokens[0])  # the CLS token


def test_canonical_layer():
    assert canonical_layer(-1, 12) == -1
    assert canonical_layer(-2, 12) == canonical_layer(11, 12) == 11
    assert canonical_layer(0, 12) == 0 and canonical_layer(-13, 12) == 0
    with pytest.raises(ValueError, match="out of range"):
        canonical_layer(13, 12)


def test_slide_ids_become_safe_file_names():
    assert cache_file_name("TCGA-AB-1234") == "TCGA-AB-1234.h5"
    assert cache_file_name("a/b c") == "a%2Fb%20c.h5"
    assert "/" not in cache_file_name("../../etc")
    with pytest.raises(TowerCacheError):
        cache_file_name("")


# ------------------------------------------------------------------------------------------ resume


def test_resume_skips_current_files_and_replaces_stale_ones(cache_dir, slides, encoder, tmp_path, tower, cohort, capsys):
    work = tmp_path / "cache"
    shutil.copytree(cache_dir, work)
    files = {r.slide_id: work / cache_file_name(r.slide_id) for r in slides}
    mtimes = {k: p.stat().st_mtime_ns for k, p in files.items()}
    capsys.readouterr()
    assert cli(["encode", "--vision-tower", str(tower), "--data", str(cohort.all_csv), "--out", str(work),
                "--no-progress"]) == 0
    assert f"0 encoded, {len(slides)} already cached, 0 replaced" in capsys.readouterr().out
    assert {k: p.stat().st_mtime_ns for k, p in files.items()} == mtimes

    a, b, c = slides[0].slide_id, slides[1].slide_id, slides[2].slide_id
    files[a].unlink()                                   # interrupted before this slide
    files[b].write_bytes(b"not an hdf5 file")           # damaged
    shutil.copy(files[slides[3].slide_id], files[c])     # another slide's file (tile count differs)
    counts = build_tower_cache(encoder, slides, work, progress=False)
    assert counts == {"encoded": 1, "skipped": len(slides) - 3, "replaced": 2}
    cache = TowerCache(work, tower_identity(encoder))
    for r in slides[:3]:
        cache.check(r.slide_id, load_slide(r.h5_path, None).n_total)
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]

    torch.manual_seed(5)  # other weights: every file is redone
    other = SlideEncoder(SlideEncoderConfig(in_dim=16, **ENC))
    counts = build_tower_cache(other, slides[:2], work, progress=False)
    assert counts == {"encoded": 0, "skipped": 0, "replaced": 2}


def test_select_layer_minus_two_caches_that_hidden_state(slides, encoder, tmp_path):
    counts = build_tower_cache(encoder, slides[:2], tmp_path, select_layer=-2, progress=False)
    assert counts["encoded"] == 2
    r = slides[1]
    s, tokens, _, _ = full_tower_output(encoder, r.h5_path, layer=-2)
    cached = TowerCache(tmp_path, tower_identity(encoder, -2)).read(r.slide_id, None)
    assert np.array_equal(cached.coords, s.coords)
    got = cached.tower_outputs.tokens.numpy()
    np.testing.assert_allclose(got[1:], tokens[1:].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got[0], tokens[0].numpy(), rtol=1e-6, atol=1e-6)
    with h5py.File(tmp_path / cache_file_name(r.slide_id), "r") as f:
        assert int(f.attrs["select_layer"]) == 1  # -2 of a 2-block encoder = hidden_states[1]
    _, final, _, _ = full_tower_output(encoder, r.h5_path, layer=-1)
    assert not np.allclose(got[1:], final[1:].numpy(), atol=1e-2)


# ------------------------------------------------------------------------------------------ errors


def test_mismatches_are_errors_naming_the_file(cache_dir, slides, encoder, tmp_path):
    r = slides[0]
    path = str(cache_dir / cache_file_name(r.slide_id))
    torch.manual_seed(99)
    other = SlideEncoder(SlideEncoderConfig(in_dim=16, **ENC))
    with pytest.raises(TowerCacheError, match="other tower weights") as e:
        TowerCache(cache_dir, tower_identity(other)).check(r.slide_id)
    assert path in str(e.value)
    with pytest.raises(TowerCacheError, match="select layer -1 but the model uses mm_vision_select_layer 1") as e:
        TowerCache(cache_dir, tower_identity(encoder, -2)).read(r.slide_id, 8)
    assert path in str(e.value)
    same_weights_other_heads = load_slide_encoder(encoder.state_dict(), **{**ENC, "num_heads": 4})
    with pytest.raises(TowerCacheError, match="another architecture: num_heads: cache 2 vs model 4"):
        TowerCache(cache_dir, tower_identity(same_weights_other_heads)).check(r.slide_id)
    with pytest.raises(TowerCacheError, match="caches .* tiles but the slide file has 3"):
        TowerCache(cache_dir, tower_identity(encoder)).check(r.slide_id, n_tiles=3)
    with pytest.raises(TowerCacheError, match="is not a folder"):
        TowerCache(tmp_path / "nowhere")


def test_dataset_refuses_missing_slides_listing_file_and_row(cache_dir, cohort, encoder, tiny_llm, tmp_path):
    from transformers import AutoTokenizer

    partial = tmp_path / "partial"
    shutil.copytree(cache_dir, partial)
    records = load_manifest(cohort.train_csv)
    gone = records[0]
    (partial / cache_file_name(gone.slide_id)).unlink()
    tok = AutoTokenizer.from_pretrained(tiny_llm)
    builder = PromptBuilder(tok, 5, 512)
    with pytest.raises(TowerCacheError) as e:
        SlideQADataset(records, builder, 64, tower_cache=TowerCache(partial, tower_identity(encoder)))
    msg = str(e.value)
    assert str(partial / cache_file_name(gone.slide_id)) in msg and gone.where in msg and "wsi-llava encode" in msg


def test_cache_needs_a_frozen_wsi_tower(tiny_llm, cache_dir):
    torch.manual_seed(0)
    model, _ = WsiLlavaForConditionalGeneration.from_llm(tiny_llm, mm_hidden_size=16, image_seq_length=4)
    with pytest.raises(TowerCacheError, match="needs vision_mode: wsi"):
        cache_for_model(cache_dir, model)
    model, _ = WsiLlavaForConditionalGeneration.from_llm(tiny_llm, vision_mode="wsi", mm_hidden_size=16,
                                                         vision_config=dict(in_dim=16, **ENC), image_seq_length=4,
                                                         freeze_vision_tower=False)
    with pytest.raises(TowerCacheError, match="freeze_vision_tower: false"):
        cache_for_model(cache_dir, model)


def test_encode_stops_at_an_unreadable_slide_naming_the_row(encoder, cohort, tmp_path):
    with open(cohort.train_csv, newline="") as f:
        rows = list(csv.DictReader(f))[:3]
    broken = tmp_path / "broken.h5"
    with h5py.File(broken, "w") as f:
        f["features"] = np.full((5, 16), np.nan, dtype=np.float32)
        f["coords"] = np.zeros((5, 2), dtype=np.int64)
    rows[1]["slide_id"] = "SYN-9999"  # keep rows 2 and 4 on their own slides
    rows[2].update(h5_path=str(broken), slide_id="BROKEN-1")
    for r in rows[:2]:
        r["h5_path"] = str(cohort.train_csv.parent / r["h5_path"])
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "cache"
    with pytest.raises(SlideError, match=r"bad.csv line 4 \[h5_path\].*broken.h5"):
        build_tower_cache(encoder, unique_slides(load_manifest(bad)), out, progress=False)
    assert (out / "SYN-9999.h5").is_file() and not (out / "BROKEN-1.h5").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------ model, training, predict


def _model_with_tower(tiny_llm, tower, **kw):
    torch.manual_seed(0)
    model, tok = WsiLlavaForConditionalGeneration.from_llm(
        tiny_llm, vision_mode="wsi", mm_hidden_size=16, vision_config=dict(in_dim=16, **ENC), image_seq_length=5,
        **kw)
    model.vision_tower.load_state_dict(load_slide_encoder(tower, **ENC).state_dict())
    return model, tok


@pytest.mark.parametrize("mode", ["prumerge", "random_sample"])
def test_forward_from_cache_equals_running_the_tower_and_skips_it(tiny_llm, tower, cache_dir, cohort, mode):
    model, tok = _model_with_tower(tiny_llm, tower, use_cls_token=True, vision_feature_select_mode=mode)
    records = load_manifest(cohort.train_csv)[:4]
    builder = PromptBuilder(tok, model.config.num_image_tokens, 512)
    collate = SlideCollator(tok.pad_token_id)
    raw = collate([SlideQADataset(records, builder, 128, training=True, seed=3)[i] for i in range(4)])
    cached_ds = SlideQADataset(records, builder, 128, training=True, seed=3, tower_cache=cache_for_model(cache_dir, model))
    cached = collate([cached_ds[i] for i in range(4)])
    t = cached["tower_outputs"]
    n = cached["tile_mask"].shape[1]
    assert cached["features"].shape == (4, n, 0) and t.tokens.shape == (4, n + 1, 16)
    assert t.keys.shape == (4, n, 16) and t.cls_attention.shape == cached["tile_mask"].shape
    assert torch.equal(cached["coords"], raw["coords"]) and torch.equal(cached["tile_mask"], raw["tile_mask"])
    calls = []
    model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    with torch.no_grad():
        g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        sel_raw = model.encode_slides(raw["features"], raw["coords"], raw["tile_mask"], generator=g1)
        assert len(calls) == 1
        sel_cached = model.encode_slides(cached["features"], cached["coords"], cached["tile_mask"], generator=g2,
                                         tower_outputs=t)
        assert len(calls) == 1  # the tower did not run
        assert torch.equal(sel_raw.selection.indices, sel_cached.selection.indices)
        torch.testing.assert_close(sel_cached.embeds, sel_raw.embeds, rtol=5e-3, atol=5e-3)
        loss_raw = model(**raw).loss
        loss_cached = model(**cached).loss
    assert len(calls) == 2
    assert abs(loss_raw.item() - loss_cached.item()) < 1e-5 * abs(loss_raw.item())


@pytest.fixture(scope="module")
def stage2_runs(tiny_llm, tower, cohort, cache_dir, tmp_path_factory):
    """Stage 2 from the saved tower file, without and with the cache (same seed)."""
    root = tmp_path_factory.mktemp("s2")
    runs = {}
    for name, extra in (("tower", {}), ("cache", {"tower_cache": str(cache_dir)})):
        cfg = dict(llm_name_or_path=str(tiny_llm), vision_mode="wsi", vision_tower=str(tower), vision_config=ENC,
                   image_seq_length=4, use_cls_token=True, vision_feature_select_mode="prumerge",
                   dataset=str(cohort.train_csv), eval_dataset=str(cohort.test_csv), patches_per_wsi=128,
                   cutoff_len=512, stage="sft", finetuning_type="full", output_dir=str(root / name),
                   per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1,
                   eval_strategy="steps", eval_steps=2, save_strategy="no", do_sanity_check=True, report_to="none",
                   disable_tqdm=True, dataloader_num_workers=0, seed=0, **extra)
        assert cli(["train", str(write_config(root / f"{name}.yaml", **cfg))]) == 0
        runs[name] = root / name
    return runs


def test_stage2_with_cache_gives_the_tower_run_losses(stage2_runs, tower):
    hist = {k: json.loads((p / "log_history.json").read_text()) for k, p in stage2_runs.items()}
    # float16 tokens move the loss by ~1e-7 here; zeroing the visual tokens moves it by ~5e-5, and the
    # projector's gradient norm (a direct function of the visual tokens) by far more
    for key, rtol in (("loss", 1e-5), ("eval_loss", 1e-5), ("grad_norm", 1e-3)):
        a = [h[key] for h in hist["tower"] if key in h]
        b = [h[key] for h in hist["cache"] if key in h]
        assert len(a) == len(b) >= 1
        np.testing.assert_allclose(b, a, rtol=rtol)
    assert any("eval_sanity_check_loss" in h for h in hist["cache"])
    # the frozen tower is the file's, unchanged, in both runs: saved as a reference to the file (not a copy)
    # and loaded back from it
    from wsi_llava.model.saving import PARTS_NAME
    from wsi_llava.model.wsi_llava import load_wsi_llava

    weights = load_file(tower)
    for run in stage2_runs.values():
        assert not any(k.startswith("vision_tower.") for k in load_file(run / "model.safetensors"))
        assert json.loads((run / PARTS_NAME).read_text())["vision_tower"]["path"] == str(Path(tower).resolve())
        loaded = load_wsi_llava(run)[0].vision_tower.state_dict()
        for k, v in weights.items():
            assert torch.equal(loaded[k], v), k


def test_stage2_refuses_a_cache_of_another_select_layer(tiny_llm, tower, cohort, cache_dir, tmp_path):
    cfg = dict(llm_name_or_path=str(tiny_llm), vision_mode="wsi", vision_tower=str(tower), vision_config=ENC,
               image_seq_length=4, mm_vision_select_layer=-2, tower_cache=str(cache_dir),
               dataset=str(cohort.train_csv), patches_per_wsi=128, cutoff_len=512, stage="sft", finetuning_type="full",
               output_dir=str(tmp_path / "run"), max_steps=1, report_to="none", dataloader_num_workers=0)
    with pytest.raises(TowerCacheError, match=r"select layer -1 but the model uses mm_vision_select_layer 1"):
        cli(["--debug", "train", str(write_config(tmp_path / "c.yaml", **cfg))])


def test_predict_with_cache_matches_predict_with_tower(stage2_runs, cohort, cache_dir, tmp_path):
    model = stage2_runs["cache"]
    base = ["predict", "--model", str(model), "--data", str(cohort.test_csv), "--max-new-tokens", "3",
            "--batch-size", "4", "--explain"]
    assert cli(base + ["--out", str(tmp_path / "tower.jsonl")]) == 0
    assert cli(base + ["--out", str(tmp_path / "cache.jsonl"), "--tower-cache", str(cache_dir)]) == 0
    a = [json.loads(x) for x in (tmp_path / "tower.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == len(load_manifest(cohort.test_csv))  # one row per question, in both runs
    assert [x["prediction"] for x in a] == [x["prediction"] for x in b]
    assert [x["tiles"] for x in a] == [x["tiles"] for x in b]
    # a slide missing from the cache is a per-row error naming the file, not zeros
    partial = tmp_path / "partial"
    shutil.copytree(cache_dir, partial)
    gone = load_manifest(cohort.test_csv)[0].slide_id
    os.remove(partial / cache_file_name(gone))
    assert cli(base + ["--out", str(tmp_path / "p.jsonl"), "--tower-cache", str(partial)]) == 1
    errors = [json.loads(x) for x in (tmp_path / "p.errors.jsonl").read_text().splitlines()]
    assert errors and all(cache_file_name(gone) in e["error"] for e in errors)


def test_chat_with_cache_answers_like_chat_with_tower(stage2_runs, cohort, cache_dir, capsys):
    model = stage2_runs["cache"]
    rec = load_manifest(cohort.test_csv)[0]
    base = ["chat", "--model", str(model), "--slide", rec.h5_path, "--question", "What is the diagnosis?",
            "--max-new-tokens", "3", "--explain"]
    assert cli(base) == 0
    with_tower = capsys.readouterr().out
    assert cli(base + ["--tower-cache", str(cache_dir), "--slide-id", rec.slide_id]) == 0
    assert capsys.readouterr().out == with_tower  # same answer, same tiles
    with pytest.raises(TowerCacheError, match="no-such-slide"):
        cli(["--debug", *base, "--tower-cache", str(cache_dir), "--slide-id", "no-such-slide"])
    with pytest.raises(SystemExit, match="only applies with --tower-cache"):
        cli(base + ["--slide-id", rec.slide_id])


def test_heatmap_selection_from_cache_equals_the_tower(stage2_runs, cohort, cache_dir):
    from wsi_llava.infer.engine import SlideAssistant
    from wsi_llava.infer.heatmap import select_tiles

    rec = load_manifest(cohort.test_csv)[0]
    plain = SlideAssistant.from_pretrained(stage2_runs["cache"], device="cpu")
    cached = SlideAssistant.from_pretrained(stage2_runs["cache"], device="cpu", tower_cache=cache_dir)
    calls = []
    cached.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    a = select_tiles(plain, plain.load(rec.h5_path), patch_size=256)
    b = select_tiles(cached, cached.load(rec.h5_path, slide_id=rec.slide_id), patch_size=256)
    assert not calls  # the cached outputs were used, the tower did not run
    assert np.array_equal(a.coords, b.coords) and np.array_equal(a.indices, b.indices)
    np.testing.assert_allclose(b.scores, a.scores, rtol=5e-3, atol=1e-5)


def test_collated_tower_outputs_are_padded_and_checked_by_the_model(tiny_llm, tower):
    from wsi_llava.data.collate import stack_tower_outputs
    from wsi_llava.data.tower_output import TowerOutput

    def one(n):
        return TowerOutput(tokens=torch.rand(n + 1, 16), cls_attention=torch.rand(n), keys=torch.rand(n, 16).half())

    a, b = one(3), one(5)
    out = stack_tower_outputs([a, b], 5)
    assert out.tokens.shape == (2, 6, 16) and out.cls_attention.shape == (2, 5) and out.keys.shape == (2, 5, 16)
    assert out.keys.dtype == torch.float32 and out.hidden_states is None
    assert torch.equal(out.tokens[0, :4], a.tokens) and not out.tokens[0, 4:].any() and not out.keys[0, 3:].any()
    zero = out.zeros_like()
    assert zero.tokens.shape == out.tokens.shape and not zero.tokens.any() and not zero.keys.any()
    model, _ = _model_with_tower(tiny_llm, tower)
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    with torch.no_grad():
        vis = model.encode_slides(torch.zeros(2, 5, 0), torch.zeros(2, 5, 2), mask, tower_outputs=out)
        assert vis.embeds.shape == (2, model.config.num_image_tokens, model.config.text_config.hidden_size)
        narrow = TowerOutput(tokens=torch.rand(2, 6, 8))
        with pytest.raises(ValueError, match=r"cached tokens \(2, 6, 8\).*mm_hidden_size=16"):
            model.encode_slides(torch.zeros(2, 5, 0), torch.zeros(2, 5, 2), mask, tower_outputs=narrow)
