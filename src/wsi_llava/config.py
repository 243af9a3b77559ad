"""Training configuration: the YAML loader for the LLaMA-Factory dialect (the argument dataclasses are
in :mod:`wsi_llava.arguments`).

A config file is one flat YAML mapping (LLaMA-Factory style). Its keys are parsed into
:class:`ModelArguments`, :class:`DataArguments`, :class:`FinetuningArguments` and
:class:`ContrastiveArguments` by ``transformers.HfArgumentParser.parse_dict`` (as LLaMA-Factory
does); the remaining keys are kept for the Hugging Face ``TrainingArguments``, which the trainers
build once they have adjusted them. Keys that transformers 5 removed are translated (``warmup_ratio`` →
``warmup_steps`` as a ratio, ``no_cuda`` → ``use_cpu``, ``evaluation_strategy`` → ``eval_strategy``,
``overwrite_output_dir`` dropped); keys of the original WSI-LLaVA/LLaMA-Factory configs that have no
effect here are accepted with one warning; any other unknown key is an error with a "did you mean"
suggestion. ``key=value`` overrides from the command line are applied on top (values parsed as YAML;
YAML 1.1's ``yes``/``no``/``on``/``off`` stay words for keys that are not booleans). ``select_options``
are checked against :class:`~wsi_llava.select_options.SelectOptions` when the file is loaded. This is
the lowest layer: it imports nothing else of the package but the errors, the argument dataclasses and the
selector options.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .arguments import (
    SYSTEM_PROMPT_DEFAULT,
    ContrastiveArguments,
    DataArguments,
    FinetuningArguments,
    ModelArguments,
)
from .errors import WsiLlavaError
from .select_options import SelectOptions

__all__ = ["SYSTEM_PROMPT_DEFAULT", "ConfigError", "ContrastiveArguments", "DataArguments", "FinetuningArguments",
           "ModelArguments", "TrainConfig", "arguments_for", "config_from_dict", "config_reference", "load_config",
           "parse_overrides", "translate_dialect"]

logger = logging.getLogger(__name__)


class ConfigError(WsiLlavaError, ValueError):
    """An invalid configuration (names the file and key)."""


#: Keys of the seed/LLaMA-Factory configs that have no effect here (accepted with one warning).
DEAD_KEYS = {
    "mm_use_im_patch_token", "mm_use_im_start_end", "mm_vision_select_feature", "mm_patch_merge_type",
    "image_aspect_ratio", "image_max_pixels", "processor_name_or_path", "use_prefix_lm_mask",
    "preprocessing_num_workers", "overwrite_cache", "overwrite_output_dir", "ddp_find_unused_parameters_auto",
}

#: Keys that transformers 5 renamed: old → new (value kept).
RENAMED_KEYS = {"evaluation_strategy": "eval_strategy", "no_cuda": "use_cpu"}


def _training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


@dataclass
class TrainConfig:
    """A whole training run."""

    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    training: dict
    """Keyword arguments for ``transformers.TrainingArguments``."""
    source: str = "<dict>"
    """Where the config came from."""
    base_dir: Path = Path(".")
    """Folder relative paths resolve against: :func:`load_config` gives the working directory (as in
    LLaMA-Factory), not the config file's folder."""
    contrastive: ContrastiveArguments = field(default_factory=ContrastiveArguments)
    """Stage-1 settings (used with ``stage: contrastive``)."""

    def resolve(self, path: str | None) -> str | None:
        """A path from the config, made absolute against :attr:`base_dir` (None for an absent or empty one)."""
        if path is None or path == "":
            return None
        p = Path(path).expanduser()
        return str(p if p.is_absolute() else (self.base_dir / p).resolve())


#: File keys where an explicitly empty value is a mistake rather than "unset": it would silently mean
#: a randomly initialised slide encoder or a new projector (remove the key for that).
NO_EMPTY_KEYS = {
    "vision_tower": "the slide-encoder weights file, or remove the key to start from a randomly initialised encoder",
    "projector_path": "the stage-2 projector.safetensors, or remove the key to start from a new projector",
}


def _declared_type(key: str) -> str | None:
    """The declared type of a config key as text (``"bool"``, ``"IntervalStrategy | str"``, …); None if unknown."""
    from transformers import TrainingArguments

    key = RENAMED_KEYS.get(key, key)
    for cls in (*ARGUMENT_GROUPS.values(), TrainingArguments):
        for f in dataclasses.fields(cls):
            if f.name == key:
                return f.type if isinstance(f.type, str) else str(f.type)
    return None


def parse_override_value(key: str, text: str) -> Any:
    """One ``key=value`` override's value, parsed as YAML, except: YAML 1.1's ``yes``/``no``/``on``/``off``
    stay strings for keys that are not booleans (``save_strategy=no`` means the strategy ``"no"``, not
    ``False``); an empty value is None (unset), or ``""`` for :data:`NO_EMPTY_KEYS` (refused later)."""
    if not text.strip():
        return "" if key in NO_EMPTY_KEYS else None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={text!r}: not a valid YAML value ({e})") from None
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        declared = _declared_type(key)
        if declared is not None and "bool" not in declared:
            return text.strip()
    return value


class _WordLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without YAML 1.1's implicit booleans: ``yes``/``no``/``on``/``off`` (and
    ``true``/``false``) load as the words written. Used to recover the word behind a boolean."""


_WordLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def restore_words(raw: dict[str, Any], text: str) -> dict[str, Any]:
    """``raw`` (a config file's top-level mapping as ``yaml.safe_load`` read it) with YAML 1.1's
    ``yes``/``no``/``on``/``off`` turned back into the word written for keys whose declared type is not a
    boolean (``save_strategy: no`` in a file means the strategy ``"no"``, not ``False``) — the rule
    :func:`parse_override_value` applies on the command line."""
    flagged = [k for k, v in raw.items() if isinstance(v, bool)]
    if not flagged:
        return raw
    words = yaml.load(text, Loader=_WordLoader) or {}  # a SafeLoader subclass: no arbitrary objects
    out = dict(raw)
    for key in flagged:
        word = words.get(key) if isinstance(words, dict) else None
        if not isinstance(word, str) or word.strip().lower() in ("true", "false"):
            continue
        declared = _declared_type(key)
        if declared is not None and "bool" not in declared:
            out[key] = word
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x", "save_strategy=no"]`` → ``{"a": 1, "b": "x", "save_strategy": "no"}`` (values
    parsed as YAML; see :func:`parse_override_value`)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_override_value(key.strip(), value)
    return out


#: The argument dataclasses a config file fills, by :class:`TrainConfig` attribute.
ARGUMENT_GROUPS = {"model": ModelArguments, "data": DataArguments, "finetuning": FinetuningArguments,
                   "contrastive": ContrastiveArguments}


def translate_dialect(raw: dict[str, Any], source: str = "<dict>") -> tuple[dict[str, Any], list[str]]:
    """The LLaMA-Factory / transformers-4 dialect → current keys: ``warmup_ratio`` becomes
    ``warmup_steps`` as a ratio, :data:`RENAMED_KEYS` are renamed (an explicit new key wins), the
    ``custom_llava`` placeholder of ``model_name_or_path`` is dropped, :data:`DEAD_KEYS` are removed.
    Returns the translated mapping and the dead keys found (sorted)."""
    raw = dict(raw)
    if "warmup_ratio" in raw:
        ratio = raw.pop("warmup_ratio")
        if "warmup_steps" not in raw and ratio:
            if not 0 <= float(ratio) < 1:
                raise ConfigError(f"{source}: warmup_ratio must be in [0, 1), got {ratio}")
            raw["warmup_steps"] = float(ratio)
    for old, new in RENAMED_KEYS.items():
        if old in raw:
            raw.setdefault(new, raw.pop(old))
    if raw.get("model_name_or_path") == "custom_llava":
        raw.pop("model_name_or_path")
    dead = sorted(k for k in raw if k in DEAD_KEYS)
    for key in dead:
        raw.pop(key)
    return raw, dead


def config_from_dict(raw: dict[str, Any], source: str = "<dict>", base_dir: str | Path = ".") -> TrainConfig:
    """A flat LLaMA-Factory-style mapping → :class:`TrainConfig` (see module docstring): the dialect
    translated (:func:`translate_dialect`), unknown keys refused with a "did you mean", the keys of
    :data:`ARGUMENT_GROUPS` parsed into their dataclasses by ``transformers.HfArgumentParser.parse_dict``,
    every other key kept for ``TrainingArguments``; then :func:`check_config`."""
    from transformers import HfArgumentParser

    raw, dead = translate_dialect(raw, source)
    own = {f.name for cls in ARGUMENT_GROUPS.values() for f in dataclasses.fields(cls)}
    train_names = _training_argument_names()
    unknown = [k for k in raw if k not in own and k not in train_names]
    if unknown:
        known = own | train_names | DEAD_KEYS | set(RENAMED_KEYS) | {"warmup_ratio"}
        msgs = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            msgs.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{source}: unknown config key(s): {', '.join(msgs)}")
    if dead:
        logger.warning("%s: ignoring keys that have no effect in WSI-LLaVA: %s", source, ", ".join(dead))
    training = {k: v for k, v in raw.items() if k not in own}
    ds = training.get("deepspeed")
    if isinstance(ds, str) and ds and not ds.lstrip().startswith("{"):  # a DeepSpeed JSON file, as LLaMA-Factory
        path = Path(base_dir, ds).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"{source}: deepspeed: {path} not found (configs/ds_zero2.json and "
                              f"configs/ds_zero3.json ship with the repository)")
        training["deepspeed"] = str(path)
    parser = HfArgumentParser(list(ARGUMENT_GROUPS.values()))
    try:
        parsed = dict(zip(ARGUMENT_GROUPS, parser.parse_dict({k: v for k, v in raw.items() if k in own})))
    except (TypeError, ValueError) as e:  # a dataclass refusing a value
        raise ConfigError(f"{source}: {e}") from None
    model = parsed["model"]
    if model.vision_mode == "roi":  # ROI tile features are tile features: the model is `wsi` or `none`
        model.vision_mode = "wsi" if model.vision_tower else "none"
    cfg = TrainConfig(model, parsed["data"], parsed["finetuning"], training, source, Path(base_dir).resolve(),
                      parsed["contrastive"])
    check_config(cfg)
    return cfg


def arguments_for(target: type, *sources: Any, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for ``target`` (a dataclass, e.g. ``WsiLlavaConfig`` or ``SlideTextConfig``):
    every field of the argument dataclasses ``sources`` that ``target`` also declares, by name (later
    sources win), then ``overrides`` (values computed by the caller, or fields whose argument has
    another name). An override ``target`` does not declare is a ``TypeError``."""
    names = {f.name for f in dataclasses.fields(target) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"{target.__name__} has no field(s) {unknown}")
    out = {}
    for source in sources:
        out.update({f.name: getattr(source, f.name) for f in dataclasses.fields(source) if f.name in names})
    return {**out, **overrides}


def check_config(cfg: TrainConfig) -> None:
    """Cross-field checks with messages that name the key."""
    m, f = cfg.model, cfg.finetuning
    where = cfg.source
    if f.stage not in ("sft", "contrastive"):
        raise ConfigError(f"{where}: stage {f.stage!r} is not supported; use 'sft' or 'contrastive'")
    if f.finetuning_type not in ("lora", "full", "freeze"):
        raise ConfigError(f"{where}: finetuning_type {f.finetuning_type!r}; use lora, full or freeze")
    if f.use_unsloth:
        raise ConfigError(f"{where}: use_unsloth: true is not supported; set it to false")
    if m.vision_model_name != "gigapath":
        raise ConfigError(f"{where}: vision_model_name {m.vision_model_name!r}; only 'gigapath' is available")
    try:
        SelectOptions.from_mapping(m.select_options)
    except ValueError as e:
        raise ConfigError(f"{where}: select_options: {e}") from None
    for key, what in NO_EMPTY_KEYS.items():
        value = getattr(m, key)
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{where}: {key} is empty; give {what}")
    if m.vision_mode not in ("none", "wsi", "roi"):
        raise ConfigError(f"{where}: vision_mode {m.vision_mode!r}; use 'none', 'wsi' ('wsi' = GigaPath slide encoder) "
                          f"or 'roi' (tile features of ROI images from `wsi-llava encode-roi`)")
    if f.stage == "sft" and not (m.llm_name_or_path or m.model_name_or_path):
        raise ConfigError(f"{where}: set llm_name_or_path (a local folder with a causal LM)")
    if f.stage == "contrastive":
        check_contrastive(cfg.contrastive, where)
    if cfg.data.dataset is None:
        raise ConfigError(f"{where}: set dataset (a manifest path or name)")
    if "output_dir" not in cfg.training:
        raise ConfigError(f"{where}: set output_dir")


def check_contrastive(c: ContrastiveArguments, where: str) -> None:
    """Stage-1 settings that cannot work, with the key named."""
    if not c.text_model_name_or_path:
        raise ConfigError(f"{where}: stage: contrastive needs text_model_name_or_path (a local folder with a "
                          "Hugging Face text model and its tokenizer)")
    if c.slide_pool not in ("cls", "mean"):
        raise ConfigError(f"{where}: slide_pool {c.slide_pool!r}; use 'cls' or 'mean'")
    if c.contrastive_positives not in ("pair", "case"):
        raise ConfigError(f"{where}: contrastive_positives {c.contrastive_positives!r}; use 'pair' or 'case'")
    if c.projection_dim < 0 or c.text_max_length < 1:
        raise ConfigError(f"{where}: projection_dim must be >= 0 and text_max_length >= 1")
    if not (c.init_temperature > 0 and c.max_logit_scale > 0):
        raise ConfigError(f"{where}: init_temperature and max_logit_scale must be positive")


def load_config(path: str | Path, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Read a YAML config file (+ ``key=value`` overrides) into a :class:`TrainConfig`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    raw = restore_words(raw, text)
    if overrides:
        raw.update(parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return config_from_dict(raw, source=str(path), base_dir=Path.cwd())


def config_reference() -> str:
    """Markdown table of every config key with its default and documentation (for the README)."""
    import ast
    import inspect

    lines = []
    for cls in ARGUMENT_GROUPS.values():
        src = inspect.getsource(cls)
        docs: dict[str, str] = {}
        body = ast.parse(src).body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                docs[a.target.id] = " ".join(str(b.value.value).split())
        lines += [f"### {cls.__name__}", "", cls.__doc__.strip(), "", "| key | default | meaning |", "|---|---|---|"]
        for fl in dataclasses.fields(cls):
            default = fl.default if fl.default is not dataclasses.MISSING else fl.default_factory()
            lines.append(f"| `{fl.name}` | `{default!r}` | {docs.get(fl.name, '')} |")
        lines.append("")
    return "\n".join(lines)
