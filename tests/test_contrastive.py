"""Stage 1: InfoNCE (multi-positive, log-sum-exp, gathered), retrieval metrics, pairs, model (masks,
freezing, checkpointing), export-tower, embed, and the CLI chain stage 1 → export → stage 2."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from wsi_llava.cli import main as cli
from wsi_llava.model.wsi_llava import load_wsi_llava
from wsi_llava.config import ConfigError, config_from_dict, config_reference
from wsi_llava.data.manifest import Record, load_manifest
from wsi_llava.data.slide_text import PairError, SlideTextCollator, build_pairs
from wsi_llava.model.retrieval import chance, ranks_of, slide_text_retrieval
from wsi_llava.model.export import export_tower, load_tower, read_tower_weights, save_tower, saved_tower_config
from wsi_llava.model.slide_encoder import SlideEncoder, SlideEncoderConfig, load_slide_encoder
from wsi_llava.model.slide_text import (
    SlideTextConfig,
    SlideTextModel,
    gather_rows,
    multi_positive_nce,
    positive_mask,
    symmetric_nce,
)
from wsi_llava.model.text_tower import load_text_tower
from wsi_llava.tiny import build_tiny_text_encoder

pytestmark = pytest.mark.timeout(300)

ENC = dict(embed_dim=32, depth=2, num_heads=4, segment_lengths=[32, 64], dilations=[1, 2])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def diag_keys(n: int) -> torch.Tensor:
    """Keys where every pair is its own group and text (only the diagonal is positive)."""
    i = torch.arange(n)
    return torch.stack([i, i, i], 1)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------
def test_symmetric_nce_equals_clip_cross_entropy_on_diagonal_positives():
    g = torch.Generator().manual_seed(0)
    s, t = unit(torch.randn(6, 8, generator=g)), unit(torch.randn(6, 8, generator=g))
    scale = torch.tensor(14.3)
    logits = scale * s @ t.T
    target = torch.arange(6)
    ref = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    torch.testing.assert_close(symmetric_nce(s, t, diag_keys(6), scale), ref)


def test_huge_logits_do_not_overflow():
    logits = torch.tensor([[1e4, 0.0, -1e4], [5e3, 5e3, -5e3]])
    pos = torch.tensor([[False, True, False], [True, False, False]])
    naive = -torch.log((logits.exp() * pos).sum(1) / logits.exp().sum(1))
    assert not torch.isfinite(naive).all()  # the seed's formula overflows here
    loss = multi_positive_nce(logits, pos)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, torch.tensor([1e4, math.log(2.0)]), atol=2e-3, rtol=1e-6)
    x = logits.clone().requires_grad_(True)
    multi_positive_nce(x, pos).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_multi_positive_duplicates_and_case_groups():
    # pairs 0,1 share a case; pairs 2,3 carry the identical report text
    keys = torch.tensor([[0, 0, 0], [1, 0, 1], [2, 2, 2], [3, 3, 2]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(positive_mask(keys, keys), expected)
    # identical texts embed identically: single-positive CLIP is stuck at log 2, multi-positive reaches ~0
    s = unit(torch.eye(4)[[0, 0, 2, 2]] + 0.0)
    t = s.clone()
    scale = torch.tensor(100.0)
    assert float(symmetric_nce(s, t, keys, scale)) < 1e-6
    assert float(symmetric_nce(s, t, diag_keys(4), scale)) == pytest.approx(math.log(2), abs=1e-4)
    with pytest.raises(ValueError, match="at least one positive"):
        multi_positive_nce(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))


def test_local_losses_against_the_gathered_gallery_give_the_global_gradient():
    """What every process computes under torchrun (its rows vs all rows), averaged as DDP does, has the
    gradient of the whole-batch loss."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 8, generator=g, requires_grad=True)
    xs, xt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    keys, scale = diag_keys(6), torch.tensor(10.0)
    full = symmetric_nce(unit(xs @ w), unit(xt @ w), keys, scale)
    (gw_full,) = torch.autograd.grad(full, w)
    s, t = unit(xs @ w), unit(xt @ w)
    local = [symmetric_nce(s[r], t[r], keys[r], scale, s, t, keys) for r in (slice(0, 3), slice(3, 6))]
    (gw_local,) = torch.autograd.grad(sum(local) / 2, w)
    torch.testing.assert_close(gw_local, gw_full)
    torch.testing.assert_close(sum(local) / 2, full)


def _gather_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(4, 6, generator=g)
        xs, xt = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
        rows = slice(0, 2) if rank == 0 else slice(2, 5)  # uneven: 2 and 3 rows
        w = w.clone().requires_grad_(True)
        s, t, k = unit(xs[rows] @ w), unit(xt[rows] @ w), diag_keys(5)[rows]
        all_s, off = gather_rows(s, with_grad=True)
        all_t, _ = gather_rows(t, with_grad=True)
        all_k, _ = gather_rows(k, with_grad=False)
        loss = symmetric_nce(s, t, k, torch.tensor(7.0), all_s, all_t, all_k)
        loss.backward()
        grad = w.grad.clone()
        dist.all_reduce(grad)
        grad /= world  # what DDP does
        torch.save({"offset": off, "keys": all_k, "grad": grad, "loss": loss.detach()},
                   Path(result_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_across_two_processes_uneven_batches(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert (r0["offset"], r1["offset"]) == (0, 2)
    assert torch.equal(r0["keys"], diag_keys(5)) and torch.equal(r1["keys"], diag_keys(5))
    # reference in one process: each rank's rows against all rows, averaged
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=g).requires_grad_(True)
    xs, xt = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    s, t, k = unit(xs @ w), unit(xt @ w), diag_keys(5)
    scale = torch.tensor(7.0)
    ref = (symmetric_nce(s[:2], t[:2], k[:2], scale, s, t, k) + symmetric_nce(s[2:], t[2:], k[2:], scale, s, t, k)) / 2
    ref.backward()
    torch.testing.assert_close(r0["grad"], w.grad)
    torch.testing.assert_close(r1["grad"], w.grad)


# ---------------------------------------------------------------------------------------------
# retrieval metrics
# ---------------------------------------------------------------------------------------------
def test_ranks_ties_count_against_the_query_and_chance_formula():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.2, 0.2], [0.1, 0.8, 0.3]])
    pos = torch.eye(3, dtype=torch.bool)
    assert ranks_of(scores, pos).tolist() == [1, 3, 2]  # constant row: worst rank, not best
    c = chance(torch.tensor([1, 2]), 4, "x")
    assert c["x_r1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert c["x_r5"] == 1.0
    assert c["x_mean_rank"] == pytest.approx((5 / 2 + 5 / 3) / 2)
    # chance R@2 against a brute-force count over all orders of 5 items with 2 positives
    from itertools import permutations

    hits = [min(p.index(0), p.index(1)) < 2 for p in permutations(range(5))]
    assert chance(torch.tensor([2]), 5, "y", ks=(2,))["y_r2"] == pytest.approx(np.mean(hits))


def test_slide_text_retrieval_dedupes_and_groups():
    # 3 slides; slide 0 appears twice with the same report (pairs 0 and 1); slides 1 and 2 share a report
    keys = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 1], [2, 2, 1]])
    text = unit(torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]]))
    perfect, base = slide_text_retrieval(text.clone(), text, keys)
    assert perfect["n_slides"] == 3 and perfect["n_texts"] == 2
    assert perfect["s2t_r1"] == 1.0 and perfect["t2s_r1"] == 1.0 and perfect["s2t_median_rank"] == 1.0
    assert base["s2t_r1"] == pytest.approx(0.5) and base["t2s_r1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    swapped, _ = slide_text_retrieval(text.flip(1), text, keys)
    assert swapped["s2t_r1"] == 0.0 and swapped["s2t_mean_rank"] == 2.0
    collapsed, _ = slide_text_retrieval(torch.ones(4, 2) / 2 ** 0.5, text, keys)
    assert collapsed["s2t_r1"] == 0.0  # constant embeddings never look good


# ---------------------------------------------------------------------------------------------
# pairs and batches
# ---------------------------------------------------------------------------------------------
def rec(slide, caption, row, case=None, question=""):
    return Record(h5_path=f"/x/{slide}.h5", slide_id=slide, dataset="d", question=question, answer="a" if question else "",
                  caption=caption, choices=None, split=None, case_id=case, category=None, source="m.csv", row=row)


def test_build_pairs_caption_rows_dedupe_and_case_keys():
    records = [rec("s1", "Tumour A.", 2, "c1"), rec("s1", "tumour  a.", 3, "c1"), rec("s2", "Benign.", 4, "c1"),
               rec("s3", "Benign.", 5), rec("s3", "", 6, question="Grade?")]
    pairs, no_caption = build_pairs(records, "pair")
    assert no_caption == 1 and [p.record.row for p in pairs] == [2, 4, 5]
    keys = [p.keys for p in pairs]
    assert keys[1][2] == keys[2][2] and keys[0][1] != keys[1][1]  # same text key; own groups
    case_pairs, _ = build_pairs(records, "case")
    assert case_pairs[0].keys[1] == case_pairs[1].keys[1] != case_pairs[2].keys[1]  # s3 falls back to its slide
    with pytest.raises(PairError, match=r"m.csv line 7 \[case_id\].*'s1'.*'c2'.*m.csv line 2"):
        build_pairs(records + [rec("s1", "Other.", 7, "c2")], "case")


def test_collator_pads_tiles_and_text():
    items = [{"features": np.ones((3, 4), np.float32), "coords": np.zeros((3, 2), np.float32),
              "input_ids": [5, 6], "keys": (0, 0, 0)},
             {"features": np.ones((1, 4), np.float32), "coords": np.zeros((1, 2), np.float32),
              "input_ids": [7, 8, 9], "keys": (1, 1, 1)}]
    b = SlideTextCollator(pad_token_id=0)(items)
    assert b["features"].shape == (2, 3, 4) and b["tile_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert b["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]] and b["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b["keys"].shape == (2, 3)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory) -> Path:
    return build_tiny_text_encoder(tmp_path_factory.mktemp("text_encoder"))


def make_model(text_encoder, seed=0, **kw) -> SlideTextModel:
    torch.manual_seed(seed)
    text, _ = load_text_tower(text_encoder)
    return SlideTextModel(SlideEncoder(SlideEncoderConfig(in_dim=8, **ENC)), text, SlideTextConfig(projection_dim=16, **kw))


def toy_batch(n_tiles=(20, 7, 13, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    b, n = len(n_tiles), max(n_tiles)
    feats = torch.randn(b, n, 8, generator=g)
    coords = torch.randint(0, 4000, (b, n, 2), generator=g).float()
    mask = torch.arange(n)[None] < torch.tensor(n_tiles)[:, None]
    ids = torch.randint(10, 200, (b, 6), generator=g)
    att = torch.ones(b, 6, dtype=torch.long)
    att[1, 4:] = 0
    return dict(features=feats, coords=coords, tile_mask=mask, input_ids=ids, attention_mask=att, keys=diag_keys(b))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_padding_never_changes_embeddings(text_encoder, pool):
    model = make_model(text_encoder, slide_pool=pool).eval()
    b = toy_batch()
    poisoned = b["features"].masked_fill(~b["tile_mask"][..., None], 1e4)
    with torch.no_grad():
        batched = model.encode_slides(poisoned, b["coords"], b["tile_mask"])
        n = int(b["tile_mask"][1].sum())
        alone = model.encode_slides(b["features"][1:2, :n], b["coords"][1:2, :n], b["tile_mask"][1:2, :n])
        t_batched = model.encode_texts(b["input_ids"], b["attention_mask"])
        t_alone = model.encode_texts(b["input_ids"][1:2, :4], b["attention_mask"][1:2, :4])
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_batched[1:2], t_alone, atol=1e-5, rtol=1e-5)


def test_logit_scale_is_clamped_at_ln_100(text_encoder):
    model = make_model(text_encoder)
    assert float(model.current_logit_scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(8.0)
    assert float(model.current_logit_scale().detach()) == pytest.approx(100.0, rel=1e-5)
    model(**toy_batch())["loss"].backward()
    assert float(model.logit_scale.grad) == 0.0


@pytest.mark.parametrize("frozen", ["slide", "text"])
def test_freezing_either_tower(text_encoder, frozen):
    model = make_model(text_encoder, freeze_slide_tower=frozen == "slide", freeze_text_tower=frozen == "text")
    model.train()
    still, moving = (model.slide_tower, model.text_tower) if frozen == "slide" else (model.text_tower, model.slide_tower)
    assert not still.training and moving.training
    model(**toy_batch())["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in still.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in moving.parameters())
    assert model.slide_projection.weight.grad.abs().sum() > 0 and model.text_projection.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_same_loss_and_gradients(text_encoder):
    grads, losses = [], []
    for ckpt in (False, True):
        model = make_model(text_encoder).train()
        if ckpt:
            model.activation_checkpointing_enable()
            assert model.slide_tower.gradient_checkpointing
        torch.manual_seed(5)
        loss = model(**toy_batch())["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_overfits_one_batch_to_perfect_retrieval(text_encoder):
    model = make_model(text_encoder).train()
    b = toy_batch(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss = model(**b)["loss"]
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        s = model.encode_slides(b["features"], b["coords"], b["tile_mask"])
        t = model.encode_texts(b["input_ids"], b["attention_mask"])
    metrics, _ = slide_text_retrieval(s, t, b["keys"])
    assert float(loss) < 0.1 * first and metrics["s2t_r1"] == 1.0 and metrics["t2s_r1"] == 1.0


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def test_config_contrastive_keys_and_errors():
    base = {"stage": "contrastive", "dataset": "d", "output_dir": "o"}
    with pytest.raises(ConfigError, match="text_model_name_or_path"):
        config_from_dict(base)
    cfg = config_from_dict({**base, "text_model_name_or_path": "t", "slide_pool": "mean", "projection_dim": 64,
                            "contrastive_positives": "case", "freeze_text_tower": True})
    c = cfg.contrastive
    assert (c.slide_pool, c.projection_dim, c.contrastive_positives, c.freeze_text_tower) == ("mean", 64, "case", True)
    assert c.max_logit_scale == pytest.approx(math.log(100))
    with pytest.raises(ConfigError, match="slide_pool 'max'"):
        config_from_dict({**base, "text_model_name_or_path": "t", "slide_pool": "max"})
    with pytest.raises(ConfigError, match="contrastive_positives"):
        config_from_dict({**base, "text_model_name_or_path": "t", "contrastive_positives": "patient"})
    assert "| `text_model_name_or_path` |" in config_reference()


def test_packaged_stage1_config_parses():
    from wsi_llava.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "stage1_contrastive.yaml")
    assert cfg.finetuning.stage == "contrastive" and cfg.contrastive.text_model_name_or_path
    assert cfg.model.freeze_vision_tower is False


# ---------------------------------------------------------------------------------------------
# export and embed
# ---------------------------------------------------------------------------------------------
def small_encoder(seed=0, in_dim=16) -> SlideEncoder:
    torch.manual_seed(seed)
    return SlideEncoder(SlideEncoderConfig(in_dim=in_dim, **ENC))


def test_export_from_prefixed_weights_and_pth(tmp_path):
    from safetensors.torch import save_file

    enc = small_encoder()
    sd = {f"vision_tower.{k}": v for k, v in enc.state_dict().items()}
    sd["language_model.lm_head.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"vision_mode": "wsi", "vision_config": {**ENC, "in_dim": 16}}))
    assert set(read_tower_weights(tmp_path)) == set(enc.state_dict())
    out = export_tower(tmp_path, tmp_path / "out" / "tower.safetensors")
    assert out.config.num_heads == 4 and saved_tower_config(tmp_path / "out" / "tower.safetensors")["depth"] == 2
    pth = tmp_path / "tower.pth"
    save_tower(enc, pth)
    assert set(torch.load(pth, weights_only=True)) == {"model"}  # the published layout
    for path in (tmp_path / "out" / "tower.safetensors", pth):
        again = load_slide_encoder(path, num_heads=4, segment_lengths=ENC["segment_lengths"], dilations=[1, 2])
        assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), again.state_dict().values()))
    assert not list(tmp_path.rglob("*.tmp"))
    save_file({"x.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors: holds no slide encoder"):
        read_tower_weights(tmp_path / "other.safetensors")


def test_embed_cli_one_vector_per_slide(cohort, tmp_path, capsys):
    enc = small_encoder(seed=2)
    save_tower(enc, tmp_path / "tower.safetensors")
    out = tmp_path / "emb.h5"
    assert cli(["embed", "--vision-tower", str(tmp_path / "tower.safetensors"), "--data", str(cohort.test_csv),
                "--out", str(out), "--patches-per-wsi", "32", "--batch-size", "3", "--pool", "mean"]) == 0
    records = load_manifest(cohort.test_csv)
    slide_ids = list(dict.fromkeys(r.slide_id for r in records))
    with h5py.File(out) as f:
        emb, ids = f["embeddings"][:], [s.decode() for s in f["slide_id"][:]]
        assert f.attrs["pool"] == "mean" and json.loads(f.attrs["slide_encoder_config"])["depth"] == 2
        assert f["n_tiles"][:].max() == 32
    assert ids == slide_ids and emb.shape == (len(slide_ids), 32)
    from wsi_llava.data.slides import load_slide
    from wsi_llava.data.collate import pad_tiles

    s = load_slide(records[0].h5_path, 32)
    with torch.no_grad():
        f, c, m = pad_tiles([torch.from_numpy(s.features)], [torch.from_numpy(s.coords)])
        ref = enc.eval().embed_slide(enc(f, c, m), "mean")[0].numpy()
    np.testing.assert_allclose(emb[0], ref, atol=1e-5)
    # an unreadable slide stops the run, names row and file, and leaves no output behind
    bad = tmp_path / "bad.csv"
    lines = cohort.test_csv.read_text().splitlines()
    root = str(cohort.test_csv.parent) + "/"
    bad.write_text("\n".join([lines[0], lines[1].replace("slides/", root + "slides/", 1),
                              lines[2].replace("slides/", root + "nope/", 1)]) + "\n")
    with pytest.raises(ValueError, match=r"bad.csv line 3 \[h5_path\].*nope"):
        cli(["--debug", "embed", "--vision-tower", str(tmp_path / "tower.safetensors"), "--data", str(bad),
             "--out", str(tmp_path / "bad.h5"), "--no-progress"])
    assert not (tmp_path / "bad.h5").exists() and not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# the CLI chain: stage 1 → export-tower → stage 2
# ---------------------------------------------------------------------------------------------
def write_config(path: Path, **kw) -> Path:
    path.write_text(yaml.safe_dump(kw, sort_keys=False))
    return path


#: Stage 1 of the CLI chain: the whole training cohort (12 pairs) per step, 12 steps at a constant rate —
#: enough for slide→report retrieval on the training cohort to leave chance behind (see below).
STAGE1_STEPS, STAGE1_LR = 12, 5e-3


@pytest.fixture(scope="module")
def stage1(cohort, text_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    cfg = write_config(out / "stage1.yaml", stage="contrastive", text_model_name_or_path=str(text_encoder),
                       dataset=str(cohort.train_csv), eval_dataset=str(cohort.test_csv), vision_config=ENC,
                       freeze_vision_tower=False, projection_dim=16, patches_per_wsi=48, output_dir=str(out / "run"),
                       per_device_train_batch_size=12, per_device_eval_batch_size=4, max_steps=STAGE1_STEPS,
                       learning_rate=STAGE1_LR, lr_scheduler_type="constant", logging_steps=1, eval_strategy="steps",
                       eval_steps=STAGE1_STEPS // 2, save_steps=STAGE1_STEPS // 2, seed=1, dataloader_num_workers=0,
                       disable_tqdm=True, gradient_checkpointing=True, report_to="none")
    assert cli(["train", str(cfg)]) == 0
    return out / "run"


def stage1_model_at_init(run: Path):
    """The stage-1 model as ``run_contrastive`` built it before training (same seed, same builder: nothing
    draws random numbers between its ``set_seed`` and the model), the config, and the tokenizer."""
    from transformers import set_seed

    from wsi_llava.train.contrastive import build_stage1_model

    raw = yaml.safe_load((run.parent / "stage1.yaml").read_text())
    cfg = config_from_dict(raw)
    set_seed(raw["seed"])
    model, tok = build_stage1_model(cfg, 16)
    return model, cfg, tok


def retrieval_of(model: SlideTextModel, cfg, tok, manifest: Path, tmp: Path) -> tuple[dict, dict]:
    """Slide↔report retrieval of ``model`` over every pair of ``manifest`` (the evaluation tiles)."""
    from wsi_llava.model.text_tower import pad_token_id
    from wsi_llava.train.contrastive import load_pairs, make_dataset

    pairs = load_pairs(cfg, str(manifest), None, 16, tmp, "eval_dataset")
    ds = make_dataset(pairs, tok, cfg, 16, False, 0, "eval_dataset")
    b = SlideTextCollator(pad_token_id(tok))([ds[i] for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        s = model.encode_slides(b["features"], b["coords"], b["tile_mask"])
        t = model.encode_texts(b["input_ids"], b["attention_mask"])
    return slide_text_retrieval(s, t, b["keys"])


def test_stage1_outputs_and_metrics(stage1, cohort):
    for name in ("model.safetensors", "tower.safetensors", "metrics.json", "log_history.json", "train_config.yaml",
                 "contrastive_config.json", f"checkpoint-{STAGE1_STEPS // 2}"):
        assert (stage1 / name).exists(), name
    m = json.loads((stage1 / "metrics.json").read_text())
    n_test = len({r.slide_id for r in load_manifest(cohort.test_csv)})
    assert m["retrieval"]["n_slides"] == n_test and m["n_pairs"] == n_test and m["step"] == STAGE1_STEPS
    for key in ("s2t_r1", "s2t_r5", "s2t_r10", "s2t_mean_rank", "s2t_median_rank", "t2s_r1", "t2s_mean_rank"):
        assert key in m["retrieval"]
    assert m["chance"]["s2t_r1"] == pytest.approx(0.25)
    # metrics.json is the retrieval of the saved final weights: recomputed from model.safetensors it agrees
    model, cfg, tok = stage1_model_at_init(stage1)
    model.load_state_dict(load_file(stage1 / "model.safetensors"))
    again, chance = retrieval_of(model, cfg, tok, cohort.test_csv, stage1.parent)
    assert again == pytest.approx(m["retrieval"]) and chance == pytest.approx(m["chance"])
    history = json.loads((stage1 / "log_history.json").read_text())
    assert [h["step"] for h in history if "eval_s2t_r1" in h][:2] == [STAGE1_STEPS // 2, STAGE1_STEPS]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == STAGE1_STEPS and all(math.isfinite(x) for x in losses)
    trained = load_file(stage1 / "tower.safetensors")
    assert len(trained) == len(SlideEncoder(SlideEncoderConfig(in_dim=16, **ENC)).state_dict())
    assert all(not k.startswith("slide_tower.") for k in trained)


def test_stage1_trains_the_tower_and_retrieval_beats_chance(stage1, cohort):
    """Stage 1 learns: every slide-tower weight moved (by no more than Adam's steps allow, which also
    shows the rebuilt start is the real one), and slide→report retrieval on the training cohort goes from
    chance with the initial weights to at least twice chance (12 slides, 4 distinct reports: chance 1/4)."""
    model, cfg, tok = stage1_model_at_init(stage1)
    init = {k.removeprefix("slide_tower."): v.clone() for k, v in model.state_dict().items()
            if k.startswith("slide_tower.")}
    before, chance = retrieval_of(model, cfg, tok, cohort.train_csv, stage1.parent)
    trained = load_file(stage1 / "tower.safetensors")
    assert trained.keys() == init.keys()
    moved = {k: float((trained[k] - init[k]).abs().max()) for k in init}
    assert min(moved.values()) > 0, [k for k, d in moved.items() if d == 0]  # every tower tensor trained
    assert max(moved.values()) <= 1.5 * STAGE1_STEPS * STAGE1_LR, max(moved.items(), key=lambda kv: kv[1])
    mid = load_file(stage1 / f"checkpoint-{STAGE1_STEPS // 2}" / "model.safetensors")
    assert any(not torch.equal(mid[f"slide_tower.{k}"], trained[k]) for k in trained)  # still moving after it

    model.load_state_dict(load_file(stage1 / "model.safetensors"))
    after, _ = retrieval_of(model, cfg, tok, cohort.train_csv, stage1.parent)
    assert after["n_slides"] == 12 and after["n_texts"] == 4 and chance["s2t_r1"] == pytest.approx(0.25)
    assert before["s2t_r1"] <= chance["s2t_r1"] + 1 / 12  # the untrained model is at chance ...
    assert after["s2t_r1"] >= 2 * chance["s2t_r1"], (before, after)  # ... the trained one at least twice it
    assert after["s2t_mean_rank"] <= chance["s2t_mean_rank"] - 0.5, (before, after)


def test_export_stage2_chain(stage1, cohort, tiny_llm, tmp_path, capsys):
    tower = tmp_path / "tower.safetensors"
    capsys.readouterr()
    assert cli(["export-tower", str(stage1 / f"checkpoint-{STAGE1_STEPS}"), "--out", str(tower)]) == 0
    printed = capsys.readouterr().out
    assert "vision_mode: wsi" in printed and '"num_heads": 4' in printed
    exported = load_file(tower)
    final = {k.removeprefix("slide_tower."): v for k, v in load_file(stage1 / "model.safetensors").items()
             if k.startswith("slide_tower.")}
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert isinstance(load_tower(tower), SlideEncoder)
    cfg = write_config(tmp_path / "stage2.yaml", llm_name_or_path=str(tiny_llm), vision_mode="wsi",
                       vision_tower=str(tower), vision_config=ENC, image_seq_length=4, dataset=str(cohort.train_csv),
                       patches_per_wsi=32, cutoff_len=512, stage="sft", finetuning_type="full",
                       output_dir=str(tmp_path / "s2"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                       eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
                       dataloader_num_workers=0, seed=0)
    assert cli(["train", str(cfg)]) == 0
    # the tower is stage 1's, unchanged by stage 2 (frozen): referenced by its file, loaded back from it
    assert not any(k.startswith("vision_tower.") for k in load_file(tmp_path / "s2" / "model.safetensors"))
    s2 = load_wsi_llava(tmp_path / "s2")[0].vision_tower.state_dict()
    for k, v in exported.items():
        assert torch.equal(s2[k], v), k


def test_torchrun_two_processes(cohort, text_encoder, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU): gathered negatives, whole-set evaluation without the
    distributed sampler's repeats."""
    import subprocess
    import sys

    cfg = write_config(tmp_path / "ddp.yaml", stage="contrastive", text_model_name_or_path=str(text_encoder),
                       dataset=str(cohort.train_csv), eval_dataset=str(cohort.test_csv), vision_config=ENC,
                       freeze_vision_tower=False, projection_dim=16, patches_per_wsi=32, output_dir=str(tmp_path / "run"),
                       per_device_train_batch_size=3, per_device_eval_batch_size=3, max_steps=2, learning_rate=1e-3,
                       eval_strategy="no", save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
                       report_to="none")
    # ddp_probe (this folder) runs the CLI with a callback that writes each rank's trainable weights
    here = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ddp_probe", str(tmp_path / "ranks"), "train", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 1 on 2 process(es)" in proc.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["n_pairs"] == m["retrieval"]["n_slides"] == len({r.slide_id for r in load_manifest(cohort.test_csv)})
    assert (tmp_path / "run" / "tower.safetensors").exists()
    # after the steps both ranks hold the very same weights, every trainable tensor moved, and rank 0's
    # model.safetensors is what rank 1 ended with
    from ddp_probe import load_dumps

    (begin0, begin1), (end0, end1) = load_dumps(tmp_path / "ranks", 2)
    assert end0.keys() == end1.keys() == begin0.keys() == begin1.keys()
    assert any(k.startswith("slide_tower.") for k in end0) and any(k.startswith("text_tower.") for k in end0)
    assert [k for k in end0 if not torch.equal(end0[k], end1[k])] == []
    assert [k for k in end0 if torch.equal(end0[k], begin0[k])] == []
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert [k for k in end1 if not torch.equal(saved[k], end1[k])] == []
