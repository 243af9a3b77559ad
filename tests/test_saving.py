"""Save what trains: parts + a checksummed base-LM reference in outputs and checkpoints; strict rebuild;
clear errors for a missing or changed base; merged export; LoRA and full fine-tuning round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from wsi_llava.cli import main as cli
from wsi_llava.config import FinetuningArguments, ModelArguments
from wsi_llava.data.collate import SlideCollator
from wsi_llava.data.prompts import PromptBuilder
from wsi_llava.model import saving
from wsi_llava.model.saving import BaseModelError
from wsi_llava.model.wsi_llava import WsiLlavaForConditionalGeneration, load_wsi_llava
from wsi_llava.train import checkpoint as ck
from wsi_llava.train.stages import set_trainable

pytestmark = pytest.mark.timeout(300)


def keys_and_bytes(path: Path) -> tuple[list[str], int]:
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        return keys, sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)


@pytest.fixture(scope="module", params=["tiny_llm", "tiny_llm_untied"])
def short_base(request, tmp_path_factory) -> Path:
    """The tiny LM (tied or untied head) with one embedding row fewer than its tokenizer, so building
    WSI-LLaVA adds a row (``resize_token_embeddings(mean_resizing=True)``: random), which the saved parts
    must carry."""
    tiny_llm = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp("short_base")
    lm = AutoModelForCausalLM.from_pretrained(tiny_llm)
    lm.resize_token_embeddings(lm.get_input_embeddings().weight.shape[0] - 1)
    lm.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llm).save_pretrained(out)
    return out


def build(llm, **kw):
    torch.manual_seed(0)
    return WsiLlavaForConditionalGeneration.from_llm(llm, **{"mm_hidden_size": 16, "image_seq_length": 6, **kw})


def batch_for(model, tok):
    b = PromptBuilder(tok, model.config.num_image_tokens, 512)
    g = torch.Generator().manual_seed(1)
    items = []
    for n, q, a in ((30, "What is it?", "adenocarcinoma"), (9, "Grade?", "2")):
        ex = b.build_train(q, a)
        items.append({"input_ids": ex.input_ids, "labels": ex.labels, "question_mask": ex.question_mask,
                      "features": torch.randn(n, 16, generator=g), "coords": torch.randint(0, 5000, (n, 2), generator=g)})
    return SlideCollator(tok.pad_token_id)(items)


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def trained(llm, finetuning_type="full", **margs):
    """A model set up for a stage, its trainable tensors moved away from their initial values."""
    model, tok = build(llm)
    fargs = FinetuningArguments(finetuning_type=finetuning_type, lora_target="all", lora_rank=4)
    set_trainable(model, ModelArguments(**margs), fargs)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model, tok


def save(model, tok, folder: Path) -> str:
    kind = saving.save_trained(model, folder)
    tok.save_pretrained(folder)
    return kind


# ------------------------------------------------------------------------------------ a real run
def test_projector_only_run_saves_no_lm_weights(tiny_llm, cohort, tmp_path):
    run = tmp_path / "run"
    cfg = dict(llm_name_or_path=str(tiny_llm), dataset=str(cohort.train_csv), image_seq_length=6, patches_per_wsi=32,
               cutoff_len=512, stage="sft", output_dir=str(run), per_device_train_batch_size=2, max_steps=2,
               learning_rate=5e-3, report_to="none", save_steps=2, seed=7, dataloader_num_workers=0,
               disable_tqdm=True, finetuning_type="full", freeze_language_model=True)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli(["train", str(tmp_path / "c.yaml")]) == 0
    base_bytes = (Path(tiny_llm) / "model.safetensors").stat().st_size
    for folder in (run, run / "checkpoint-2"):
        keys, nbytes = keys_and_bytes(folder / "model.safetensors")
        assert keys and all(k.startswith("multi_modal_projector.") for k in keys), keys
        assert nbytes < base_bytes / 20  # the LM (tied 512 x 64 embeddings and 2 layers) is not in it
        info = json.loads((folder / saving.PARTS_NAME).read_text())
        assert info["base_lm"]["resolved"] == str(Path(tiny_llm).resolve())
        assert info["base_lm"]["sha256"] == saving.base_checksum(tiny_llm)["sha256"]
    ck.verify_checkpoint(run / "checkpoint-2")
    model, _ = load_wsi_llava(run)
    again, _ = load_wsi_llava(run / "checkpoint-2")  # a checkpoint loads the same way
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------------------------ round trips
def test_projector_only_round_trip_identical_logits_with_added_token_rows(short_base, tmp_path):
    model, tok = trained(short_base, freeze_language_model=True)
    rows = json.loads((short_base / "config.json").read_text())["vocab_size"]
    assert model.get_input_embeddings().weight.shape[0] == rows + 1  # one row added by from_llm
    batch = batch_for(model, tok)
    batch["input_ids"][0, -1] = rows  # the added token is also read
    ref = logits(model, batch)
    assert save(model, tok, tmp_path / "out") == "parts"
    keys, _ = keys_and_bytes(tmp_path / "out" / "model.safetensors")
    assert not [k for k in keys if k.startswith("language_model.")]
    loaded, _ = load_wsi_llava(tmp_path / "out")
    assert torch.equal(logits(loaded, batch), ref)
    for emb in ("get_input_embeddings", "get_output_embeddings"):
        assert torch.equal(getattr(loaded, emb)().weight[rows:], getattr(model, emb)().weight[rows:])
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied


def test_lora_round_trip_unmerged_and_merged(tiny_llm, tmp_path):
    model, tok = trained(tiny_llm, finetuning_type="lora")
    batch = batch_for(model, tok)
    ref = logits(model, batch)
    assert save(model, tok, tmp_path / "out") == "parts"
    keys, _ = keys_and_bytes(tmp_path / "out" / "model.safetensors")
    lm_keys = [k for k in keys if k.startswith("language_model.")]
    assert lm_keys and all("lora_" in k for k in lm_keys)  # the adapter only, unmerged
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    unmerged, _ = load_wsi_llava(tmp_path / "out", merge_lora=False)
    assert torch.equal(logits(unmerged, batch), ref)
    merged, _ = load_wsi_llava(tmp_path / "out")
    assert not hasattr(merged.language_model, "peft_config")
    assert torch.allclose(logits(merged, batch), ref, atol=1e-5)


def test_full_finetuning_saves_the_whole_model(tiny_llm, tmp_path):
    model, tok = trained(tiny_llm, freeze_language_model=False)
    batch = batch_for(model, tok)
    ref = logits(model, batch)
    assert save(model, tok, tmp_path / "out") == "full"
    assert not (tmp_path / "out" / saving.PARTS_NAME).exists()
    loaded, _ = load_wsi_llava(tmp_path / "out")
    assert torch.equal(logits(loaded, batch), ref)
    # continuing from it: its LM is this folder's, so a later save is full again, never parts of the base
    assert saving.base_folder(loaded) is None


# ------------------------------------------------------------------------------------ the base LM
def test_missing_or_changed_base_is_a_clear_error(tiny_llm, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llm, base)
    model, tok = trained(base, freeze_language_model=True)
    save(model, tok, tmp_path / "out")
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BaseModelError, match=rf"{base}, whose weights have changed.*model.safetensors"):
        load_wsi_llava(tmp_path / "out")
    shutil.rmtree(base)
    with pytest.raises(BaseModelError, match=rf"base LM folder {base.resolve()}, which is missing"):
        load_wsi_llava(tmp_path / "out")


def test_merged_export_loads_without_the_base(tiny_llm, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_llm, base)
    model, tok = trained(base, finetuning_type="lora")
    batch = batch_for(model, tok)
    save(model, tok, tmp_path / "run")
    want = logits(load_wsi_llava(tmp_path / "run")[0], batch)
    assert torch.allclose(want, logits(model, batch), atol=1e-5)
    assert cli(["export-merged", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    assert "loads without the base LM" in capsys.readouterr().out
    shutil.rmtree(base)
    with pytest.raises(BaseModelError):
        load_wsi_llava(tmp_path / "run")
    merged, tok2 = load_wsi_llava(tmp_path / "merged")
    assert not (tmp_path / "merged" / saving.PARTS_NAME).exists()
    assert torch.equal(logits(merged, batch), want)
    assert len(tok2) == len(tok)
    assert cli(["export-merged", str(tmp_path / "run"), str(tmp_path / "merged")]) == 2  # exists: refused


# ------------------------------------------------------------------------------------ a frozen tower from a file
ENC = dict(embed_dim=16, depth=2, num_heads=2, segment_lengths=[32, 64], dilations=[1, 2], in_dim=16)


def test_frozen_tower_from_a_file_is_referenced_not_copied(tiny_llm, tmp_path):
    """A frozen slide tower loaded from a weights file is saved as that file + its sha256 (not in
    model.safetensors); it loads back from the file (identical logits); a changed or missing file is a
    clear error; a tower that trains is saved among the parts."""
    from wsi_llava.model.export import save_tower

    model, tok = build(tiny_llm, vision_mode="wsi", vision_config=ENC)
    tower_file = save_tower(model.vision_tower, tmp_path / "tower.safetensors")
    setattr(model, saving.TOWER_SOURCE, Path(tower_file).resolve())
    set_trainable(model, ModelArguments(vision_mode="wsi", freeze_vision_tower=True, freeze_language_model=True),
                  FinetuningArguments(finetuning_type="full"))
    with torch.no_grad():
        model.multi_modal_projector.linear_1.weight.add_(0.1)
    batch = batch_for(model, tok)
    want = logits(model, batch)
    assert save(model, tok, tmp_path / "out") == "parts"
    keys, _ = keys_and_bytes(tmp_path / "out" / "model.safetensors")
    assert keys and not any(k.startswith("vision_tower.") for k in keys), keys
    info = json.loads((tmp_path / "out" / saving.PARTS_NAME).read_text())
    assert info["vision_tower"]["path"] == str(Path(tower_file).resolve())
    again, _ = load_wsi_llava(tmp_path / "out")
    assert torch.equal(logits(again, batch), want)
    assert getattr(again, saving.TOWER_SOURCE) == Path(tower_file).resolve()  # a later save refers to it again

    moved = tmp_path / "tower.moved"
    shutil.move(tower_file, moved)
    with pytest.raises(BaseModelError, match="frozen slide tower .* missing"):
        load_wsi_llava(tmp_path / "out")
    other, _ = build(tiny_llm, vision_mode="wsi", vision_config=ENC)
    with torch.no_grad():
        other.vision_tower.norm.weight.add_(1.0)
    save_tower(other.vision_tower, tower_file)
    with pytest.raises(BaseModelError, match="frozen slide tower .* changed"):
        load_wsi_llava(tmp_path / "out")

    for p in model.vision_tower.parameters():  # a tower that trains is one of the parts
        p.requires_grad_(True)
    save(model, tok, tmp_path / "out_trained")
    keys, _ = keys_and_bytes(tmp_path / "out_trained" / "model.safetensors")
    assert any(k.startswith("vision_tower.") for k in keys)
    assert "vision_tower" not in json.loads((tmp_path / "out_trained" / saving.PARTS_NAME).read_text())


def test_export_tower_follows_a_referenced_tower(tiny_llm, tmp_path):
    from wsi_llava.model.export import read_tower_weights, save_tower

    model, tok = build(tiny_llm, vision_mode="wsi", vision_config=ENC)
    tower_file = save_tower(model.vision_tower, tmp_path / "tower.safetensors")
    setattr(model, saving.TOWER_SOURCE, Path(tower_file).resolve())
    set_trainable(model, ModelArguments(vision_mode="wsi", freeze_vision_tower=True, freeze_language_model=True),
                  FinetuningArguments(finetuning_type="full"))
    save(model, tok, tmp_path / "out")
    got = read_tower_weights(tmp_path / "out")
    want = read_tower_weights(tower_file)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_lora_adapter_of_a_resized_vocabulary_holds_no_embeddings(short_base, tmp_path):
    """With added tokens (resized embeddings) PEFT's save would copy the whole embedding matrices into the
    adapter ("auto"); the adapter holds only LoRA tensors, the added rows are in added_tokens.safetensors."""
    model, tok = trained(short_base, finetuning_type="lora")
    batch = batch_for(model, tok)
    ref = logits(model, batch)
    save(model, tok, tmp_path / "out")
    keys, _ = keys_and_bytes(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert keys and all("lora_" in k for k in keys), [k for k in keys if "lora_" not in k][:5]
    assert (tmp_path / "out" / saving.ADDED_NAME).is_file()
    unmerged, _ = load_wsi_llava(tmp_path / "out", merge_lora=False)
    assert torch.equal(logits(unmerged, batch), ref)


def test_an_unloadable_full_folder_is_an_error_not_a_random_model(tiny_llm, tmp_path):
    """A LoRA run over a full model folder saves its checkpoints in full with PEFT-wrapped LM tensors; loading
    such a folder as a model would leave the LM at random: it is refused, naming the missing tensors."""
    model, tok = trained(tiny_llm, freeze_language_model=False)
    save(model, tok, tmp_path / "full")
    again, _ = load_wsi_llava(tmp_path / "full")  # a full folder loads
    set_trainable(again, ModelArguments(freeze_language_model=True),
                  FinetuningArguments(finetuning_type="lora", lora_target="all", lora_rank=4))
    assert hasattr(again.language_model, "peft_config")  # LoRA-wrapped
    assert saving.save_trained(again, tmp_path / "lora_over_full") == "full"
    tok.save_pretrained(tmp_path / "lora_over_full")
    with pytest.raises(saving.WsiLlavaError, match="not in its weights"):
        load_wsi_llava(tmp_path / "lora_over_full")
