"""Thin LightningModules, one per task (DESIGN.md, convention 6).

A task takes a built model and the optimiser settings, owns its torchmetrics
objects per split, and logs ``train/loss``, ``val/loss``, ``val/acc`` or
``val/bpb``, ``test/...``. It knows nothing about which attention variant runs.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from attnlab.metrics import BitsPerByte
from attnlab.optim import build_optimizer

SPLITS = ("train", "val", "test")


class TaskModule(pl.LightningModule):
    """Shared optimiser/scheduler wiring and config-in-checkpoint.

    Args:
        model: a built :class:`~attnlab.models.SequenceClassifier` or
            :class:`~attnlab.models.LanguageModel`.
        optim: keyword arguments of :func:`attnlab.optim.build_optimizer`
            (lr, weight_decay, betas, warmup_steps, min_lr_ratio).
        run_config: the resolved run config, stored in every checkpoint so
            ``attnlab evaluate``/``generate`` can rebuild the model.
    """

    def __init__(self, model: nn.Module, optim: dict[str, Any], run_config: dict | None = None):
        super().__init__()
        self.model = model
        self.optim = dict(optim)
        self.run_config = run_config or {}

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.model(*args, **kwargs)

    def configure_optimizers(self) -> dict:
        total = self.trainer.estimated_stepping_batches
        limit = (self.run_config.get("trainer") or {}).get("max_steps", -1) or -1
        if limit > 0:  # attnlab enforces trainer.max_steps itself (attnlab.interrupts)
            total = min(total, limit)
        if total == float("inf"):
            raise ValueError(
                "trainer.max_epochs=-1 and trainer.max_steps=-1: the run would never end and the "
                "learning-rate schedule has no length; set one of them."
            )
        total = int(total)
        opt, sched = build_optimizer(self.model, total_steps=total, **self.optim)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        """(Re)apply ``optim.*`` to the restored optimiser and schedule.

        Resuming restores the optimiser's and scheduler's states from the checkpoint, which
        carry the old lr, betas and weight decay; a resumed run whose ``optim.*`` changed must
        use the new ones (the new warmup/cosine shape comes from :meth:`configure_optimizers`).
        For an unchanged or fresh run this recomputes the same values.
        """
        opt = self.optimizers(use_pl_optimizer=False)
        sched = self.lr_schedulers()
        if opt is None or sched is None:
            return
        lr = float(self.optim.get("lr", opt.param_groups[0].get("initial_lr", 0.0)))
        for i, group in enumerate(opt.param_groups):
            group["initial_lr"] = lr
            if "betas" in self.optim:
                group["betas"] = tuple(self.optim["betas"])
            if i == 0 and "weight_decay" in self.optim:  # group 0 decays (parameter_groups)
                group["weight_decay"] = float(self.optim["weight_decay"])
        sched.base_lrs = [lr for _ in opt.param_groups]
        for group, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * fn(sched.last_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["attnlab_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        fill_metric_states(self, checkpoint["state_dict"])

    def _log_loss(self, split: str, loss: Tensor, batch_size: int) -> None:
        self.log(
            f"{split}/loss",
            loss,
            on_step=split == "train",
            on_epoch=split != "train",
            prog_bar=True,
            batch_size=batch_size,
            sync_dist=split != "train",
        )


class ClassificationTask(TaskModule):
    """Cross-entropy over class logits; accuracy per split (torchmetrics).

    Batches: ``input_ids (b, n)``, ``padding_mask (b, n)`` bool, ``labels (b,)``.
    """

    def __init__(
        self,
        model: nn.Module,
        optim: dict[str, Any],
        run_config: dict | None = None,
        num_classes: int = 2,
    ):
        super().__init__(model, optim, run_config)
        # keys are "<split>_acc": a ModuleDict key "train" would clash with nn.Module.train
        self.acc = nn.ModuleDict(
            {f"{s}_acc": MulticlassAccuracy(num_classes, average="micro") for s in SPLITS}
        )
        # checkpointed: a run resumed mid-epoch reports the whole epoch's training accuracy
        self.acc["train_acc"].persistent(True)

    def _step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        logits = self.model(batch["input_ids"], batch["padding_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        n = batch["labels"].shape[0]
        self._log_loss(split, loss, n)
        acc = self.acc[f"{split}_acc"]
        acc(logits.argmax(-1), batch["labels"])
        self.log(
            f"{split}/acc",
            acc,
            on_step=False,
            on_epoch=True,
            prog_bar=split != "train",
            batch_size=n,
        )
        return loss

    def on_train_epoch_start(self) -> None:
        # not called when resuming mid-epoch, where the restored partial state must be kept; a
        # checkpoint from an epoch's end still holds that epoch's counts, so clear them here
        self.acc["train_acc"].reset()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")


class LanguageModelTask(TaskModule):
    """Next-byte cross-entropy; bits per byte on val/test (every scored byte once).

    Training batches: ``input_ids (b, n)``, ``targets (b, n)``. Evaluation batches
    add ``loss_mask (b, n)`` marking the target positions to score (sliding window).
    ``val/loss`` is in nats per byte; ``val/bpb`` = nats / ln 2.
    """

    def __init__(self, model: nn.Module, optim: dict[str, Any], run_config: dict | None = None):
        super().__init__(model, optim, run_config)
        self.bpb = nn.ModuleDict({f"{s}_bpb": BitsPerByte() for s in ("val", "test")})

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.model(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())
        self._log_loss("train", loss, batch["targets"].numel())
        return loss

    def _eval_step(self, batch: dict[str, Tensor], split: str) -> None:
        logits = self.model(batch["input_ids"])
        nats = F.cross_entropy(
            logits.flatten(0, 1).float(), batch["targets"].flatten(), reduction="none"
        )
        mask = batch["loss_mask"].flatten()
        scored = nats[mask]
        bpb = self.bpb[f"{split}_bpb"]
        bpb.update(scored)
        self._log_loss(split, scored.mean(), int(mask.sum()))
        self.log(f"{split}/bpb", bpb, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")


TASKS: dict[str, type[TaskModule]] = {"classification": ClassificationTask, "lm": LanguageModelTask}


def fill_metric_states(module: nn.Module, state_dict: dict[str, Any]) -> None:
    """Add this module's metric states missing from ``state_dict`` (checkpoints written before
    they were saved), so such checkpoints still load strictly: the metrics start from zero."""
    from torchmetrics import Metric

    for name, sub in module.named_modules():
        if isinstance(sub, Metric):
            prefix = f"{name}." if name else ""
            for key, value in sub.state_dict().items():
                state_dict.setdefault(prefix + key, value)
