"""Stage 1 (``stage: contrastive``): slide–text contrastive pretraining of the slide encoder.

Pairs each slide with its report (``caption`` rows), encodes both with the GigaPath slide tower and a
Hugging Face text tower, and trains with symmetric InfoNCE (:mod:`wsi_llava.model.slide_text`)
under the Hugging Face ``Trainer`` (so ``torchrun`` runs it on several processes; with
``gather_across_processes`` every process scores against all processes' batches). Evaluation embeds
the *whole* validation set and logs slide→text and text→slide R@1/5/10 and mean/median rank
(:mod:`wsi_llava.model.retrieval`) and the whole-set loss as ``eval_loss``.

Writes to ``output_dir``: ``contrastive_config.json`` (before training), ``checkpoint-N/`` (Trainer),
and at the end ``model.safetensors`` (every weight), ``tower.safetensors`` (the slide encoder with
GigaPath key names — the stage-2 ``vision_tower``), ``metrics.json`` (with an evaluation set),
``log_history.json`` and ``train_config.yaml``, all written into ``.final.tmp/`` and moved into place,
then ``run_complete.json``. A finished run is final, as in stages 2 and 3 (:mod:`wsi_llava.train.final`):
a rerun with ``resume_from_checkpoint`` and the same config changes nothing, and a kill during the final
save is finished from the last checkpoint without training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from transformers import Trainer

from ..config import ConfigError, TrainConfig, arguments_for
from ..data.slide_text import (
    SlideTextCollator,
    SlideTextDataset,
    SlideTextPair,
    build_pairs,
)
from ..data.slides import read_slide_meta
from ..model.retrieval import slide_text_retrieval
from ..fileio import atomic_write_text, write_error_text
from ..model.export import STAGE1_CONFIG
from ..model.slide_text import SlideTextConfig, SlideTextModel, symmetric_nce
from ..model.text_tower import load_text_tower, pad_token_id, tokenize_texts
from . import final
from .checkpoint import (
    CheckpointError,
    checkpoint_step,
    load_checkpoint_weights,
)
from .run import filter_invalid, load_records, resolve_datasets, start_run, trainer_arguments
from .trainer import CrashSafeCheckpoints, EpochCallback

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# data and model
# ---------------------------------------------------------------------------------------------
def load_pairs(cfg: TrainConfig, spec: str, split: str | None, expected_dim: int | None, out_dir: Path,
               what: str) -> list[SlideTextPair]:
    """Manifests → checked (slide, report) pairs; bad rows refused (or skipped with ``skip_invalid``)."""
    records = load_records(resolve_datasets(spec, cfg), split)
    pairs, no_caption = build_pairs(records, cfg.contrastive.contrastive_positives)
    if not pairs:
        raise ConfigError(f"{cfg.source}: {what} {spec!r} has no rows with a caption" +
                          (f" and split {split!r}" if split else "") +
                          " — stage 1 pairs each slide with its report (the caption column)")
    if no_caption:
        logger.info("%s: %d row(s) without a caption are not used by stage 1", what, no_caption)
    kept = filter_invalid([p.record for p in pairs], expected_dim, cfg.data.skip_invalid, out_dir, cfg.source)
    ok = {(r.source, r.row) for r in kept}
    pairs = [p for p in pairs if (p.record.source, p.record.row) in ok]
    if not pairs:
        raise ConfigError(f"{cfg.source}: no valid {what} pairs left")
    return pairs


def build_stage1_model(cfg: TrainConfig, feature_dim: int):
    """``(SlideTextModel, tokenizer)``: the slide tower from ``vision_tower`` (any checkpoint
    ``load_tower`` reads) or random init shaped by ``vision_config``, and the text tower; the heads'
    :class:`SlideTextConfig` built from ``ContrastiveArguments`` by :func:`~wsi_llava.config.arguments_for`."""
    from ..model.export import load_tower
    from ..model.slide_encoder import SlideEncoder, SlideEncoderConfig

    m, c = cfg.model, cfg.contrastive
    if m.vision_tower:
        encoder = load_tower(cfg.resolve(m.vision_tower), **m.vision_config)
    else:
        try:
            encoder = SlideEncoder(SlideEncoderConfig.from_fields({"in_dim": feature_dim, **m.vision_config}))
        except TypeError as e:
            raise ConfigError(f"{cfg.source}: vision_config: {e}") from None
    if encoder.config.in_dim != feature_dim:
        raise ConfigError(f"{cfg.source}: the slide tower takes {encoder.config.in_dim}-wide tile features but the "
                          f"data has {feature_dim}-wide features")
    text_tower, tokenizer = load_text_tower(cfg.resolve(c.text_model_name_or_path))
    heads = SlideTextConfig(**arguments_for(SlideTextConfig, c, freeze_slide_tower=m.freeze_vision_tower))
    return SlideTextModel(encoder.train(), text_tower, heads), tokenizer


def make_dataset(pairs: list[SlideTextPair], tokenizer, cfg: TrainConfig, feature_dim: int, training: bool,
                 seed: int, what: str) -> SlideTextDataset:
    ids, cut = tokenize_texts(tokenizer, [p.text for p in pairs], cfg.contrastive.text_max_length)
    if cut:
        logger.warning("%s: %d of %d report(s) are longer than text_max_length=%d tokens and were truncated",
                       what, cut, len(pairs), cfg.contrastive.text_max_length)
    return SlideTextDataset(pairs, ids, cfg.data.patches_per_wsi, feature_dim, training=training, seed=seed)


# ---------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------
class ContrastiveTrainer(CrashSafeCheckpoints, Trainer):
    """``Trainer`` whose evaluation is whole-set retrieval; no weight decay on the logit scale."""

    last_retrieval: dict | None = None

    def get_decay_parameter_names(self, model) -> list[str]:
        """The Trainer's choice (no biases or norms) minus the logit scale and other 1-D parameters."""
        shapes = {n: p.dim() for n, p in model.named_parameters()}
        return [n for n in super().get_decay_parameter_names(model)
                if "logit_scale" not in n and shapes.get(n, 2) >= 2]

    @torch.no_grad()
    def embed_pairs(self, dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slide and text embeddings [M, E] and keys [M, 3] of every pair of ``dataset`` (all processes'
        shares gathered, the distributed sampler's repeats dropped)."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        slides, texts, keys = [], [], []
        try:
            for batch in self.get_eval_dataloader(dataset):
                batch = self._prepare_inputs(batch)
                with self.accelerator.autocast():
                    s = model.encode_slides(batch["features"], batch["coords"], batch["tile_mask"])
                    t = model.encode_texts(batch["input_ids"], batch["attention_mask"])
                s, t, k = self.accelerator.gather_for_metrics((s.float(), t.float(), batch["keys"]))
                slides.append(s.cpu())
                texts.append(t.cpu())
                keys.append(k.cpu())
        finally:
            model.train(was_training)
        return torch.cat(slides), torch.cat(texts), torch.cat(keys)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Whole-set retrieval metrics and loss, logged as ``{prefix}_s2t_r1`` … and ``{prefix}_loss``."""
        metrics = self.retrieval_metrics(eval_dataset, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def retrieval_metrics(self, eval_dataset=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """What :meth:`evaluate` logs, without logging it; sets :attr:`last_retrieval`."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluation needs an eval_dataset")
        start = time.time()
        slide, text, keys = self.embed_pairs(dataset)
        model = self.accelerator.unwrap_model(self.model)
        scale = model.current_logit_scale().detach().float().cpu()
        retrieval, chance = slide_text_retrieval(slide, text, keys)
        metrics = {f"{metric_key_prefix}_loss": float(symmetric_nce(slide, text, keys, scale)),
                   **{f"{metric_key_prefix}_{k}": v for k, v in retrieval.items()},
                   f"{metric_key_prefix}_temperature": float(1.0 / scale),
                   f"{metric_key_prefix}_runtime": round(time.time() - start, 4)}
        self.last_retrieval = {"retrieval": retrieval, "chance": chance, "n_pairs": len(keys),
                               "loss": metrics[f"{metric_key_prefix}_loss"], "temperature": float(1.0 / scale)}
        return metrics


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def _config_dump(cfg: TrainConfig) -> dict:
    return {**asdict(cfg.model), **asdict(cfg.data), **asdict(cfg.finetuning), **asdict(cfg.contrastive),
            **cfg.training}


def stage1_description(cfg: TrainConfig, model: SlideTextModel, feature_dim: int) -> dict:
    """What ``contrastive_config.json`` holds: the slide encoder architecture, heads, text model."""
    return {"slide_encoder": model.slide_tower.config.architecture(), "heads": asdict(model.cfg),
            "text_model_name_or_path": cfg.resolve(cfg.contrastive.text_model_name_or_path),
            "text_max_length": cfg.contrastive.text_max_length,
            "contrastive_positives": cfg.contrastive.contrastive_positives, "feature_dim": feature_dim}


def save_stage1(model: SlideTextModel, out_dir: Path) -> None:
    """``model.safetensors`` (all weights, keys ``slide_tower.*``, ``text_tower.*`` …) and
    ``tower.safetensors`` (the slide encoder, GigaPath key names), each written atomically."""
    from safetensors.torch import save_file

    from ..model.export import save_tower

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out_dir / ".model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / "model.safetensors")
    save_tower(model.slide_tower, out_dir / "tower.safetensors")


def final_summary(trainer: ContrastiveTrainer, eval_ds, load_best: bool) -> dict | None:
    """``metrics.json``: the whole validation set scored with the final weights (the evaluation of the
    last step is reused when it scored these weights; else evaluated and logged now), with the
    history of every evaluation. None without an evaluation set."""
    if eval_ds is None:
        return None
    last = next((h for h in reversed(trainer.state.log_history) if "eval_s2t_r1" in h), None)
    if last is None or last.get("step") != trainer.state.global_step or load_best:
        trainer.evaluate()
    elif trainer.last_retrieval is None:  # finishing a save: the last step's evaluation, not logged twice
        trainer.retrieval_metrics(eval_ds)
    history = [{k: v for k, v in h.items() if k.startswith("eval_") or k in ("step", "epoch")}
               for h in trainer.state.log_history if "eval_s2t_r1" in h]
    r, ch = trainer.last_retrieval["retrieval"], trainer.last_retrieval["chance"]
    logger.info("validation retrieval: slide→text R@1 %.3f (chance %.3f), text→slide R@1 %.3f (chance %.3f)",
                r["s2t_r1"], ch["s2t_r1"], r["t2s_r1"], ch["t2s_r1"])
    return {"step": trainer.state.global_step, **trainer.last_retrieval, "history": history}


def save_final(model: SlideTextModel, cfg: TrainConfig, out_dir: Path, log_history: list[dict], summary: dict | None,
               step: int, max_steps: int) -> None:
    """The final stage-1 files, written into ``.final.tmp`` and moved into place
    (:func:`~wsi_llava.train.final.publish_final`; a full disk says so and leaves no temporary files),
    then the completion marker ``run_complete.json``."""
    def write(tmp: Path) -> None:
        save_stage1(model, tmp)
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(_config_dump(cfg), sort_keys=False), encoding="utf-8")
        (tmp / "log_history.json").write_text(json.dumps(log_history, indent=1), encoding="utf-8")
        if summary is not None:
            (tmp / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")

    out_dir.mkdir(parents=True, exist_ok=True)
    final.remove_marker(out_dir)
    files = final.publish_final(out_dir, write)
    final.write_marker(out_dir, step, max_steps, final.config_identity(_config_dump(cfg)), files)


def write_stage1_config(out_dir: Path, description: dict) -> None:
    """``contrastive_config.json`` (atomically); a full disk says so and leaves no temporary file."""
    path = out_dir / STAGE1_CONFIG
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(description, indent=2))
    except OSError as e:  # atomic_write_text removed its temporary file
        raise CheckpointError(f"could not write {path}: {write_error_text(e, path)}") from e


def run_contrastive(cfg: TrainConfig) -> Path:
    """Train stage 1 as configured; returns the output folder (see the module docstring)."""
    from transformers import TrainingArguments

    run = start_run(cfg, _config_dump(cfg))
    if run.finished:
        return run.out_dir  # a finished run is final: nothing is read beyond the marker, nothing written
    training, out_dir, identity, seed = run.training, run.out_dir, run.identity, run.seed
    train_pairs = load_pairs(cfg, cfg.data.dataset, cfg.data.split, None, out_dir, "dataset")
    feature_dim = read_slide_meta(train_pairs[0].record.h5_path)[1]
    eval_pairs = (load_pairs(cfg, cfg.data.eval_dataset, cfg.data.eval_split, feature_dim, out_dir, "eval_dataset")
                  if cfg.data.eval_dataset else [])
    model, tokenizer = build_stage1_model(cfg, feature_dim)
    train_ds = make_dataset(train_pairs, tokenizer, cfg, feature_dim, True, seed, "dataset")
    eval_ds = make_dataset(eval_pairs, tokenizer, cfg, feature_dim, False, seed, "eval_dataset") if eval_pairs else None

    training, resume, checkpoint_limit = trainer_arguments(cfg, training, eval_ds is not None)
    training.setdefault("ddp_find_unused_parameters", False)  # every trainable weight is used in each step
    args = TrainingArguments(remove_unused_columns=False, **training)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("stage 1 on %d process(es): %d train pair(s), %d eval pair(s); slide tower %s, text tower %s; "
                "%d trainable parameter(s)", args.world_size, len(train_ds), len(eval_pairs),
                "frozen" if model.cfg.freeze_slide_tower else "trainable",
                "frozen" if model.cfg.freeze_text_tower else "trainable", n_train)
    trainer = ContrastiveTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                 data_collator=SlideTextCollator(pad_token_id(tokenizer)), processing_class=tokenizer,
                                 callbacks=[EpochCallback(train_ds)], checkpoint_limit=checkpoint_limit)
    checkpoint, end = trainer.find_resume_at_end(resume)
    if end is not None:  # nothing left to train
        if final.already_final(out_dir, checkpoint_step(checkpoint), end, identity):
            return out_dir
        _finish_without_training(trainer, cfg, out_dir, Path(checkpoint), end, feature_dim)
        return out_dir
    if trainer.is_world_process_zero():
        final.remove_marker(out_dir)  # the final model is about to change
        write_stage1_config(out_dir, stage1_description(cfg, model, feature_dim))
    trainer.train(resume_from_checkpoint=checkpoint)
    summary = final_summary(trainer, eval_ds, args.load_best_model_at_end)
    if trainer.is_world_process_zero():
        save_final(trainer.accelerator.unwrap_model(trainer.model), cfg, out_dir, trainer.state.log_history, summary,
                   trainer.state.global_step, trainer.state.max_steps)
    return out_dir


def _finish_without_training(trainer: ContrastiveTrainer, cfg: TrainConfig, out_dir: Path, checkpoint: Path,
                             max_steps: int, feature_dim: int) -> None:
    """The newest checkpoint is the end of training but the final save did not finish (killed, disk
    full): write the final files from it as the end of training would have (the best checkpoint's
    weights with ``load_best_model_at_end``, the validation set scored with them), training nothing."""
    from transformers import TrainerState
    from transformers.trainer import TRAINER_STATE_NAME

    step = checkpoint_step(checkpoint)
    state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
    weights = final.final_weights(checkpoint, state.best_model_checkpoint, trainer.args.load_best_model_at_end)
    logger.info("%s is the end of training (step %d of %d); writing the final model from %s without training",
                checkpoint, step, max_steps, weights)
    model = trainer.accelerator.unwrap_model(trainer.model)
    load_checkpoint_weights(model, weights)
    trainer.state = state  # the run's log history, step and epoch, as at the end of training
    summary = final_summary(trainer, trainer.eval_dataset, trainer.args.load_best_model_at_end)
    if trainer.is_world_process_zero():
        write_stage1_config(out_dir, stage1_description(cfg, model, feature_dim))
        save_final(model, cfg, out_dir, state.log_history, summary, step, max_steps)
