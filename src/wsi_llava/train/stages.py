"""What trains in each stage: freezing, LoRA adapters, and the projector hand-off file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import FinetuningArguments, ModelArguments
from ..errors import MissingFileError
from ..model.wsi_llava import WsiLlavaForConditionalGeneration

logger = logging.getLogger(__name__)

PROJECTOR_PREFIXES = ("multi_modal_projector.", "text_query_projection.")
PROJECTOR_MODULES = ("linear_1", "linear_2")


def set_trainable(model: WsiLlavaForConditionalGeneration, margs: ModelArguments, fargs: FinetuningArguments) -> None:
    """Freeze/unfreeze parts for the stage and, for ``finetuning_type: lora``, wrap the LM with PEFT.

    Stage 2 (``full`` + ``freeze_language_model``): only the projector (and the prompt top-K query
    projection) trains. Stage 3 (``lora``): LoRA adapters on the LM + the projector. ``full`` without
    ``freeze_language_model``: the whole LM trains. ``freeze``: the last ``freeze_trainable_layers`` LM
    layers train. The tower trains only with ``freeze_vision_tower: false``.
    """
    model.requires_grad_(False)
    lm = model.language_model
    if fargs.finetuning_type == "lora":
        model.language_model = apply_lora(lm, fargs)
    elif fargs.finetuning_type == "full":
        lm.requires_grad_(not margs.freeze_language_model)
    elif fargs.finetuning_type == "freeze":
        layers = _decoder_layers(lm)
        for layer in layers[-fargs.freeze_trainable_layers:]:
            layer.requires_grad_(True)
    model.multi_modal_projector.requires_grad_(not margs.freeze_multi_modal_projector)
    if model.text_query_projection is not None:
        model.text_query_projection.requires_grad_(not margs.freeze_multi_modal_projector)
    model.vision_tower.requires_grad_(not margs.freeze_vision_tower)
    model.config.freeze_vision_tower = margs.freeze_vision_tower
    model.train()


def _decoder_layers(lm) -> list[torch.nn.Module]:
    """The LM's list of transformer blocks (the largest ``ModuleList``)."""
    lists = [m for m in lm.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError("finetuning_type: freeze needs an LM with a list of layers")
    return list(max(lists, key=len))


def lora_targets(lm, target) -> list[str]:
    """LoRA target module names found in the LM. ``all`` = every Linear except the output head.
    Projector names (``linear_1``, ``linear_2``) are dropped: the projector trains fully instead."""
    names = [t.strip() for t in target.split(",")] if isinstance(target, str) else list(target)
    linear_names = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    head = lm.get_output_embeddings()
    head_names = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if m is head}
    if names == ["all"]:
        return sorted(linear_names - head_names)
    dropped = [n for n in names if n in PROJECTOR_MODULES]
    if dropped:
        logger.info("lora_target %s name the projector, which trains fully instead of through LoRA", dropped)
    names = [n for n in names if n not in PROJECTOR_MODULES]
    missing = [n for n in names if n not in linear_names]
    if missing:
        raise ValueError(f"lora_target {missing} are not Linear modules of the language model; "
                         f"available: {sorted(linear_names)}")
    return names


def apply_lora(lm, fargs: FinetuningArguments):
    """Wrap the LM with new LoRA adapters (PEFT)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=fargs.lora_rank, lora_alpha=fargs.lora_alpha or 2 * fargs.lora_rank,
                     lora_dropout=fargs.lora_dropout, target_modules=lora_targets(lm, fargs.lora_target),
                     task_type="CAUSAL_LM")
    return get_peft_model(lm, cfg)


def projector_state(model: WsiLlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The projector's (and prompt top-K query projection's) tensors, with their model key names."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(PROJECTOR_PREFIXES)}


def save_projector(model: WsiLlavaForConditionalGeneration, path: str | Path) -> Path:
    """Write the projector hand-off file (safetensors, atomic) with its shape config as metadata."""
    path = Path(path)
    cfg = model.config
    meta = {"wsi_llava_projector": json.dumps({
        "mm_hidden_size": cfg.mm_hidden_size, "hidden_size": cfg.text_config.hidden_size,
        "mm_projector_type": cfg.mm_projector_type, "gamma_min": cfg.gamma_min, "gamma_max": cfg.gamma_max,
        "vision_feature_select_mode": cfg.vision_feature_select_mode})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(projector_state(model), str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_projector(model: WsiLlavaForConditionalGeneration, path: str | Path) -> None:
    """Load a projector file strictly. Gamma bounds stored in the file win over the config's (the same
    logit must mean the same gamma in every stage); a difference is logged."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"projector_path {path} does not exist; point it at the projector.safetensors a "
                               "stage-2 run wrote into its output_dir, or remove the key to start from a new projector")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("wsi_llava_projector", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"projector file {path} is not a readable safetensors file ({e})") from e
    own = projector_state(model)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in set(own) & set(tensors) if tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"projector file {path} does not fit the model: missing {missing}, unexpected {unexpected}, "
                         f"shape mismatches {shapes} (check mm_hidden_size, the LM, vision_feature_select_mode)")
    if meta and (meta["gamma_min"], meta["gamma_max"]) != (model.config.gamma_min, model.config.gamma_max):
        logger.warning("projector %s was trained with gamma bounds [%s, %s]; using them instead of the config's "
                       "[%s, %s] so the trained gamma is kept", path, meta["gamma_min"], meta["gamma_max"],
                       model.config.gamma_min, model.config.gamma_max)
        set_gamma_bounds(model, meta["gamma_min"], meta["gamma_max"])
    model.load_state_dict(tensors, strict=False)


def set_gamma_bounds(model: WsiLlavaForConditionalGeneration, gamma_min: float, gamma_max: float) -> None:
    """Set the projector's gamma bounds in the module and in the saved config."""
    model.config.gamma_min, model.config.gamma_max = float(gamma_min), float(gamma_max)
    model.multi_modal_projector.gamma_min = float(gamma_min)
    model.multi_modal_projector.gamma_max = float(gamma_max)
