"""Stages 2 and 3 (``stage: sft``): build the model, the data and the ``Trainer``, train, save."""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import ConfigError, TrainConfig, arguments_for
from ..data.collate import SlideCollator
from ..data.dataset import SlideQADataset, require_h5
from ..data.manifest import Record, load_manifest
from ..data.prompts import PromptBuilder, resolve_system_prompt
from ..data.slides import read_slide_meta
from ..model.configuration import SlideEncoderConfig, WsiLlavaConfig
from ..model.saving import TOWER_SOURCE, save_trained
from ..model.wsi_llava import WsiLlavaForConditionalGeneration, load_wsi_llava
from . import final
from .checkpoint import (
    checkpoint_step,
    load_checkpoint_weights,
)
from .stages import load_projector, save_projector, set_trainable

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".json", ".jsonl")


def resolve_datasets(spec: str, cfg: TrainConfig) -> list[Path]:
    """Comma-separated dataset names/paths → manifest files (see ``DataArguments.dataset``)."""
    dataset_dir = Path(cfg.resolve(cfg.data.dataset_dir))
    info_file = dataset_dir / "dataset_info.json"
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.exists() else {}
    out = []
    for name in [s.strip() for s in str(spec).split(",") if s.strip()]:
        tried = [Path(cfg.resolve(name)), dataset_dir / name] + [dataset_dir / (name + s) for s in MANIFEST_SUFFIXES]
        if name in info:
            entry = info[name]
            tried.insert(0, dataset_dir / (entry.get("file_name", name) if isinstance(entry, dict) else str(entry)))
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            names = sorted(set(info) | {p.stem for p in dataset_dir.glob("*") if p.suffix in MANIFEST_SUFFIXES}) \
                if dataset_dir.is_dir() else []
            close = difflib.get_close_matches(name, names, n=1)
            raise ConfigError(f"{cfg.source}: dataset {name!r} not found (looked at "
                              f"{', '.join(map(str, dict.fromkeys(tried)))}). "
                              + (f"Did you mean {close[0]!r}? " if close else "")
                              + "Give a manifest path (.csv, .json or .jsonl; relative paths start at the working "
                                "directory) or a name from dataset_dir/dataset_info.json")
        out.append(found)
    return out


def load_records(paths: list[Path], split: str | None) -> list[Record]:
    """All records of the manifests, filtered by ``split`` per manifest."""
    records: list[Record] = []
    for p in paths:
        records += load_manifest(p, split=split)
    require_h5(records)
    return records


def filter_invalid(records: list[Record], expected_dim: int | None, skip_invalid: bool, out_dir: Path,
                   source: str) -> list[Record]:
    """Validate every row and file; refuse bad data, or skip it and list it in ``skipped.jsonl``."""
    from ..data.validate import validate_records

    problems = validate_records(records, expected_dim=expected_dim)
    if not problems:
        return records
    if not skip_invalid:
        shown = "\n  ".join(p.format() for p in problems[:20])
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConfigError(f"{source}: {len(problems)} problem(s) in the data (set skip_invalid: true to skip "
                          f"those rows, or run `wsi-llava validate`):\n  {shown}{more}")
    bad = {(p.source, p.row) for p in problems}
    out_dir.mkdir(parents=True, exist_ok=True)
    listed = out_dir / "skipped.jsonl"
    seen = set(listed.read_text(encoding="utf-8").splitlines()) if listed.exists() else set()
    with open(listed, "a", encoding="utf-8") as f:  # a rerun adds only problems not listed yet
        for p in problems:
            line = json.dumps({"source": p.source, "row": p.row, "field": p.field, "message": p.message})
            if line not in seen:
                seen.add(line)
                f.write(line + "\n")
    kept = [r for r in records if (r.source, r.row) not in bad]
    logger.warning("skipping %d invalid row(s); listed in %s", len(records) - len(kept), out_dir / "skipped.jsonl")
    return kept


@dataclass
class RunStart:
    """The common start of a training run (:func:`start_run`)."""

    training: dict
    """``TrainingArguments`` keyword arguments, ``output_dir`` made absolute."""
    out_dir: Path
    identity: dict
    """The config identity recorded in the completion marker (:func:`~wsi_llava.train.final.config_identity`)."""
    seed: int
    finished: bool
    """The run is complete already: nothing is read beyond the marker, nothing written, nothing seeded."""


def start_run(cfg: TrainConfig, config_dump: dict) -> RunStart:
    """Resolve the output folder, check the completion marker against ``config_dump`` and, unless the run
    is finished, seed every generator (``seed``, default 42)."""
    from transformers import set_seed

    training = dict(cfg.training)
    out_dir = Path(cfg.resolve(training["output_dir"]))
    training["output_dir"] = str(out_dir)
    identity = final.config_identity(config_dump)
    seed = int(training.get("seed", 42))
    finished = final.nothing_to_do(out_dir, identity, training.get("resume_from_checkpoint"))
    if not finished:
        set_seed(seed)
    return RunStart(training, out_dir, identity, seed, finished)


def trainer_arguments(cfg: TrainConfig, training: dict, has_eval: bool) -> tuple[dict, bool | str | None, int | None]:
    """``(kwargs, resume, checkpoint_limit)`` for ``TrainingArguments``: the precision this machine runs
    (:func:`~wsi_llava.precision.training_precision`), no reporting unless asked, no evaluation without an
    evaluation set; ``resume_from_checkpoint`` (true or a path, resolved by ``find_resume``) and
    ``save_total_limit`` (rotation over complete checkpoints) taken out for the crash-safe trainers."""
    from ..precision import training_precision

    training = training_precision(training, force=cfg.finetuning.force_precision)
    training.setdefault("report_to", "none")
    if not has_eval:
        training["eval_strategy"] = "no"
        training["load_best_model_at_end"] = False
    resume = training.pop("resume_from_checkpoint", None)
    checkpoint_limit = training.pop("save_total_limit", None)
    return training, resume, checkpoint_limit


def build_model(cfg: TrainConfig, feature_dim: int):
    """The model and tokenizer for a stage: a saved WSI-LLaVA to continue from, or a new one around the
    LM (its :class:`~wsi_llava.model.configuration.WsiLlavaConfig` built from ``ModelArguments`` by
    :func:`~wsi_llava.config.arguments_for`); the tower weights and the stage-2 projector loaded on top
    (strictly)."""
    m = cfg.model
    if m.model_name_or_path:
        model, tokenizer = load_wsi_llava(cfg.resolve(m.model_name_or_path))
    else:
        encoder = None
        if m.vision_mode == "wsi" and m.vision_tower:
            from ..model.export import load_tower

            # the architecture stored with the weights (exported stage-1 towers carry it); config overrides win
            encoder = load_tower(cfg.resolve(m.vision_tower), **m.vision_config)
        if m.vision_mode == "wsi" and encoder is None:
            logger.warning("vision_mode: wsi without vision_tower: the slide encoder starts from random weights%s",
                           " and stays frozen" if m.freeze_vision_tower else "")
        vision_config = encoder.config.architecture() if encoder is not None else dict(m.vision_config)
        if m.vision_mode == "wsi":
            vision_config.setdefault("in_dim", feature_dim)
            width = vision_config.get("embed_dim", SlideEncoderConfig.embed_dim)
        else:
            width = feature_dim
        if m.mm_hidden_size is not None and m.mm_hidden_size != width:
            raise ConfigError(f"{cfg.source}: mm_hidden_size {m.mm_hidden_size} does not match the width of the tokens "
                              f"entering the projector ({width}: {'encoder width' if m.vision_mode == 'wsi' else 'tile feature width'})")
        try:
            config_kwargs = arguments_for(WsiLlavaConfig, m, vision_config=vision_config, mm_hidden_size=width)
            model, tokenizer = WsiLlavaForConditionalGeneration.from_llm(cfg.resolve(m.llm_name_or_path),
                                                                         **config_kwargs)
        except ConfigError as e:
            raise ConfigError(f"{cfg.source}: {e}") from None
        if encoder is not None:
            model.vision_tower.load_state_dict(encoder.state_dict(), strict=True)
            # a frozen tower is saved as a reference to this file (model/saving.py), not copied
            source = Path(cfg.resolve(m.vision_tower)).resolve()
            if source.is_file():
                setattr(model, TOWER_SOURCE, source)
    if m.chat_template:
        tokenizer.chat_template = m.chat_template
    if m.projector_path:
        load_projector(model, cfg.resolve(m.projector_path))
    return model, tokenizer


def _final_writer(model, tokenizer, cfg: TrainConfig, log_history: list[dict]):
    """What the final save writes into its temporary folder: the model's trained parts with a checksummed
    reference to the base LM (LoRA unmerged, adapter in ``adapter/``; the whole model, LoRA merged, when
    the LM trains in full or no base LM folder is known: :func:`~wsi_llava.model.saving.save_trained`),
    tokenizer, projector, config, log history and loss plot."""
    def write(tmp: Path) -> None:
        save_trained(model, tmp, merge_for_full=True)
        tokenizer.save_pretrained(tmp)
        save_projector(model, tmp / "projector.safetensors")
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(_config_dump(cfg), sort_keys=False), encoding="utf-8")
        (tmp / "log_history.json").write_text(json.dumps(log_history, indent=1), encoding="utf-8")
        if cfg.finetuning.plot_loss:
            plot_losses(log_history, tmp / "training_loss.png")
    return write


def save_final(model, tokenizer, cfg: TrainConfig, out_dir: Path, log_history: list[dict], step: int,
               max_steps: int) -> None:
    """Write the final model atomically (:func:`~wsi_llava.train.final.publish_final`), then the
    completion marker ``run_complete.json`` (see :mod:`wsi_llava.train.final`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final.remove_marker(out_dir)
    files = final.publish_final(out_dir, _final_writer(model, tokenizer, cfg, log_history))
    final.write_marker(out_dir, step, max_steps, final.config_identity(_config_dump(cfg)), files)


def _config_dump(cfg: TrainConfig) -> dict:
    from dataclasses import asdict

    return {**asdict(cfg.model), **asdict(cfg.data), **asdict(cfg.finetuning), **cfg.training}


def plot_losses(log_history: list[dict], path: Path) -> None:
    """Training (and eval) loss curves as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "eval_loss", "eval_sanity_check_loss"):
        pts = [(h["step"], h[key]) for h in log_history if key in h]
        if pts:
            ax.plot(*zip(*pts), label=key, marker="." if key != "loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_sft(cfg: TrainConfig) -> Path:
    """Train stage 2 or 3 as configured; returns the output folder holding the final model."""
    from transformers import TrainingArguments

    from .trainer import EpochCallback, WsiTrainer

    run = start_run(cfg, _config_dump(cfg))
    if run.finished:
        return run.out_dir  # a finished run is final: nothing is read beyond the marker, nothing written
    training, out_dir, identity, seed = run.training, run.out_dir, run.identity, run.seed
    train_records = load_records(resolve_datasets(cfg.data.dataset, cfg), cfg.data.split)
    eval_records = (load_records(resolve_datasets(cfg.data.eval_dataset, cfg), cfg.data.eval_split)
                    if cfg.data.eval_dataset else [])
    if not train_records:
        raise ConfigError(f"{cfg.source}: dataset {cfg.data.dataset!r} has no rows" +
                          (f" with split {cfg.data.split!r}" if cfg.data.split else ""))
    train_records = filter_invalid(train_records, None, cfg.data.skip_invalid, out_dir, cfg.source)
    if not train_records:
        raise ConfigError(f"{cfg.source}: no valid training rows left")
    feature_dim = read_slide_meta(train_records[0].h5_path)[1]
    eval_records = filter_invalid(eval_records, feature_dim, cfg.data.skip_invalid, out_dir, cfg.source)

    model, tokenizer = build_model(cfg, feature_dim)
    set_trainable(model, cfg.model, cfg.finetuning)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("trainable parameters: %d of %d", n_train, sum(p.numel() for p in model.parameters()))
    builder = PromptBuilder(tokenizer, model.config.num_image_tokens, cfg.data.cutoff_len,
                            resolve_system_prompt(cfg.model.system_prompt))
    tower_cache = None
    if cfg.model.tower_cache:  # precomputed tower outputs (`wsi-llava encode`), checked against the model's tower
        from ..data.tower_cache import cache_for_model

        tower_cache = cache_for_model(cfg.resolve(cfg.model.tower_cache), model)
    train_ds = SlideQADataset(train_records, builder, cfg.data.patches_per_wsi, feature_dim, training=True, seed=seed,
                              tower_cache=tower_cache)
    eval_ds = (SlideQADataset(eval_records, builder, cfg.data.patches_per_wsi, feature_dim, training=False, seed=seed,
                              tower_cache=tower_cache)
               if eval_records else None)
    training, resume, checkpoint_limit = trainer_arguments(cfg, training, bool(eval_ds))
    if training.get("gradient_checkpointing"):
        training.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    args = TrainingArguments(remove_unused_columns=False, label_names=["labels"], **training)
    logger.info("training on %d process(es), %d example(s), %d trainable parameter(s)", args.world_size,
                len(train_ds), n_train)
    trainer = WsiTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         data_collator=SlideCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                         callbacks=[EpochCallback(train_ds)], loraplus_lr_ratio=cfg.finetuning.loraplus_lr_ratio,
                         do_sanity_check=cfg.finetuning.do_sanity_check, checkpoint_limit=checkpoint_limit)
    checkpoint, end = trainer.find_resume_at_end(resume)
    if end is not None:  # nothing left to train
        _finish_without_training(trainer, model, tokenizer, cfg, out_dir, Path(checkpoint), end, identity)
        return out_dir
    if trainer.is_world_process_zero():
        final.remove_marker(out_dir)  # the final model is about to change
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.is_world_process_zero():
        save_final(model, tokenizer, cfg, out_dir, trainer.state.log_history, trainer.state.global_step,
                   trainer.state.max_steps)
    return out_dir


def _finish_without_training(trainer, model, tokenizer, cfg: TrainConfig, out_dir: Path, checkpoint: Path,
                             max_steps: int, identity: dict) -> None:
    """The newest checkpoint is the end of training (step >= ``max_steps``): nothing to do when the
    final model is complete (valid marker of that step); else write it from the checkpoint, as the end
    of training would have (the best checkpoint's weights with ``load_best_model_at_end``)."""
    from transformers import TrainerState
    from transformers.trainer import TRAINER_STATE_NAME

    step = checkpoint_step(checkpoint)
    if final.already_final(out_dir, step, max_steps, identity):
        return
    state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    weights = final.final_weights(checkpoint, state.best_model_checkpoint, trainer.args.load_best_model_at_end)
    logger.info("%s is the end of training (step %d of %d); writing the final model from %s without training",
                checkpoint, step, max_steps, weights)
    load_checkpoint_weights(model, weights)
    if trainer.is_world_process_zero():
        save_final(model, tokenizer, cfg, out_dir, state.log_history, step, max_steps)
