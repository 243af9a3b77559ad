"""WsiLlavaForConditionalGeneration: merge, mismatch errors, save/load, untied heads, stages, LoRA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from wsi_llava.config import FinetuningArguments, ModelArguments
from wsi_llava.data.collate import SlideCollator
from wsi_llava.data.prompts import PromptBuilder
from wsi_llava.model.projector import Projector
from wsi_llava.model.wsi_llava import WsiLlavaForConditionalGeneration, load_wsi_llava
from wsi_llava.train.stages import load_projector, save_projector, set_trainable


def make(llm, **kw):
    torch.manual_seed(0)
    kw = {"mm_hidden_size": 16, "image_seq_length": 6, **kw}
    return WsiLlavaForConditionalGeneration.from_llm(llm, **kw)


def batch_for(model, tok, n_tiles=(30, 9), questions=("What is it?", "Grade?"), answers=("adenocarcinoma", "2")):
    b = PromptBuilder(tok, model.config.num_image_tokens, 512)
    g = torch.Generator().manual_seed(1)
    items = []
    for n, q, a in zip(n_tiles, questions, answers):
        ex = b.build_train(q, a)
        items.append({"input_ids": ex.input_ids, "labels": ex.labels, "question_mask": ex.question_mask,
                      "features": torch.randn(n, 16, generator=g), "coords": torch.randint(0, 5000, (n, 2), generator=g)})
    return SlideCollator(tok.pad_token_id)(items)


def test_forward_merges_visual_tokens_and_loss_matches_plain_lm(tiny_llm):
    model, tok = make(tiny_llm)
    model.eval()
    batch = batch_for(model, tok)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # the loss path that skips unsupervised logits equals the LM's own loss on the merged embeddings
    with torch.no_grad():
        emb = model.get_input_embeddings()(batch["input_ids"])
        vis = model.encode_slides(batch["features"], batch["coords"], batch["tile_mask"]).embeds
        merged = model.merge(batch["input_ids"], emb, vis)
        ref = model.language_model(inputs_embeds=merged, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(out.loss, ref, atol=1e-5)
    # visual tokens are really used: other features change the loss
    batch2 = dict(batch, features=batch["features"] * -3.0)
    assert not torch.allclose(model(**batch2).loss, out.loss)


def test_padded_tiles_never_reach_the_llm(tiny_llm):
    model, tok = make(tiny_llm, vision_feature_select_mode="none")
    model.eval()
    batch = batch_for(model, tok, n_tiles=(30, 9))
    poisoned = batch["features"].clone()
    poisoned[~batch["tile_mask"]] = 1e4
    with torch.no_grad():
        a = model(**batch).loss
        b = model(**dict(batch, features=poisoned)).loss
    assert torch.equal(a, b)


def test_image_token_count_mismatch_is_a_clear_error(tiny_llm):
    model, tok = make(tiny_llm)
    batch = batch_for(model, tok)
    ids = batch["input_ids"].clone()
    first = (ids[0] == model.config.image_token_id).nonzero()[0, 0]
    ids[0, first] = tok.pad_token_id
    with pytest.raises(ValueError, match=r"image tokens and visual tokens do not match.*\[5, 6\]"):
        model(**dict(batch, input_ids=ids))
    with pytest.raises(ValueError, match="no slide features"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_save_load_identical_logits_and_untied_head_kept(tiny_llm_untied, tmp_path):
    model, tok = make(tiny_llm_untied)
    model.eval()
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    batch = batch_for(model, tok)
    # text-only logits equal the standalone LM's: the untied head was loaded, not re-initialised
    lm = AutoModelForCausalLM.from_pretrained(tiny_llm_untied).eval()
    text = torch.tensor([[5, 60, 61, 62, 63]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=text).logits[..., : lm.config.vocab_size], lm(input_ids=text).logits, atol=1e-5)
        ref = model(**batch).logits
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_wsi_llava(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, ref)
    assert len(tok2) == len(tok) and tok2.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert (tmp_path / "model.safetensors").exists()


def test_generate_is_deterministic_and_uses_the_slide(tiny_llm):
    model, tok = make(tiny_llm)
    model.eval()
    b = PromptBuilder(tok, model.config.num_image_tokens, 512)
    items = [{"input_ids": b.build_generation(q).input_ids, "question_mask": b.build_generation(q).question_mask,
              "features": torch.randn(n, 16), "coords": torch.zeros(n, 2)} for q, n in (("What?", 12), ("Grade of it?", 7))]
    batch = SlideCollator(tok.pad_token_id, padding_side="left")(items)
    g1 = model.generate(**batch, max_new_tokens=6, do_sample=False)
    g2 = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(g1, g2) and g1.shape[1] == batch["input_ids"].shape[1] + 6
    # cached decoding equals recomputing the whole prefix
    g3 = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(g1, g3)


def test_stage2_trains_projector_only_and_frozen_parts_stay_in_eval_mode(tiny_llm):
    model, _ = make(tiny_llm)
    set_trainable(model, ModelArguments(freeze_language_model=True), FinetuningArguments(finetuning_type="full"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("multi_modal_projector.") for n in trainable)
    model.train()
    assert model.multi_modal_projector.training
    assert not model.language_model.training
    assert not any(m.training for m in model.language_model.modules())


def test_stage3_lora_trains_adapters_and_projector(tiny_llm):
    model, _ = make(tiny_llm)
    fargs = FinetuningArguments(finetuning_type="lora", lora_target=["q_proj", "v_proj", "linear_1", "linear_2"], lora_rank=4)
    set_trainable(model, ModelArguments(), fargs)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert {n for n in trainable if "lora" not in n} == {n for n, _ in model.multi_modal_projector.named_parameters(prefix="multi_modal_projector")}
    assert not any("lora" in n for n, _ in model.multi_modal_projector.named_parameters())
    assert model.language_model.training  # LoRA dropout needs train mode


def test_full_finetuning_unfreezes_lm(tiny_llm):
    model, _ = make(tiny_llm)
    set_trainable(model, ModelArguments(freeze_language_model=False), FinetuningArguments(finetuning_type="full"))
    assert all(p.requires_grad for p in model.language_model.parameters())


def test_lora_adapter_round_trip(tiny_llm, tmp_path):
    from peft import PeftModel

    model, tok = make(tiny_llm)
    set_trainable(model, ModelArguments(), FinetuningArguments(finetuning_type="lora", lora_target="all", lora_rank=4))
    with torch.no_grad():
        for n, p in model.language_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.eval()
    text = torch.tensor([[5, 60, 61, 62, 63, 64]])
    with torch.no_grad():
        ref = model.language_model(input_ids=text).logits
    model.language_model.save_pretrained(tmp_path / "adapter")
    base, _ = make(tiny_llm)
    with torch.no_grad():  # before from_pretrained, which injects the adapter into this very module
        plain = base.language_model.eval()(input_ids=text).logits
    # the adapter matters: without it the logits differ clearly (not by rounding) ...
    assert (plain - ref).abs().max() > 1e-2
    reloaded = PeftModel.from_pretrained(base.language_model, tmp_path / "adapter").eval()
    with torch.no_grad():
        # ... the reloaded adapter restores the adapted logits, and switched off gives the base model back
        assert torch.allclose(reloaded(input_ids=text).logits, ref, atol=1e-6)
        with reloaded.disable_adapter():
            assert torch.allclose(reloaded(input_ids=text).logits, plain, atol=1e-6)


def test_projector_gamma_is_bounded():
    p = Projector(8, 12, gamma_min=1.2, gamma_max=1.8)
    for logit in (-50.0, 0.0, 50.0):
        p.gamma_logit.data.fill_(logit)
        gamma = float(p.gamma.detach())
        assert gamma >= 1.2 - 1e-6 and gamma <= 1.8 + 1e-6
    p.gamma_logit.data.fill_(0.0)
    assert float(p.gamma) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="gamma_max"):
        Projector(8, 12, gamma_min=2.0, gamma_max=1.0)
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        Projector(8, 12, projector_type="linear")


def test_projector_handoff_is_strict_and_keeps_gamma(tiny_llm, tmp_path, caplog):
    model, _ = make(tiny_llm, gamma_min=1.2, gamma_max=1.8, vision_feature_select_mode="prompt_topk")
    with torch.no_grad():
        model.multi_modal_projector.gamma_logit.fill_(0.7)
    gamma = float(model.multi_modal_projector.gamma)
    path = save_projector(model, tmp_path / "projector.safetensors")
    from safetensors.torch import load_file

    assert any(k.startswith("text_query_projection.") for k in load_file(path))  # the query projection is saved
    stage3, _ = make(tiny_llm, gamma_min=1.8, gamma_max=1.9, vision_feature_select_mode="prompt_topk")
    load_projector(stage3, path)
    assert float(stage3.multi_modal_projector.gamma) == pytest.approx(gamma)
    assert (stage3.config.gamma_min, stage3.config.gamma_max) == (1.2, 1.8)
    assert "gamma bounds" in caplog.text
    wrong, _ = make(tiny_llm, mm_hidden_size=24)
    with pytest.raises(ValueError, match="does not fit the model.*linear_1"):
        load_projector(wrong, path)
