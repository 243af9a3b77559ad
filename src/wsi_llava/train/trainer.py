"""The Hugging Face ``Trainer`` wired for WSI-LLaVA: crash-safe checkpoints through public hooks
(commit callback, verified resume, rotation after the commit; see :mod:`wsi_llava.train.checkpoint`),
LoRA+ parameter groups, the zeroed-slide sanity check at evaluation, per-epoch tile resampling."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..fileio import write_error_text
from ..model.saving import apply_parts, is_parts_folder, save_trained
from .checkpoint import (
    CheckpointError,
    checkpoint_step,
    clean_staging,
    is_complete,
    newest_complete,
    remove_checkpoint,
    remove_uncommitted,
    resolve_resume,
    rotate_checkpoints,
    write_manifest,
)

logger = logging.getLogger(__name__)


class EpochCallback(TrainerCallback):
    """Tells datasets which epoch starts, so tile sampling is seeded per (seed, epoch, index)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(state.epoch or 0))


class CommitCheckpoints(TrainerCallback):
    """Commits each checkpoint the ``Trainer`` saved: on ``on_save`` (after every rank wrote its files)
    the saving rank fsyncs the folder, writes the manifest (the commit) and then applies
    ``checkpoint_limit`` over committed checkpoints (never the newest nor the best). A step about to
    be saved again first loses its old folder (:meth:`before_save`, called by
    :meth:`CrashSafeCheckpoints.save_model` whatever the save strategy), so no stale committed files are
    overwritten in place."""

    def __init__(self, trainer, checkpoint_limit: int | None):
        self.trainer = trainer
        self.checkpoint_limit = checkpoint_limit

    def before_save(self, args, state, output_dir: str | os.PathLike) -> None:
        """Before the ``Trainer`` writes into ``output_dir``: when it is this step's checkpoint folder and
        exists already (the step saved again), the saving rank removes it; every rank waits for that."""
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if Path(output_dir) != folder:
            return  # the final save, or a folder of the user's
        if args.should_save and folder.exists():
            remove_checkpoint(folder)
        self.trainer.accelerator.wait_for_everyone()  # no rank writes into the folder before it is gone

    def on_save(self, args, state, control, **kwargs):
        run_dir = Path(args.output_dir)
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self.trainer.accelerator.wait_for_everyone()  # every rank's files (RNG states) are written
        if args.should_save:
            write_manifest(folder, state.global_step)
            try:
                rotate_checkpoints(run_dir, self.checkpoint_limit, protect=[state.best_model_checkpoint])
            except OSError as e:  # the new checkpoint is safe; an old one lingering is not fatal
                logger.warning("could not delete an old checkpoint in %s: %s", run_dir, e)
        self.trainer.accelerator.wait_for_everyone()
        return control


class CrashSafeCheckpoints:
    """Mixin for a ``transformers.Trainer`` subclass (list it before ``Trainer``): committed,
    checksummed checkpoints (:class:`CommitCheckpoints`), rotation over committed checkpoints, verified
    resume, and a failed save turned into a :class:`CheckpointError`. Uses public ``Trainer`` API only
    (``train``, ``add_callback``, ``accelerator``, ``state``, ``args``).

    ``checkpoint_limit``: how many committed checkpoints to keep (``save_total_limit``); default
    ``args.save_total_limit``, which is then taken over (set to None) so that Hugging Face's own
    rotation, which runs before the commit and by modification time, never deletes a checkpoint.
    """

    def __init__(self, *args, checkpoint_limit: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint_limit = checkpoint_limit if checkpoint_limit is not None else self.args.save_total_limit
        if self.args.save_total_limit is not None:
            logger.info("save_total_limit %s: applied by WSI-LLaVA after each commit", self.args.save_total_limit)
            self.args.save_total_limit = None
        self.commit = CommitCheckpoints(self, self.checkpoint_limit)
        self.add_callback(self.commit)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` (public), called by every rank for each checkpoint: a folder of this step
        saved before is removed first (:meth:`CommitCheckpoints.before_save`), then :meth:`write_model`."""
        if output_dir is not None:
            self.commit.before_save(self.args, self.state, output_dir)
        self.write_model(output_dir, _internal_call)

    def write_model(self, output_dir: str | None, _internal_call: bool = False) -> None:
        """What a save writes: Hugging Face's own ``save_model``."""
        super().save_model(output_dir, _internal_call)

    # -- resume -------------------------------------------------------------------------------
    def find_resume(self, resume_from_checkpoint) -> str | None:
        """Remove staging leftovers and uncommitted ``checkpoint-N`` folders, then resolve
        ``resume_from_checkpoint`` with :func:`resolve_resume` (the checkpoint is verified); remembered,
        so :meth:`train` with the same value or with the returned folder does not verify it again."""
        memo = getattr(self, "resume_memo", None)
        if memo is not None and (resume_from_checkpoint is memo[0] or resume_from_checkpoint == memo[0]
                                 or (memo[1] is not None and resume_from_checkpoint == memo[1])):
            return memo[1]
        run_dir = Path(self.args.output_dir)
        if self.args.should_save:
            clean_staging(run_dir)
            remove_uncommitted(run_dir)
        self.accelerator.wait_for_everyone()
        resume = resolve_resume(resume_from_checkpoint, run_dir)
        self.resume_memo = (resume_from_checkpoint, resume)
        return resume

    def find_resume_at_end(self, resume_from_checkpoint) -> tuple[str | None, int | None]:
        """:meth:`find_resume`'s checkpoint and, when it is already at the end of training (its step >=
        ``max_steps``: a run never resumes into more steps), ``max_steps``; else None."""
        checkpoint = self.find_resume(resume_from_checkpoint)
        if checkpoint is None:
            return None, None
        args = self.args
        max_steps = args.max_steps if args.max_steps > 0 else \
            self.set_initial_training_values(args, self.get_train_dataloader())[-1]
        return checkpoint, (max_steps if checkpoint_step(checkpoint) >= max_steps else None)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train`` after :meth:`find_resume`. An error while a checkpoint was being written
        (its folder present, not committed) removes that folder and becomes a :class:`CheckpointError`
        naming the step, the folder and the last committed checkpoint."""
        resume = self.find_resume(resume_from_checkpoint)
        try:
            return super().train(resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                                 **kwargs)
        except Exception as e:
            run_dir = Path(self.args.output_dir)
            step = self.state.global_step
            folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            if not folder.exists() or is_complete(folder):
                raise  # not a failed save
            where = write_error_text(e, folder)
            if self.args.should_save:
                try:
                    remove_checkpoint(folder)
                except OSError:
                    shutil.rmtree(folder, ignore_errors=True)
            last = newest_complete(run_dir)
            raise CheckpointError(
                f"could not save the checkpoint of step {step} to {folder}: {where}. "
                f"The partial checkpoint was removed; the last good checkpoint is "
                f"{last if last is not None else 'none (no complete checkpoint yet)'}. Free space or fix the error, "
                f"then rerun with resume_from_checkpoint: true.") from e


class PartialLoadFilter(logging.Filter):
    """Drops Hugging Face's "missing keys" warning when it loads a parts checkpoint: the base LM's tensors
    are left out of it by design, and :meth:`WsiTrainer.train` applies the parts strictly itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("There were missing keys in the checkpoint model loaded")


class WsiTrainer(CrashSafeCheckpoints, Trainer):
    """``Trainer`` + LoRA+ learning rates + ``eval_sanity_check_loss`` + crash-safe checkpoints and
    verified resume (:class:`CrashSafeCheckpoints`; ``checkpoint_limit=``) holding only what trains
    (:func:`~wsi_llava.model.saving.save_trained`)."""

    def __init__(self, *args, loraplus_lr_ratio: float | None = None, do_sanity_check: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.do_sanity_check = do_sanity_check

    def write_model(self, output_dir: str | None, _internal_call: bool = False) -> None:
        """The model's trained parts (or the whole model, see :func:`~wsi_llava.model.saving.save_trained`),
        the tokenizer and the training arguments; DeepSpeed and FSDP keep Hugging Face's own save."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super().write_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            save_trained(self.accelerator.unwrap_model(self.model), output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """:meth:`CrashSafeCheckpoints.train`; a parts checkpoint to resume from is first applied strictly
        (with the added-token embedding rows, which Hugging Face's own partial load does not know)."""
        resume = self.find_resume(resume_from_checkpoint)
        if resume is not None and is_parts_folder(resume):
            apply_parts(self.accelerator.unwrap_model(self.model), resume)
        quiet = PartialLoadFilter()
        hf_logger = logging.getLogger("transformers.trainer")
        hf_logger.addFilter(quiet)
        try:
            return super().train(resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                                 **kwargs)
        finally:
            hf_logger.removeFilter(quiet)

    def create_optimizer(self, model=None):
        """With ``loraplus_lr_ratio``: LoRA B matrices get ``learning_rate × ratio`` (LoRA+), the rest the
        base rate; weight decay as the Trainer applies it (not on biases and norms)."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        model = model or self.model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups.setdefault(("lora_B" in name, name in decay), []).append(p)
        lr = self.args.learning_rate
        param_groups = [{"params": ps, "lr": lr * self.loraplus_lr_ratio if is_b else lr,
                         "weight_decay": self.args.weight_decay if dec else 0.0}
                        for (is_b, dec), ps in groups.items()]
        opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        opt_kwargs.pop("lr", None)
        self.optimizer = opt_cls(param_groups, lr=lr, **opt_kwargs)
        return self.optimizer

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Evaluate; with ``do_sanity_check`` also the loss with zeroed slide features, logged as
        ``{prefix}_sanity_check_loss`` — if it is not clearly higher, the model ignores the slide."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if self.do_sanity_check and dataset is not None and hasattr(dataset, "zero_features"):
            dataset.zero_features = True
            try:
                dl = self.get_eval_dataloader(dataset)
                out = self.evaluation_loop(dl, description="Sanity check (zeroed slides)", prediction_loss_only=True,
                                           metric_key_prefix=f"{metric_key_prefix}_sanity_check")
            finally:
                dataset.zero_features = False
            extra = {k: v for k, v in out.metrics.items() if k.endswith("_loss")}
            self.log(extra)
            metrics.update(extra)
        return metrics
