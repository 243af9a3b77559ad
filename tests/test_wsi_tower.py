"""`vision_mode: wsi` in WSI-LLaVA: stage 2 from a random encoder, the frozen tower (eval mode, no
gradient), `mm_vision_select_layer`, the CLS token, and autocast (nothing forces float32)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import set_seed

from wsi_llava.cli import main as cli
from wsi_llava.config import FinetuningArguments, ModelArguments, load_config
from wsi_llava.data.collate import SlideCollator
from wsi_llava.data.prompts import PromptBuilder
from wsi_llava.model.wsi_llava import WsiLlavaForConditionalGeneration
from wsi_llava.train.run import build_model
from wsi_llava.train.stages import set_trainable

pytestmark = pytest.mark.timeout(300)

ENC = dict(embed_dim=16, depth=2, num_heads=2, segment_lengths=[32, 64], dilations=[1, 2])


def make(llm, **kw):
    torch.manual_seed(0)
    kw = {"vision_mode": "wsi", "mm_hidden_size": 16, "vision_config": dict(in_dim=16, **ENC), "image_seq_length": 5,
          **kw}
    return WsiLlavaForConditionalGeneration.from_llm(llm, **kw)


def batch_for(model, tok, n_tiles=(30, 12)):
    b = PromptBuilder(tok, model.config.num_image_tokens, 512)
    g = torch.Generator().manual_seed(1)
    items = []
    for n in n_tiles:
        ex = b.build_train("What is it?", "adenocarcinoma")
        items.append({"input_ids": ex.input_ids, "labels": ex.labels, "question_mask": ex.question_mask,
                      "features": torch.randn(n, 16, generator=g),
                      "coords": torch.randint(0, 20000, (n, 2), generator=g).float()})
    return SlideCollator(tok.pad_token_id)(items)


def projector_inputs(model, batch):
    seen = []
    h = model.multi_modal_projector.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        h.remove()
    return seen[0]


def test_stage2_trains_from_a_random_encoder_shaped_by_vision_config(tiny_llm, cohort, tmp_path):
    cfg = dict(llm_name_or_path=str(tiny_llm), vision_mode="wsi", vision_config=ENC, image_seq_length=4,
               vision_feature_select_mode="prumerge", dataset=str(cohort.train_csv), patches_per_wsi=48,
               cutoff_len=512, stage="sft", finetuning_type="full", output_dir=str(tmp_path / "run"),
               per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1, eval_strategy="no",
               save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=4)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(path)]) == 0
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["vision_mode"] == "wsi" and saved["mm_hidden_size"] == 16
    assert {k: saved["vision_config"][k] for k in ENC} == ENC and saved["vision_config"]["in_dim"] == 16
    losses = [h["loss"] for h in json.loads((run / "log_history.json").read_text()) if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # the random tower is the one the run built (same seed), unchanged by training; the projector trained
    set_seed(4)
    fresh, _ = build_model(load_config(path), 16)
    trained = load_file(run / "model.safetensors")
    tower = {k: v for k, v in fresh.state_dict().items() if k.startswith("vision_tower.")}
    assert len(tower) == 1 + 2 + 2 * 20 + 2 + 2  # cls, patch_embed, 2 blocks of 20, encoder.layer_norm, norm
    assert all(torch.equal(trained[k], v) for k, v in tower.items())
    proj = "multi_modal_projector.linear_1.weight"
    assert not torch.equal(trained[proj], fresh.state_dict()[proj])


def test_frozen_tower_stays_in_eval_mode_and_gets_no_gradient(tiny_llm):
    # dropout 0.5 in the tower: if it ran in train mode, two forward passes would differ
    model, tok = make(tiny_llm, vision_config=dict(in_dim=16, dropout=0.5, drop_path_rate=0.5, **ENC),
                      vision_feature_select_mode="prumerge")
    set_trainable(model, ModelArguments(vision_mode="wsi"), FinetuningArguments(finetuning_type="full"))
    model.train()
    assert model.training and model.multi_modal_projector.training
    assert not any(m.training for m in model.vision_tower.modules())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    batch = batch_for(model, tok)
    out1 = model(**batch)
    out1.loss.backward()
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert model.multi_modal_projector.linear_1.weight.grad is not None
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(model(**batch).loss, out1.loss.detach())
    # an unfrozen tower does train (and runs with autograd)
    model, tok = make(tiny_llm, vision_feature_select_mode="prumerge")
    set_trainable(model, ModelArguments(vision_mode="wsi", freeze_vision_tower=False),
                  FinetuningArguments(finetuning_type="full"))
    assert model.vision_tower.training
    model(**batch_for(model, tok)).loss.backward()
    assert model.vision_tower.patch_embed.proj.weight.grad.abs().sum() > 0


def test_select_layer_chooses_the_hidden_state_fed_to_the_projector(tiny_llm):
    last, tok = make(tiny_llm, vision_feature_select_mode="none", mm_vision_select_layer=-1)
    before, _ = make(tiny_llm, vision_feature_select_mode="none", mm_vision_select_layer=-2)
    before.load_state_dict(last.state_dict())
    last.eval(), before.eval()
    batch = batch_for(last, tok)
    a, b = projector_inputs(last, batch), projector_inputs(before, batch)
    assert a.shape == b.shape == (2, 5, 16)
    assert not torch.allclose(a, b, atol=1e-3)
    with torch.no_grad():
        out = last.vision_tower(batch["features"], batch["coords"], batch["tile_mask"], output_hidden_states=True)
    # selector "none" keeps the first 5 real tiles: -1 = final normalised tokens, -2 = before the last block
    torch.testing.assert_close(a, out.tokens[:, 1:6])
    torch.testing.assert_close(b, out.hidden_states[-2][:, 1:6])
    assert not torch.allclose(out.hidden_states[-1][:, 1:6], a, atol=1e-3)  # -1 is normalised, not the raw state


def test_cls_token_kept_gives_k_plus_one_image_tokens(tiny_llm):
    model, tok = make(tiny_llm, use_cls_token=True, vision_feature_select_mode="prumerge")
    model.eval()
    assert model.config.num_image_tokens == 6
    batch = batch_for(model, tok)
    image_id = model.config.image_token_id
    assert ((batch["input_ids"] == image_id).sum(1) == 6).all()
    x = projector_inputs(model, batch)
    assert x.shape == (2, 6, 16)
    with torch.no_grad():
        out = model.vision_tower(batch["features"], batch["coords"], batch["tile_mask"])
    torch.testing.assert_close(x[:, 0], out.tokens[:, 0])  # CLS first
    # a prompt built for K tokens does not fit a model producing K + 1
    no_cls, _ = make(tiny_llm, vision_feature_select_mode="prumerge")
    with pytest.raises(ValueError, match="image tokens and visual tokens do not match"):
        no_cls(**batch)


def test_tower_runs_in_the_autocast_dtype(tiny_llm):
    """Nothing in the visual path forces float32: under bf16 autocast the tower computes in bf16 (on GPU the
    same autocast makes SDPA pick its flash kernels)."""
    model, tok = make(tiny_llm, vision_feature_select_mode="prumerge", use_cls_token=True)
    model.eval()
    dtypes = []
    model.vision_tower.register_forward_hook(lambda m, a, out: dtypes.append((out.tokens.dtype, out.keys.dtype)))
    batch = batch_for(model, tok)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    assert dtypes == [(torch.bfloat16, torch.bfloat16)]
    assert torch.isfinite(loss)
