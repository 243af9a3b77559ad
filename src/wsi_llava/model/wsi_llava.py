"""WSI-LLaVA: slide tower → token selection → projector → visual tokens merged into a causal LM.

Follows the Hugging Face LLaVA pattern: the prompt holds exactly ``num_image_tokens`` ``<image>``
tokens per slide and one ``masked_scatter`` puts the projected visual tokens at those positions.
The language model is any Hugging Face causal LM; it is kept whole as ``language_model``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel

from ..data.prompts import IGNORE_INDEX, IMAGE_TOKEN
from ..data.tower_output import TowerOutput
from ..errors import MissingFileError
from .configuration import WsiLlavaConfig
from .projector import Projector
from .select import SELECTORS, Selection, SelectOptions
from .towers import build_tower

logger = logging.getLogger(__name__)


@dataclass
class VisualOutput:
    """Projected visual tokens [B, K', H] and the selection that produced them."""

    embeds: torch.Tensor
    selection: Selection


class WsiLlavaForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Slide tower + selector + projector + causal LM (``language_model``)."""

    config_class = WsiLlavaConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: WsiLlavaConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.vision_tower = build_tower(config.vision_mode, config.mm_hidden_size, config.vision_config)
        lm_width = config.text_config.hidden_size
        self.multi_modal_projector = Projector(config.mm_hidden_size, lm_width, config.projector_dropout,
                                               config.gamma_min, config.gamma_max, config.mm_projector_type)
        self.text_query_projection = (nn.Linear(lm_width, config.mm_hidden_size)
                                      if config.vision_feature_select_mode == "prompt_topk" else None)
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    # -- embeddings ------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def _init_weights(self, module):
        """Only our own modules are initialised here; the LM and tower initialise themselves."""
        if isinstance(module, Projector):
            for lin in (module.linear_1, module.linear_2):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
        elif module is self.text_query_projection and module is not None:
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

    # -- train/eval ------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Like ``nn.Module.train`` but frozen parts (no trainable parameter) stay in eval mode, so a
        frozen tower or LM never runs dropout."""
        super().train(mode)
        for part in (self.vision_tower, self.language_model):
            params = list(part.parameters())
            if params and not any(p.requires_grad for p in params):
                part.eval()
        if self.config.freeze_vision_tower:
            self.vision_tower.eval()
        return self

    # -- vision ----------------------------------------------------------------------------------
    def question_query(self, input_ids: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """Prompt top-K query: mean LM embedding of the question's tokens only → tower width.

        input_ids, question_mask [B, T] → [B, D]. Rows without question tokens fall back to the mean
        over all non-image tokens of the row.
        """
        emb = self.get_input_embeddings()(input_ids)
        m = question_mask.to(emb.dtype)
        fallback = (input_ids != self.config.image_token_id).to(emb.dtype)
        has_q = m.sum(1, keepdim=True) > 0
        m = torch.where(has_q, m, fallback)
        mean = (emb * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
        return self.text_query_projection(mean.to(self.text_query_projection.weight.dtype))

    def encode_slides(self, features: torch.Tensor, coords: torch.Tensor, tile_mask: torch.Tensor,
                      query: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      tower_outputs: TowerOutput | None = None) -> VisualOutput:
        """Tiles → projected visual tokens.

        features [B, N, Din], coords [B, N, 2] (x, y), tile_mask [B, N] (True = real), query [B, D] →
        embeds [B, K', H] with K' = ``config.num_image_tokens``.

        Tower-output cache (``tower_cache``, ``data/tower_cache.py``): with ``tower_outputs`` given (tokens
        [B, 1+N, D] of the select layer, CLS first; cls_attention [B, N]; keys [B, N, Dk]) the tower is not
        run and ``features`` are not read (only their device; they may be [B, N, 0]).
        """
        cfg = self.config
        layer = cfg.mm_vision_select_layer
        tower = self.vision_tower
        frozen = cfg.freeze_vision_tower
        dtype = next(iter(self.multi_modal_projector.parameters())).dtype
        if tower_outputs is not None:
            out = self._cached_tower_output(tower_outputs.to(features.device), tile_mask)
            tokens = out.tokens
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                out = tower(features, coords, tile_mask, output_hidden_states=layer != -1)
            tokens = out.tokens if layer == -1 else out.hidden_states[layer]
        has_cls = getattr(tower, "has_cls", True)
        patches = tokens[:, 1:] if has_cls else tokens
        if self.training and generator is None:
            generator = torch.Generator(device=features.device)
            generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        options = SelectOptions(**cfg.select_options) if cfg.select_options else None
        sel = SELECTORS[cfg.vision_feature_select_mode](
            patches, tile_mask, cfg.image_seq_length, cls_attention=out.cls_attention, keys=out.keys,
            query=query, coords=coords, generator=generator, options=options)
        vis = sel.tokens
        if cfg.use_cls_token:
            vis = torch.cat([tokens[:, :1], vis], dim=1)
        return VisualOutput(self.multi_modal_projector(vis.to(dtype)), sel)

    def _cached_tower_output(self, cached: TowerOutput, tile_mask: torch.Tensor) -> TowerOutput:
        """Checked cached tower outputs: tokens [B, 1+N, D] (CLS first, 0 on padded tiles)."""
        cfg = self.config
        if cfg.vision_mode != "wsi" or not cfg.freeze_vision_tower:
            raise ValueError("cached tower outputs (tower_cache) need vision_mode: wsi with a frozen tower; this model "
                             f"has vision_mode {cfg.vision_mode!r}, freeze_vision_tower {cfg.freeze_vision_tower}")
        tokens = cached.tokens
        want = (*tile_mask.shape[:1], tile_mask.shape[1] + 1, cfg.mm_hidden_size)
        if tuple(tokens.shape) != want:
            raise ValueError(f"cached tokens {tuple(tokens.shape)} do not fit the model's tower width "
                             f"mm_hidden_size={cfg.mm_hidden_size} and the {tile_mask.shape[1]} tiles: expected {want} "
                             "(CLS first; tower_cache made by another tower?)")
        patches = tokens[:, 1:].masked_fill(~tile_mask.unsqueeze(-1), 0)
        return replace(cached, tokens=torch.cat([tokens[:, :1], patches], dim=1))

    def merge(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Put visual [B, K', H] at the ``<image>`` positions of inputs_embeds [B, T, H] (one masked_scatter)."""
        image_mask = input_ids == self.config.image_token_id
        per_row = image_mask.sum(1)
        if visual.shape[0] != input_ids.shape[0] or bool((per_row != visual.shape[1]).any()):
            raise ValueError(f"image tokens and visual tokens do not match: the prompts hold {per_row.tolist()} "
                             f"<image> tokens per row but the model produced {visual.shape[1]} visual tokens for each "
                             f"of {visual.shape[0]} slides (image_seq_length/use_cls_token of data and model differ?)")
        mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, visual.to(inputs_embeds.dtype))

    # -- forward / generate ----------------------------------------------------------------------
    def visual_tokens(self, input_ids: torch.Tensor, features: torch.Tensor | None, coords: torch.Tensor | None = None,
                      tile_mask: torch.Tensor | None = None, question_mask: torch.Tensor | None = None,
                      tower_outputs: TowerOutput | None = None) -> VisualOutput:
        """The slides' visual tokens for these prompts (the question steers ``prompt_topk`` selection).

        input_ids, question_mask [B, T]; features [B, N, Din]; coords [B, N, 2]; tile_mask [B, N];
        tower_outputs: cached tower outputs for the B slides (see ``encode_slides``), or None →
        the visual output: embeds [B, K', H] and its selection.
        """
        if features is None:
            raise ValueError("the prompt holds <image> tokens but no slide features were given")
        if tile_mask is None:
            tile_mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        if coords is None:
            coords = torch.zeros((*features.shape[:2], 2), device=features.device)
        query = None
        if self.text_query_projection is not None:
            qmask = question_mask if question_mask is not None else torch.zeros_like(input_ids, dtype=torch.bool)
            query = self.question_query(input_ids, qmask)
        return self.encode_slides(features, coords, tile_mask, query=query, tower_outputs=tower_outputs)

    def prompt_embeds(self, input_ids: torch.Tensor, features: torch.Tensor | None, coords: torch.Tensor | None = None,
                      tile_mask: torch.Tensor | None = None, question_mask: torch.Tensor | None = None,
                      tower_outputs: TowerOutput | None = None) -> tuple[torch.Tensor, VisualOutput]:
        """Text embeddings with the slides' visual tokens at the ``<image>`` positions.

        Arguments as :meth:`visual_tokens` → (inputs_embeds [B, T, H], the visual output with its selection).
        """
        visual = self.visual_tokens(input_ids, features, coords, tile_mask, question_mask, tower_outputs)
        return self.merge(input_ids, self.get_input_embeddings()(input_ids), visual.embeds), visual

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                features: torch.Tensor | None = None, coords: torch.Tensor | None = None,
                tile_mask: torch.Tensor | None = None, question_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                tower_outputs: TowerOutput | None = None, **kwargs):
        """input_ids/attention_mask/labels/question_mask [B, T]; features [B, N, Din]; coords [B, N, 2];
        tile_mask [B, N]. Returns the language model's output (loss, logits [B, T, V], cache).
        With ``tower_outputs`` (cached, tokens [B, 1+N, D]) the tower is skipped (see ``encode_slides``)."""
        if input_ids is not None and bool((input_ids == self.config.image_token_id).any()):
            inputs_embeds, _ = self.prompt_embeds(input_ids, features, coords, tile_mask, question_mask,
                                                  tower_outputs=tower_outputs)
        elif inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if labels is not None and "logits_to_keep" not in kwargs and self._lm_accepts_logits_to_keep():
            return self._supervised_forward(inputs_embeds, attention_mask, labels, **kwargs)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def _lm_accepts_logits_to_keep(self) -> bool:
        lm = self.language_model
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        return "logits_to_keep" in inspect.signature(base.forward).parameters

    def _supervised_forward(self, inputs_embeds, attention_mask, labels, num_items_in_batch=None, **kwargs):
        """Training loss with logits only where a label is predicted (the vocabulary projection of every
        prompt and visual position is skipped). Same loss as the LM's own shifted cross-entropy.

        inputs_embeds [B, T, H], labels [B, T] → output with ``loss`` and ``logits`` [M, V] (M = supervised
        positions, flattened)."""
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  logits_to_keep=keep, **kwargs)
        targets = labels[:, 1:][keep[:, :-1]]
        loss = nn.functional.cross_entropy(out.logits.float(), targets, reduction="sum")
        denom = num_items_in_batch if num_items_in_batch is not None else targets.numel()
        if isinstance(denom, torch.Tensor):
            denom = denom.to(loss.device)
        out.loss = loss / denom
        return out

    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration: bool | None = False, **kwargs):
        """Slide inputs go to the first (prefill) step only; later steps decode from the cache."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("features", "coords", "tile_mask", "question_mask", "tower_outputs"):
                inputs.pop(key, None)
        return inputs

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_llm(cls, llm_name_or_path: str | Path, *, dtype: torch.dtype | None = None,
                 tokenizer=None, **config_kwargs):
        """Build a fresh WSI-LLaVA around a causal LM in a local folder.

        Adds ``<image>`` (and a pad token if the tokenizer has none) and resizes the embeddings.
        Returns ``(model, tokenizer)``. ``config_kwargs`` are :class:`WsiLlavaConfig` fields.
        """
        path = Path(llm_name_or_path)
        if not path.exists():
            raise MissingFileError(f"llm_name_or_path {str(path)!r} does not exist; give a local folder with a "
                                    "Hugging Face causal LM (no model hub is used)")
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        prepare_tokenizer(tokenizer)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
            lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        config = WsiLlavaConfig(text_config=lm.config.to_dict(), image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                                **config_kwargs)
        model = cls(config, language_model=lm)
        model.generation_config = lm.generation_config
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Add ``<image>`` as a special token and make sure a pad token exists (in place)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_wsi_llava(path: str | Path, dtype: torch.dtype | None = None, merge_lora: bool = True):
    """Load a saved WSI-LLaVA folder → ``(model, tokenizer)`` (model in eval mode): a parts folder is
    rebuilt from its checksummed base LM, a full folder loads alone (see :mod:`wsi_llava.model.saving`).
    ``merge_lora``: fold a saved LoRA adapter into the LM."""
    from .saving import load_trained

    path = Path(path)
    if not (path / "config.json").exists():
        raise MissingFileError(f"{path} is not a saved WSI-LLaVA model (no config.json); give the output_dir "
                               "of a training run")
    model = load_trained(path, WsiLlavaForConditionalGeneration, dtype=dtype, merge_lora=merge_lora)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer

