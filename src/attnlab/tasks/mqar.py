"""Multi-query associative recall (MQAR): the synthetic recall probe for attention variants.

Arora, Eyuboglu et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language
Models", section 3 and Fig. 2. Each sequence of ``seq_len`` tokens starts with ``num_kv_pairs``
key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys from ``[1, vocab/2)``, distinct values from
``[vocab/2, vocab)``); the rest is random tokens in which every key is queried once more, at
gap ``2 * g`` after the pairs, ``g`` drawn without replacement with probability
``p(g) ~ power_a * g ** (power_a - 1)`` (power-law gaps: most queries close, some far). At a
query position the model must output that key's value; only these positions are scored
(loss and accuracy), as in the paper.

One file is the whole task (README, "Adding a task"): :func:`mqar_batch` (the generator),
:class:`MQARDataModule` (seeded data made on the fly: the training batch of global step ``g``
is a pure function of ``(seed, g)``, so resumes are exact; fixed validation and test sets per
seed) and :class:`MQARTask` (a causal LM head, cross-entropy and accuracy on query positions).
``attnlab train task=mqar``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from attnlab.data.batching import eval_sampler, loader_generator
from attnlab.data.windows import StepResumable, StepSampler
from attnlab.models import Backbone, LanguageModel
from attnlab.tasks.base import SPLITS, OptimizerFactory, TaskModule

#: target of the positions that are not scored (not a query)
IGNORE = -100


def check_mqar(vocab_size: int, seq_len: int, num_kv_pairs: int, power_a: float) -> None:
    """Raise ``ValueError`` (naming the setting and a valid value) for an impossible MQAR shape."""
    for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len),
                        ("num_kv_pairs", num_kv_pairs)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"task.data.{name} must be a positive integer, got {value!r}.")
    if not 0 < float(power_a) <= 1:
        raise ValueError(
            f"task.data.power_a={power_a!r} must be in (0, 1] (1 = uniform gaps; the paper's 0.01)."
        )
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"task.data.num_kv_pairs={num_kv_pairs} needs seq_len >= 4 x num_kv_pairs = "
            f"{4 * num_kv_pairs} (the pairs, then room for every query), got seq_len={seq_len}: "
            "raise task.max_len or lower num_kv_pairs."
        )
    if vocab_size // 2 - 1 < num_kv_pairs or vocab_size - vocab_size // 2 < num_kv_pairs:
        raise ValueError(
            f"task.data.vocab_size={vocab_size} is too small for {num_kv_pairs} distinct keys and "
            f"values: use vocab_size >= {2 * num_kv_pairs + 2}."
        )


def mqar_batch(
    n: int,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """``n`` MQAR sequences: ``(input_ids (n, seq_len), targets (n, seq_len))`` (long).

    ``targets`` is :data:`IGNORE` except at each query position ``t`` (a key repeated), where
    it is that key's value: the model reads the key at ``t`` and must emit the value there (the
    paper's labels shifted onto the query token, as in a next-token LM).

    Raises:
        ValueError: see :func:`check_mqar`.
    """
    check_mqar(vocab_size, seq_len, num_kv_pairs, power_a)
    kv, half = num_kv_pairs, vocab_size // 2
    ctx = 2 * kv
    # distinct keys in [1, half) and values in [half, vocab): a random permutation's first kv
    keys = torch.rand(n, half - 1, generator=generator).argsort(dim=1)[:, :kv] + 1
    values = torch.rand(n, vocab_size - half, generator=generator).argsort(dim=1)[:, :kv] + half
    inputs = torch.randint(0, vocab_size, (n, seq_len), generator=generator)  # random filler
    inputs[:, 0:ctx:2], inputs[:, 1:ctx:2] = keys, values
    space = (seq_len - ctx) // 2
    g = torch.arange(1, space + 1, dtype=torch.float64)
    p = (power_a * g ** (power_a - 1)).float()
    gaps = torch.multinomial(p.expand(n, space), kv, replacement=False, generator=generator)
    where = ctx + 2 * gaps
    inputs.scatter_(1, where, keys)
    targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    targets.scatter_(1, where, values)
    return inputs, targets


def _seed(*parts: int) -> int:
    """A 63-bit torch seed from integers (NumPy's SeedSequence mixes them)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


class _StepBatches(Dataset):
    """Training examples indexed so that global batch ``g = i // global_batch`` is a pure
    function of ``(seed, g)`` (read by :class:`~attnlab.data.windows.StepSampler`)."""

    def __init__(self, make: Any, global_batch: int, num_samples: int, seed: int) -> None:
        self.make, self.global_batch, self.num_samples, self.seed = (
            make,
            global_batch,
            num_samples,
            seed,
        )
        self._cached: tuple[int, tuple[Tensor, Tensor] | None] = (-1, None)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        g, k = divmod(int(i), self.global_batch)
        if self._cached[0] != g:
            gen = torch.Generator().manual_seed(_seed(self.seed, 0, g))
            self._cached = (g, self.make(self.global_batch, gen))
        inputs, targets = self._cached[1]
        return {"input_ids": inputs[k], "targets": targets[k]}


class MQARDataModule(StepResumable, pl.LightningDataModule):
    """MQAR data, generated on the fly from ``seed`` (nothing is read from disk).

    Args:
        vocab_size: tokens V (keys from ``[1, V/2)``, values from ``[V/2, V)``); the paper: 8,192.
        seq_len: tokens per sequence (the task's ``max_len``); the paper: 64 to 512.
        num_kv_pairs: key-value pairs per sequence, each queried once; the paper: 4 to 64.
        power_a: the power-law exponent of the query gaps (paper: 0.01; 1 = uniform).
        batch_size: sequences per training batch (per process).
        train_batches_per_epoch: batches per nominal epoch (every batch is new data).
        num_val, num_test: sizes of the fixed validation and test sets of this seed.
        seed: data seed; training batch ``g`` is a pure function of ``(seed, g)``.
        eval_batch_size: sequences per evaluation batch (default 2 x batch_size).
        num_workers: DataLoader workers.
        limit_val, limit_test: score only the first N sequences of that split.

    Raises:
        ValueError: an impossible shape (:func:`check_mqar`) or a non-positive count.
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        seq_len: int = 64,
        num_kv_pairs: int = 8,
        power_a: float = 0.01,
        batch_size: int = 64,
        train_batches_per_epoch: int = 500,
        num_val: int = 1000,
        num_test: int = 3000,
        seed: int = 0,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        limit_val: int | None = None,
        limit_test: int | None = None,
    ) -> None:
        super().__init__()
        check_mqar(vocab_size, seq_len, num_kv_pairs, power_a)
        for name, value in (("batch_size", batch_size), ("num_val", num_val),
                            ("num_test", num_test),
                            ("train_batches_per_epoch", train_batches_per_epoch)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"task.data.{name} must be a positive integer, got {value!r}.")
        self.vocab_size, self.seq_len, self.num_kv_pairs = vocab_size, seq_len, num_kv_pairs
        self.power_a, self.batch_size = float(power_a), batch_size
        self.train_batches_per_epoch, self.seed = train_batches_per_epoch, int(seed)
        self.sizes = {"val": num_val, "test": num_test}
        self.eval_batch_size = int(eval_batch_size or 2 * batch_size)
        self.num_workers = num_workers
        self.limits: dict[str, int | None] = {"val": limit_val, "test": limit_test}
        self._eval: dict[str, tuple[Tensor, Tensor]] = {}

    def make(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` sequences of this module's shape (:func:`mqar_batch`)."""
        return mqar_batch(n, self.vocab_size, self.seq_len, self.num_kv_pairs, self.power_a,
                          generator)  # fmt: skip

    def eval_set(self, split: str) -> tuple[Tensor, Tensor]:
        """The fixed ``(input_ids, targets)`` of ``val`` or ``test`` for this seed (limited)."""
        if split not in self._eval:
            tag = 1 + SPLITS.index(split)  # 0 is training
            gen = torch.Generator().manual_seed(_seed(self.seed, tag))
            self._eval[split] = self.make(self.sizes[split], gen)
        inputs, targets = self._eval[split]
        limit = self.limits.get(split)
        return (inputs[:limit], targets[:limit]) if limit else (inputs, targets)

    def setup(self, stage: str | None = None) -> None:
        for split in ("val", "test") if stage in (None, "fit", "validate") else ("test",):
            self.eval_set(split)

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        if trainer is not None and trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "trainer.accumulate_grad_batches > 1 is not supported for MQAR (training batches "
                "are indexed by optimizer step): raise task.data.batch_size instead"
            )
        global_batch = self.batch_size * world
        ds = _StepBatches(self.make, global_batch,
                          self.train_batches_per_epoch * global_batch, self.seed)  # fmt: skip
        sampler = StepSampler(ds, self.batch_size, self.train_batches_per_epoch,  # type: ignore[arg-type]
                              self._train_start_step, world, rank)  # fmt: skip
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, generator=loader_generator(self.seed))  # fmt: skip

    def _eval_loader(self, split: str) -> DataLoader:
        inputs, targets = self.eval_set(split)
        ds = _Pairs(inputs, targets)
        return DataLoader(ds, batch_size=self.eval_batch_size,
                          sampler=eval_sampler(ds, getattr(self, "trainer", None)),
                          num_workers=self.num_workers, generator=loader_generator(self.seed))  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def example_for_maps(self, text: str) -> tuple[list[int], list[str]]:
        """``attnlab analyze``'s attention-map input: the first test sequence (``text`` is not
        used: MQAR has no text); labels mark keys ``k``, values ``v`` and queries ``q?``."""
        inputs, targets = self.eval_set("test")
        ids, tgt = inputs[0].tolist(), targets[0].tolist()
        ctx = 2 * self.num_kv_pairs
        labels = [
            f"{'k' if i < ctx and i % 2 == 0 else 'v' if i < ctx else ''}{t}"
            for i, t in enumerate(ids)
        ]
        labels = [f"q{ids[i]}" if tgt[i] != IGNORE else lab for i, lab in enumerate(labels)]
        return ids, labels


class _Pairs(TensorDataset):
    """``{"input_ids", "targets"}`` items of two aligned tensors."""

    def __getitem__(self, i: int) -> dict[str, Tensor]:  # type: ignore[override]
        inputs, targets = super().__getitem__(i)
        return {"input_ids": inputs, "targets": targets}


class MQARTask(TaskModule):
    """A causal LM head; cross-entropy and accuracy on query positions only (Arora et al. 2023).

    Batches: ``input_ids (b, n)``, ``targets (b, n)`` with :data:`IGNORE` off the queries.
    Logs ``<split>/loss`` (nats per query) and ``<split>/acc`` (fraction of queries whose
    value is the argmax).

    Args:
        backbone: a causal :class:`~attnlab.models.Backbone`.
        vocab_size: V of the head ``(b, n, D) -> (b, n, V)``.
        optim, run_config: see :class:`~attnlab.tasks.base.TaskModule`.
        tie_embeddings: share the head's weight with the token embedding.
    """

    causal: ClassVar[bool] = True
    metric: ClassVar[str] = "acc"
    metric_unit: ClassVar[str] = "recall accuracy"

    def __init__(
        self,
        backbone: Backbone,
        vocab_size: int,
        optim: OptimizerFactory | dict[str, Any],
        run_config: dict | None = None,
        tie_embeddings: bool = True,
    ):
        super().__init__(LanguageModel(backbone, vocab_size, tie_embeddings), optim, run_config)
        self.vocab_size = vocab_size
        self.acc = nn.ModuleDict(
            {f"{s}_acc": MulticlassAccuracy(vocab_size, average="micro") for s in SPLITS}
        )
        self.acc["train_acc"].persistent(True)

    def _queries(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(logits (q, V), targets (q,))`` at the query positions of ``batch`` (the head runs
        on those positions only: ``q`` is a small fraction of ``b x n``)."""
        hidden = self.model.backbone(batch["input_ids"])
        scored = batch["targets"] != IGNORE
        return self.model.head(hidden[scored]).float(), batch["targets"][scored]

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        logits, targets = self._queries(batch)
        return F.cross_entropy(logits, targets)

    def synthetic_batch(
        self, batch_size: int, seq_len: int, vocab_size: int, generator: torch.Generator
    ) -> dict[str, Tensor]:
        kv = max(1, min(seq_len // 4, vocab_size // 2 - 1, 8))
        inputs, targets = mqar_batch(batch_size, vocab_size, seq_len, kv, 0.01, generator)
        return {"input_ids": inputs, "targets": targets}

    @torch.no_grad()
    def score(self, batch: dict[str, Tensor]) -> tuple[float, float]:
        logits, targets = self._queries(batch)
        return float((logits.argmax(-1) == targets).sum()), float(targets.numel())

    def step(self, batch: dict[str, Tensor], split: str) -> Tensor:
        logits, targets = self._queries(batch)
        loss = F.cross_entropy(logits, targets)
        self._log_loss(split, loss, targets.numel())
        acc = self.acc[f"{split}_acc"]
        acc(logits.argmax(-1), targets)
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=split != "train",
                 batch_size=targets.numel())  # fmt: skip
        return loss

    def on_train_epoch_start(self) -> None:
        self.acc["train_acc"].reset()
