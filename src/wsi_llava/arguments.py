"""The argument dataclasses a training config file fills: :class:`ModelArguments`,
:class:`DataArguments`, :class:`FinetuningArguments` and :class:`ContrastiveArguments` (every other key
of a config goes to ``transformers.TrainingArguments``). The field docstrings are the README's config
reference (``python -m wsi_llava.docs README.md``). Loading and checking is :mod:`wsi_llava.config`,
which re-exports these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: ``system_prompt`` value meaning "the built-in prompt"; resolved where prompts are built
#: (:func:`wsi_llava.data.prompts.resolve_system_prompt`), since config is below data.
SYSTEM_PROMPT_DEFAULT = "default"


@dataclass
class ModelArguments:
    """Which models to build and how the visual path is shaped."""

    llm_name_or_path: str | None = None
    """Local folder of a Hugging Face causal LM (e.g. Llama-3.2-1B-Instruct). Required unless
    ``model_name_or_path`` is a saved WSI-LLaVA folder."""
    model_name_or_path: str | None = None
    """A saved WSI-LLaVA folder to start from. The seed's placeholder value ``custom_llava`` means
    "build a new model from ``llm_name_or_path``"."""
    vision_mode: str = "none"
    """``none``: tile features enter the projector directly; ``wsi``: the GigaPath slide encoder; ``roi``: tile
    features from an ROI image, produced by ``wsi-llava encode-roi`` (the model is then ``wsi`` when a
    ``vision_tower`` is given, else ``none``)."""
    vision_tower: str | None = None
    """Slide-encoder weights (``slide_encoder.pth``, a state dict or safetensors) for ``vision_mode: wsi``;
    absent = random init (tests; logged as a warning); an empty value is an error."""
    vision_model_name: str = "gigapath"
    """Name of the slide encoder; only ``gigapath`` exists."""
    vision_config: dict = field(default_factory=dict)
    """Overrides of ``SlideEncoderConfig`` fields (e.g. ``in_dim`` for non-GigaPath tile features)."""
    tower_cache: str | None = None
    """Folder written by ``wsi-llava encode``: precomputed tower outputs used instead of running the tower."""
    mm_hidden_size: int | None = None
    """Width of the tokens entering the projector; default: the tile feature width (``none``) or the
    encoder width (``wsi``)."""
    mm_projector_type: str = "mlp2x_gelu"
    """Projector architecture; only ``mlp2x_gelu``."""
    mm_vision_select_layer: int = -1
    """Tower state fed to the projector: -1 = final normalised tokens; i = ``hidden_states[i]``."""
    image_seq_length: int = 64
    """Visual tokens per slide chosen by the selector (the budget K)."""
    use_cls_token: bool = False
    """Also feed the tower's CLS token (``wsi`` only): the prompt holds K + 1 visual tokens."""
    vision_feature_select_mode: str = "random_sample"
    """Token selector: ``none``, ``random_sample``, ``prumerge``, ``prumerge_plus``, ``prompt_topk``,
    ``feature_outlier`` (docs/selection.md)."""
    select_options: dict = field(default_factory=dict)
    """Selector knobs (``SelectOptions`` fields)."""
    projector_dropout: float = 0.0
    """Dropout inside the projector."""
    gamma_min: float = 1.0
    """Lower bound of the projector's output scale."""
    gamma_max: float = 1.0
    """Upper bound of the projector's output scale."""
    projector_path: str | None = None
    """``projector.safetensors`` from stage 2 to start stage 3 from (strict); an empty value is an error."""
    freeze_vision_tower: bool = True
    """Keep the slide encoder frozen (eval mode, no gradients)."""
    freeze_language_model: bool = True
    """With ``finetuning_type: full``: keep the LM frozen (stage 2)."""
    freeze_multi_modal_projector: bool = False
    """Keep the projector frozen."""
    chat_template: str | None = None
    """A Jinja chat template for tokenizers that have none."""
    system_prompt: str | None = SYSTEM_PROMPT_DEFAULT
    """System message of every prompt; ``default`` = the built-in pathology-assistant prompt
    (``wsi_llava.data.prompts.DEFAULT_SYSTEM_PROMPT``); empty = none."""
    trust_remote_code: bool = False
    """Accepted for compatibility; remote code is never executed."""


@dataclass
class DataArguments:
    """Where the data is and how examples are built."""

    dataset: str | None = None
    """Training manifests: comma-separated paths (CSV or sharegpt JSON) or names in ``dataset_dir``
    (``NAME.csv``/``NAME.json`` or an entry of ``dataset_info.json``)."""
    eval_dataset: str | None = None
    """Evaluation manifests, same form as ``dataset``."""
    dataset_dir: str = "."
    """Folder that relative dataset names resolve against (relative paths in a config resolve against
    the working directory, as in LLaMA-Factory)."""
    split: str | None = None
    """Keep only rows whose ``split`` column equals this (training manifests only)."""
    eval_split: str | None = None
    """Keep only rows whose ``split`` column equals this (evaluation manifests only)."""
    patches_per_wsi: int = 2048
    """Tiles sampled per slide (all when the slide has fewer)."""
    cutoff_len: int = 2048
    """Longest example in tokens; answers are truncated, prompts never (too-long prompt = error)."""
    template: str | None = None
    """LLaMA-Factory template name; recorded only: the LM tokenizer's own chat template is used."""
    skip_invalid: bool = False
    """Skip rows that fail validation (listed in ``OUTPUT/skipped.jsonl``) instead of refusing to train."""


@dataclass
class FinetuningArguments:
    """What trains."""

    stage: str = "sft"
    """``sft`` (stages 2 and 3: projector alignment / instruction tuning) or ``contrastive`` (stage 1)."""
    finetuning_type: str = "lora"
    """``lora`` (PEFT adapters on the LM + projector), ``full`` (LM trainable unless
    ``freeze_language_model``) or ``freeze`` (only the last ``freeze_trainable_layers`` LM layers)."""
    freeze_trainable_layers: int = 2
    """With ``finetuning_type: freeze``: how many final LM layers train."""
    lora_target: Any = "all"
    """LoRA target module names (list or comma string); ``all`` = every Linear of the LM. Projector
    names (``linear_1``, ``linear_2``) are not wrapped: the projector trains fully instead."""
    lora_rank: int = 8
    """LoRA rank."""
    lora_alpha: int | None = None
    """LoRA alpha (default 2 × rank)."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: learning-rate multiplier of the LoRA B matrices."""
    create_new_adapter: bool = False
    """Accepted for compatibility: stage 3 always starts a new adapter."""
    use_unsloth: bool = False
    """Not supported; must be false."""
    do_sanity_check: bool = False
    """At each evaluation also log ``eval_sanity_check_loss``: the eval loss with zeroed slide features."""
    plot_loss: bool = False
    """Write ``training_loss.png`` to the output folder at the end."""
    force_precision: bool = False
    """``bf16``/``fp16`` mean "where this machine runs them fast" (a CPU without native bf16 trains in
    float32, with one log line why; see :mod:`wsi_llava.precision`). True: use them as asked."""


@dataclass
class ContrastiveArguments:
    """Stage 1 (``stage: contrastive``): slide–text contrastive pretraining of the slide encoder.

    The slide tower is the GigaPath encoder (``vision_tower`` weights or random init, shaped by
    ``vision_config``; frozen with ``freeze_vision_tower``); the text tower is any Hugging Face text
    model from a local folder. See ``docs/stage1.md``."""

    text_model_name_or_path: str | None = None
    """Local folder of a Hugging Face text model + tokenizer (``AutoModel``); required for stage 1."""
    text_max_length: int = 256
    """Report tokens kept per text (longer reports are truncated; the count is logged)."""
    slide_pool: str = "cls"
    """Slide embedding: ``cls`` (head ``norm`` of the CLS token) or ``mean`` (of the real tile tokens)."""
    projection_dim: int = 512
    """Width of the shared embedding space (a bias-free Linear per tower); 0 = no projection (both
    towers must then have the same width)."""
    init_temperature: float = 0.07
    """Initial softmax temperature; the learnable logit scale starts at ln(1 / this)."""
    max_logit_scale: float = 4.605170185988092
    """Upper clamp of the learnable logit scale (ln 100, i.e. temperature >= 0.01)."""
    contrastive_positives: str = "pair"
    """``pair``: a slide's own reports (and identical report texts) are its positives; ``case``: also
    every report of the same ``case_id`` (rows without ``case_id`` fall back to ``slide_id``)."""
    freeze_text_tower: bool = False
    """Keep the text tower frozen (eval mode, no gradients); only the projections (and the slide tower,
    unless ``freeze_vision_tower``) train."""
    gather_across_processes: bool = True
    """Under ``torchrun``: every process scores its slides and texts against the batches of all
    processes (more negatives; gradients flow through the gather)."""
