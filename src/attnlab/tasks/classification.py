"""Sequence classification (IMDb sentiment): a pooled linear head on a bidirectional backbone."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from attnlab.models import Backbone, SequenceClassifier
from attnlab.tasks.base import SPLITS, OptimizerFactory, TaskModule


class ClassificationTask(TaskModule):
    """Cross-entropy over class logits; accuracy per split (torchmetrics).

    Batches: ``input_ids (b, n)``, ``padding_mask (b, n)`` bool (True = real token),
    ``labels (b,)``. Logs ``<split>/loss`` (nats) and ``<split>/acc``.

    Args:
        backbone: a bidirectional :class:`~attnlab.models.Backbone`.
        vocab_size: unused (the head maps to classes); part of the task contract.
        optim, run_config: see :class:`~attnlab.tasks.base.TaskModule`.
        num_classes: classes C of the head ``(b, D) -> (b, C)``.
        pooling: ``mean | max | cls`` over real tokens (:class:`~attnlab.models.SequenceClassifier`).
    """

    causal: ClassVar[bool] = False
    metric: ClassVar[str] = "acc"
    metric_unit: ClassVar[str] = "accuracy"

    def __init__(
        self,
        backbone: Backbone,
        vocab_size: int,
        optim: OptimizerFactory | dict[str, Any],
        run_config: dict | None = None,
        num_classes: int = 2,
        pooling: str = "mean",
    ):
        super().__init__(SequenceClassifier(backbone, num_classes, pooling), optim, run_config)
        self.num_classes = num_classes
        # keys are "<split>_acc": a ModuleDict key "train" would clash with nn.Module.train
        self.acc = nn.ModuleDict(
            {f"{s}_acc": MulticlassAccuracy(num_classes, average="micro") for s in SPLITS}
        )
        # checkpointed: a run resumed mid-epoch reports the whole epoch's training accuracy
        self.acc["train_acc"].persistent(True)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(self.model(batch["input_ids"], batch["padding_mask"]).float(),
                               batch["labels"])  # fmt: skip

    def synthetic_batch(
        self, batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator
    ) -> dict[str, Tensor]:
        ids = torch.randint(1, vocab_size, (batch_size, seq_len), generator=generator)
        labels = torch.randint(0, self.num_classes, (batch_size,), generator=generator)
        return {
            "input_ids": ids,
            "padding_mask": torch.ones(batch_size, seq_len, dtype=torch.bool),
            "labels": labels,
        }

    @torch.no_grad()
    def score(self, batch: dict[str, Tensor]) -> tuple[float, float]:
        logits = self.model(batch["input_ids"], batch["padding_mask"])
        return float((logits.argmax(-1) == batch["labels"]).sum()), float(batch["labels"].numel())

    def step(self, batch: dict[str, Tensor], split: str) -> Tensor:
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
