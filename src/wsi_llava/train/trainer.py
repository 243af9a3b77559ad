"""The Hugging Face ``Trainer`` wired for WSI-LLaVA: LoRA+ parameter groups, the zeroed-slide sanity
check at evaluation, per-epoch tile resampling."""

from __future__ import annotations

import logging

from transformers import Trainer, TrainerCallback

from .checkpoint import CrashSafeCheckpoints

logger = logging.getLogger(__name__)


class EpochCallback(TrainerCallback):
    """Tells datasets which epoch starts, so tile sampling is seeded per (seed, epoch, index)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(state.epoch or 0))


class WsiTrainer(CrashSafeCheckpoints, Trainer):
    """``Trainer`` + LoRA+ learning rates + ``eval_sanity_check_loss`` + crash-safe checkpoints and
    verified resume (:class:`~wsi_llava.train.checkpoint.CrashSafeCheckpoints`; ``checkpoint_limit=``)."""

    def __init__(self, *args, loraplus_lr_ratio: float | None = None, do_sanity_check: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.do_sanity_check = do_sanity_check

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
