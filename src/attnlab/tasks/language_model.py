"""Byte-level language modelling (enwik8): next-byte cross-entropy, bits per byte."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.metrics import BitsPerByte, nats_to_bits
from attnlab.models import Backbone, LanguageModel
from attnlab.tasks.base import OptimizerFactory, TaskModule


class LanguageModelTask(TaskModule):
    """Next-byte cross-entropy; bits per byte on val/test (every scored byte once).

    Training batches: ``input_ids (b, n)``, ``targets (b, n)``. Evaluation batches add
    ``loss_mask (b, n)`` marking the target positions to score (sliding window). ``val/loss``
    is in nats per byte; ``val/bpb`` = nats / ln 2 (:class:`~attnlab.metrics.BitsPerByte`).

    Args:
        backbone: a causal :class:`~attnlab.models.Backbone`.
        vocab_size: V of the LM head ``(b, n, D) -> (b, n, V)``.
        optim, run_config: see :class:`~attnlab.tasks.base.TaskModule`.
        tie_embeddings: share the LM head's weight with the token embedding (Press & Wolf 2017).
    """

    causal: ClassVar[bool] = True
    metric: ClassVar[str] = "bpb"
    metric_unit: ClassVar[str] = "bits per byte"

    def __init__(
        self,
        backbone: Backbone,
        vocab_size: int,
        optim: OptimizerFactory | dict[str, Any],
        run_config: dict | None = None,
        tie_embeddings: bool = True,
    ):
        super().__init__(LanguageModel(backbone, vocab_size, tie_embeddings), optim, run_config)
        self.bpb = nn.ModuleDict({f"{s}_bpb": BitsPerByte() for s in ("val", "test")})

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self.model(batch["input_ids"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten())

    def synthetic_batch(
        self, batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator
    ) -> dict[str, Tensor]:
        shape = (batch_size, seq_len)
        return {
            "input_ids": torch.randint(0, vocab_size, shape, generator=generator),
            "targets": torch.randint(0, vocab_size, shape, generator=generator),
        }

    def scored_nats(self, batch: dict[str, Tensor]) -> Tensor:
        """Cross-entropy in nats ``(N,)`` of the scored target positions of ``batch``."""
        logits = self.model(batch["input_ids"])
        nats = F.cross_entropy(
            logits.flatten(0, 1).float(), batch["targets"].flatten(), reduction="none"
        )
        mask = batch.get("loss_mask")
        return nats if mask is None else nats[mask.flatten()]

    @torch.no_grad()
    def score(self, batch: dict[str, Tensor]) -> tuple[float, float]:
        nats = self.scored_nats(batch)
        return float(nats_to_bits(nats.double().sum())), float(nats.numel())

    def step(self, batch: dict[str, Tensor], split: str) -> Tensor | None:
        if split == "train":
            loss = self.loss(batch)
            self._log_loss("train", loss, batch["targets"].numel())
            return loss
        scored = self.scored_nats(batch)
        bpb = self.bpb[f"{split}_bpb"]
        bpb.update(scored)
        self._log_loss(split, scored.mean(), scored.numel())
        self.log(f"{split}/bpb", bpb, on_step=False, on_epoch=True, prog_bar=True)
        return None
