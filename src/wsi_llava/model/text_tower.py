"""Text tower of stage 1: any Hugging Face text model from a local folder, masked mean pooling.

``TextTower(input_ids [B, T], attention_mask [B, T]) -> [B, Ht]``: the mean of the last hidden
states over the real (mask 1) tokens. Encoder models (BERT-style) and decoder models (loaded through
``AutoModel``, i.e. without their LM head) both work. Shapes: B batch, T text tokens, Ht text width.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import MissingFileError


class TextTower(nn.Module):
    """A Hugging Face base model + masked mean pooling."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # A BERT-style pooler is not used by mean pooling; without gradients it keeps DDP from
        # waiting for them.
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        """Width Ht of the pooled text embedding."""
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(config.hidden_size)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute the model's blocks in backward (non-reentrant)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] → pooled [B, Ht] (float32)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state.float()  # [B, T, Ht]
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def load_text_tower(path: str | Path) -> tuple[TextTower, object]:
    """``(TextTower, tokenizer)`` from a local folder holding a Hugging Face model and its tokenizer.

    Raises :class:`~wsi_llava.errors.MissingFileError` (a ``FileNotFoundError``) naming the folder when it does not exist (no model hub is used).
    """
    from transformers import AutoModel, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"text_model_name_or_path {str(path)!r} is not a folder; give a local folder with a "
                               "Hugging Face text model and its tokenizer (no model hub is used)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    return TextTower(model), tokenizer


def tokenize_texts(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each text (special tokens added, truncated to ``max_length``) and how many were cut."""
    full = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    cut = sum(len(ids) > max_length for ids in full)
    if cut:
        enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    else:
        enc = full
    return [list(ids) for ids in enc], cut


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padding is masked out either way)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
