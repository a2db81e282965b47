"""The task contract: a LightningModule that adds its head to a backbone (DESIGN.md, 6).

A task is a component, like an attention variant: ``conf/task/<name>.yaml`` names its data
module (``task.data._target_``) and its task class (``task.module._target_``), and
:func:`attnlab.build.build_task` builds ``backbone -> task`` from them with no task-kind switch.
A task class

- says whether it needs a causal backbone (:attr:`TaskModule.causal`);
- builds its model around the backbone (a classifier head, an LM head) in ``__init__``;
- owns its loss (:meth:`TaskModule.loss`), its torchmetrics objects per split and what it logs
  (``train/loss``, ``val/loss``, ``val/<metric>``, ``test/...``);
- makes a synthetic batch of its shape for benchmarks (:meth:`TaskModule.synthetic_batch`);
- scores a batch for ``attnlab analyze`` (:meth:`TaskModule.score`, summed over examples).

It knows nothing about which attention variant runs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from attnlab.optim import build_optimizer

#: ``optimizer(model, total_steps=...) -> (optimizer, lr scheduler)``: ``conf/optim/*.yaml``
#: instantiated (``_partial_: true``), e.g. :func:`attnlab.optim.build_optimizer` with its settings.
OptimizerFactory = Callable[..., tuple[torch.optim.Optimizer, Any]]

SPLITS = ("train", "val", "test")


class TaskModule(pl.LightningModule):
    """Shared optimiser/scheduler wiring and config-in-checkpoint; the base of every task.

    Subclasses take ``(backbone, vocab_size, optim, run_config=None, **their options)``, build
    ``model`` around the backbone and pass it here.

    Args:
        model: the task's network (backbone + head), e.g. a
            :class:`~attnlab.models.SequenceClassifier` or :class:`~attnlab.models.LanguageModel`.
        optim: an optimiser factory (``conf/optim/*.yaml``, a ``functools.partial`` of
            :func:`attnlab.optim.build_optimizer` or of another function with the same call), or
            a dict of :func:`~attnlab.optim.build_optimizer`'s keyword arguments.
        run_config: the resolved run config, stored in every checkpoint so
            ``attnlab evaluate``/``generate``/``analyze`` can rebuild the model.
    """

    #: the backbone this task needs: causal (language modelling, recall) or bidirectional
    causal: ClassVar[bool] = False
    #: the metric logged as ``<split>/<metric>`` and scored by :meth:`score`, and its unit
    metric: ClassVar[str] = "loss"
    metric_unit: ClassVar[str] = "nats"

    def __init__(
        self,
        model: nn.Module,
        optim: OptimizerFactory | dict[str, Any],
        run_config: dict | None = None,
    ):
        super().__init__()
        self.model = model
        factory = optim if callable(optim) else partial(build_optimizer, **dict(optim))
        self.optimizer_factory = factory
        #: the optimiser settings (lr, betas, weight_decay, ...), re-applied on resume
        self.optim = dict(getattr(factory, "keywords", {}))
        self.run_config = run_config or {}

    # ---------------------------------------------------------------- the task contract
    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The training loss of ``batch`` (a scalar, mean over its scored positions)."""
        raise NotImplementedError

    def synthetic_batch(
        self, batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """A random batch of this task's shape (``batch_size x seq_len``) for benchmarks."""
        raise NotImplementedError

    def step(self, batch: dict[str, Tensor], split: str) -> Tensor | None:
        """One batch of ``split`` (``train | val | test``): compute, update the split's metrics,
        log; return the loss to optimise for ``train``."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.step(batch, "test")

    def score(self, batch: dict[str, Tensor]) -> tuple[float, float]:
        """``(sum, count)`` of :attr:`metric` over ``batch``; the metric is ``sum / count``.

        Used by ``attnlab analyze`` (head importance) on any model, head-masked or not.
        """
        raise NotImplementedError

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
        opt, sched = self.optimizer_factory(self.model, total_steps=total)
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


def fill_metric_states(module: nn.Module, state_dict: dict[str, Any]) -> None:
    """Add this module's metric states missing from ``state_dict`` (checkpoints written before
    they were saved), so such checkpoints still load strictly: the metrics start from zero."""
    from torchmetrics import Metric

    for name, sub in module.named_modules():
        if isinstance(sub, Metric):
            prefix = f"{name}." if name else ""
            for key, value in sub.state_dict().items():
                state_dict.setdefault(prefix + key, value)
