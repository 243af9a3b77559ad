"""Model configurations: :class:`SlideEncoderConfig` (the GigaPath slide encoder) and
:class:`WsiLlavaConfig` (the whole model), both ``transformers.PreTrainedConfig`` subclasses.

``WsiLlavaConfig`` declares its two parts in ``sub_configs`` the way ``LlavaConfig`` does:
``text_config`` (any Hugging Face LM config) and ``vision_config`` (a :class:`SlideEncoderConfig`),
so ``config.vision_config.embed_dim`` is attribute access and ``config.json`` holds the encoder's
config as a nested object. Folders saved before, whose ``config.json`` holds ``vision_config`` as a
plain dict of encoder fields, load unchanged (the dict becomes a :class:`SlideEncoderConfig`).
``select_options`` and the ``vision_config`` keys are checked when the config is built (unknown
keys with a "did you mean", wrong value types), so a misspelled option fails at load, not at the
first forward step.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ..config import ConfigError
from ..select_options import SelectOptions
from .select import SELECTORS


class SlideEncoderConfig(PreTrainedConfig):
    """Architecture of the slide encoder. Defaults are the published ``gigapath_slide_enc12l768d``.

    Lists are accepted for the tuple fields (JSON configs). :meth:`architecture` gives the encoder's
    own fields as a JSON-friendly dict (without the generic ``PreTrainedConfig`` attributes);
    :meth:`from_fields` builds one from a mapping and rejects unknown names.
    """

    model_type = "wsi_llava_slide_encoder"

    in_dim: int = 1536
    """Width of the tile features (1536 for the Prov-GigaPath tile encoder)."""
    embed_dim: int = 768
    """Token width D; must be divisible by ``num_heads`` and by 4 (2-D sin-cos positions)."""
    depth: int = 12
    """Number of LongNet blocks."""
    num_heads: int = 16
    """Attention heads per block."""
    mlp_ratio: float = 4.0
    """FFN width = round(embed_dim * mlp_ratio)."""
    slide_ngrids: int = 1000
    """Grid side of the original position table (the original's table row of a tile is
    ``floor(x/256) * slide_ngrids + floor(y/256) + 1``). Positions themselves are computed from the
    coordinates and have no limit."""
    tile_size: int = 256
    """Level-0 pixels per position-grid cell: grid = floor(coords / tile_size). The original always
    divides by 256, so keep 256 for the published weights."""
    segment_lengths: tuple[int, ...] | list[int] = (1024, 5792, 32768, 185363, 1048576)
    """LongNet segment length of each attention branch."""
    dilations: tuple[int, ...] | list[int] = (1, 2, 4, 8, 16)
    """LongNet dilation of each attention branch (same length as ``segment_lengths``)."""
    dropout: float = 0.0
    """Dropout on the input tokens, the attention output and the FFN output (train mode only).
    The original's default is 0.25 when fine-tuning; 0 here because the tower is usually frozen."""
    drop_path_rate: float = 0.0
    """Stochastic depth; block i drops with probability linspace(0, rate, depth)[i] (train mode only)."""
    layernorm_eps: float = 1e-5
    """Epsilon of every LayerNorm inside the encoder (``encoder.*``)."""
    norm_eps: float = 1e-6
    """Epsilon of the slide head ``norm``."""
    ffn_chunk_tokens: int = 16384
    """Without autograd, the FFN runs over this many tokens at a time to bound memory (0 = never chunk)."""

    def __post_init__(self, **kwargs):
        self.segment_lengths = tuple(int(s) for s in self.segment_lengths)
        self.dilations = tuple(int(r) for r in self.dilations)
        super().__post_init__(**kwargs)
        problems = []
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % 4:
            problems.append(f"embed_dim {self.embed_dim} must be divisible by 4 for 2-D sin-cos positions")
        if len(self.segment_lengths) != len(self.dilations) or not self.segment_lengths:
            problems.append(f"segment_lengths {list(self.segment_lengths)} and dilations {list(self.dilations)} "
                            "must be non-empty and of equal length")
        if any(s < 1 for s in self.segment_lengths) or any(r < 1 for r in self.dilations):
            problems.append("segment lengths and dilations must be >= 1")
        for name in ("in_dim", "embed_dim", "depth", "num_heads", "tile_size", "slide_ngrids"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if problems:
            raise ValueError("SlideEncoderConfig: " + "; ".join(problems))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The encoder's own fields (``in_dim`` … ``ffn_chunk_tokens``), in declaration order."""
        base = {f.name for f in fields(PreTrainedConfig)}
        return tuple(f.name for f in fields(cls) if f.name not in base)

    @classmethod
    def from_fields(cls, values: Mapping[str, Any] | None = None, **more) -> SlideEncoderConfig:
        """A config from encoder fields; an unknown name raises ``TypeError`` listing the known ones."""
        values = {**(values or {}), **more}
        unknown = unknown_names(values, cls.field_names())
        if unknown:
            raise TypeError(f"unknown SlideEncoderConfig field(s) {unknown}; known: {sorted(cls.field_names())}")
        return cls(**values)

    @property
    def ffn_dim(self) -> int:
        return int(round(self.embed_dim * self.mlp_ratio))

    def architecture(self) -> dict[str, Any]:
        """The encoder's own fields as a JSON-friendly dict (lists instead of tuples)."""
        out = {name: getattr(self, name) for name in self.field_names()}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def unknown_names(values: Mapping[str, Any], known, hint: bool = False) -> list[str]:
    """The keys of ``values`` not in ``known``, sorted; with ``hint`` each as ``'key' (did you mean 'k'?)``."""
    unknown = sorted(str(k) for k in values if k not in known)
    if not hint:
        return unknown
    out = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        out.append(repr(key) + (f" (did you mean {close[0]!r}?)" if close else ""))
    return out


#: Keys a serialised ``PreTrainedConfig`` carries besides its own fields (accepted in a saved
#: ``vision_config``).
_SERIALISED_KEYS = {f.name for f in fields(PreTrainedConfig)} | {"model_type", "_name_or_path", "output_attentions"}


class WsiLlavaConfig(PreTrainedConfig):
    """Configuration of :class:`~wsi_llava.model.wsi_llava.WsiLlavaForConditionalGeneration`.

    Args:
        text_config: the language model's config (dict or ``PreTrainedConfig``).
        vision_config: the slide encoder's :class:`SlideEncoderConfig` (or a dict of its fields), used
            with ``vision_mode: wsi``.
        vision_mode: ``"none"`` (tile features go straight to the projector) or ``"wsi"`` (GigaPath
            slide encoder).
        mm_hidden_size: width D of the tokens entering the projector (feature width for ``none``,
            encoder width for ``wsi``).
        image_seq_length: patch tokens kept per slide (the selection budget K).
        use_cls_token: also feed the tower's CLS token (``wsi`` only); the prompt then holds K + 1
            ``<image>`` tokens.
        vision_feature_select_mode: a key of ``SELECTORS`` (``none``, ``random_sample``, ``prumerge``,
            ``prumerge_plus``, ``prompt_topk``, ``feature_outlier``).
        select_options: ``SelectOptions`` fields (dict), checked here.
        mm_vision_select_layer: which tower state feeds the projector; -1 = the final normalised tokens,
            other values index ``hidden_states`` (0 = input embeddings, i = after block i, -2 = before
            the last block).
        mm_projector_type: only ``mlp2x_gelu``.
        projector_dropout: dropout inside the projector.
        gamma_min, gamma_max: bounds of the projector's learnable output scale.
        image_token_id: id of ``<image>`` in the tokenizer.
        freeze_vision_tower: the tower runs in eval mode under ``no_grad``.
    """

    model_type = "wsi_llava"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
                            "vision_config": SlideEncoderConfig}

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    vision_mode: str = "none"
    mm_hidden_size: int = 1536
    image_seq_length: int = 64
    use_cls_token: bool = False
    vision_feature_select_mode: str = "random_sample"
    select_options: dict | None = None
    mm_vision_select_layer: int = -1
    mm_projector_type: str = "mlp2x_gelu"
    projector_dropout: float = 0.0
    gamma_min: float = 1.0
    gamma_max: float = 1.0
    image_token_id: int | None = None
    freeze_vision_tower: bool = True

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, Mapping):
            unknown = unknown_names(self.vision_config, set(SlideEncoderConfig.field_names()) | _SERIALISED_KEYS,
                                    hint=True)
            if unknown:
                raise ConfigError(f"vision_config: unknown key(s) {', '.join(unknown)}")
            self.vision_config = dict(self.vision_config)
        self.select_options = dict(self.select_options or {})
        self.mm_hidden_size = int(self.mm_hidden_size)
        self.image_seq_length = int(self.image_seq_length)
        self.use_cls_token = bool(self.use_cls_token)
        self.mm_vision_select_layer = int(self.mm_vision_select_layer)
        self.projector_dropout = float(self.projector_dropout)
        self.gamma_min = float(self.gamma_min)
        self.gamma_max = float(self.gamma_max)
        self.freeze_vision_tower = bool(self.freeze_vision_tower)
        super().__post_init__(**kwargs)
        self.validate_wsi()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``PreTrainedConfig.from_pretrained``; a :class:`~wsi_llava.config.ConfigError` names the
        ``config.json`` it came from (loading a model reads its config through this too)."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except ConfigError as e:
            raise ConfigError(f"{Path(pretrained_model_name_or_path) / 'config.json'}: {e}") from None

    def validate_wsi(self) -> None:
        """Reject inconsistent settings with a clear message (:class:`~wsi_llava.config.ConfigError`)."""
        if self.vision_feature_select_mode not in SELECTORS:
            raise ConfigError(f"vision_feature_select_mode {self.vision_feature_select_mode!r} is unknown; "
                              f"choose one of {sorted(SELECTORS)}")
        if self.vision_mode not in ("none", "wsi"):
            raise ConfigError(f"vision_mode {self.vision_mode!r} is not supported; use 'none' or 'wsi'")
        if self.use_cls_token and self.vision_mode == "none":
            raise ConfigError("use_cls_token needs a tower with a CLS token (vision_mode: wsi)")
        if self.image_seq_length < 1:
            raise ConfigError("image_seq_length must be >= 1")
        try:
            SelectOptions.from_mapping(self.select_options)
        except ValueError as e:
            raise ConfigError(f"select_options: {e}") from None

    @property
    def num_image_tokens(self) -> int:
        """``<image>`` tokens per prompt = visual tokens the model produces."""
        return self.image_seq_length + int(self.use_cls_token)

    @property
    def feature_dim(self) -> int:
        """Width of the tile features the model takes: the encoder's ``in_dim`` (``wsi``) or the
        projector's input width ``mm_hidden_size`` (``none``)."""
        return self.vision_config.in_dim if self.vision_mode == "wsi" else self.mm_hidden_size

    def get_text_config(self, *args, **kwargs):
        return self.text_config


AutoConfig.register(SlideEncoderConfig.model_type, SlideEncoderConfig)
AutoConfig.register(WsiLlavaConfig.model_type, WsiLlavaConfig)
