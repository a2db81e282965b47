"""Byte-window datasets for language modelling: random training windows and sliding evaluation
windows that score every byte of a range exactly once."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


def sliding_windows(start: int, end: int, context: int, stride: int) -> np.ndarray:
    """Scored target ranges ``[a, b)`` (shape ``(windows, 2)``) covering ``[max(start, 1), end)``
    exactly once, ``stride`` targets per window (``min(stride, context)``).

    The first window is no different from the others: its context reaches back before ``start``
    (:class:`SlidingWindowDataset`), so with ``stride = 1`` every byte is predicted from the
    ``context`` bytes before it (fewer only at the start of the file)."""
    p0 = max(start, 1)
    if p0 >= end:
        return np.zeros((0, 2), dtype=np.int64)
    stride = min(stride, context)
    ends = [min(p0 + stride, end)]
    while ends[-1] < end:
        ends.append(min(ends[-1] + stride, end))
    b = np.asarray(ends, dtype=np.int64)
    return np.stack([np.concatenate([[p0], b[:-1]]), b], axis=1)


class SlidingWindowDataset(Dataset):
    """Deterministic evaluation windows scoring every byte of ``[start, end)`` exactly once.

    A window whose scored targets are ``[a, b)`` has targets at file positions
    ``[max(1, b - context), b)`` and inputs one byte earlier, so context reaches back into
    preceding (unscored) bytes of the file. Items: ``{"input_ids": (context,), "targets":
    (context,), "loss_mask": (context,)}`` (long, long, bool; right-padded with 0 / False).
    """

    def __init__(self, data: torch.Tensor, start: int, end: int, context: int, stride: int) -> None:
        self.data, self.context = data, context
        self.windows = sliding_windows(start, end, context, stride)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a, b = (int(x) for x in self.windows[i])
        t0 = max(1, b - self.context)
        n = b - t0
        inputs = torch.zeros(self.context, dtype=torch.long)
        targets = torch.zeros(self.context, dtype=torch.long)
        mask = torch.zeros(self.context, dtype=torch.bool)
        inputs[:n] = self.data[t0 - 1 : b - 1]
        targets[:n] = self.data[t0:b]
        mask[a - t0 : n] = True
        return {"input_ids": inputs, "targets": targets, "loss_mask": mask}


class StepWindowDataset(Dataset):
    """Random ``context + 1``-byte training windows of ``[start, end)``, a pure function of
    ``(seed, global step)``.

    Item ``i`` is window ``i % global_batch`` of global batch ``g = i // global_batch``, where
    ``global_batch`` = batch size x DDP world size. The start offsets of batch ``g`` are drawn
    uniformly from ``[start, end - context)`` by ``np.random.default_rng(SeedSequence([seed,
    g]))``, so any step's batch can be rebuilt without replaying the ones before it (exact
    resumption, see :class:`StepSampler`). Items: ``{"input_ids": (context,), "targets":
    (context,)}`` (long), targets = inputs shifted by one.

    ``len()`` is one nominal epoch of items (``num_samples``); indices past it are valid.

    Raises:
        ValueError: the range holds fewer than ``context + 1`` bytes.
    """

    def __init__(
        self,
        data: torch.Tensor,
        start: int,
        end: int,
        context: int,
        global_batch: int,
        num_samples: int,
        seed: int = 0,
    ) -> None:
        if end - start < context + 1:
            raise ValueError(
                f"the training split has {end - start} bytes, fewer than "
                f"context + 1 = {context + 1}: use a smaller context or more data"
            )
        self.data, self.start, self.end, self.context = data, start, end, context
        self.global_batch, self.num_samples, self.seed = global_batch, num_samples, seed
        self._cached: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))

    def batch_starts(self, g: int) -> np.ndarray:
        """Start offsets (``(global_batch,)`` int64) of the windows of global batch ``g``."""
        if self._cached[0] != g:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, g]))
            starts = rng.integers(self.start, self.end - self.context, self.global_batch)
            self._cached = (g, starts)
        return self._cached[1]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g, k = divmod(int(i), self.global_batch)
        s = int(self.batch_starts(g)[k])
        chunk = self.data[s : s + self.context + 1].long()
        return {"input_ids": chunk[:-1], "targets": chunk[1:]}


class StepSampler(DistributedSampler):
    """Yields the :class:`StepWindowDataset` indices of this rank's share of global batches
    ``g0, g0 + 1, ...`` (``batches_per_epoch`` batches of ``batch_size`` indices), where ``g0 =
    start_step()`` is read when iteration starts: batch ``g`` is trained at global step ``g``.

    A resumed run therefore continues with exactly the batches of an uninterrupted one, with no
    skip bookkeeping; Lightning ends each epoch after its own batch count (the rest of this
    iterator is never drawn). Rank ``r`` of ``W`` takes windows ``[r * batch_size, (r + 1) *
    batch_size)`` of each global batch. Being a ``DistributedSampler``, Lightning keeps it under
    DDP; ``set_epoch`` is accepted and does not change the batches.
    """

    def __init__(
        self,
        dataset: StepWindowDataset,
        batch_size: int,
        batches_per_epoch: int,
        start_step: Callable[[], int],
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        if dataset.global_batch != batch_size * num_replicas:
            raise ValueError(
                f"dataset.global_batch={dataset.global_batch} must equal batch_size x "
                f"num_replicas = {batch_size} x {num_replicas}"
            )
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.start_step = start_step

    def __iter__(self) -> Iterator[int]:
        g0, gb = int(self.start_step()), self.dataset.global_batch
        first = self.rank * self.batch_size
        for g in range(g0, g0 + self.batches_per_epoch):
            yield from range(g * gb + first, g * gb + first + self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size


class StepResumable:
    """Mixin for a data module whose training batch ``g`` is a pure function of ``(seed, g)``
    (read through :class:`StepSampler`): it checkpoints the global step and starts the next
    training iterator there, so a resumed run trains exactly the batches of an uninterrupted
    one. Put it before ``LightningDataModule`` in the bases; pass :meth:`_train_start_step` to
    the sampler."""

    _resume_step: int = 0

    def _train_start_step(self) -> int:
        """The global step of the next training batch. Lightning creates the first training
        iterator before it restores the trainer's step from a checkpoint (and worker processes
        draw indices at once), so the step saved by :meth:`state_dict` counts too."""
        trainer = getattr(self, "trainer", None)
        return max(trainer.global_step if trainer is not None else 0, self._resume_step)

    def state_dict(self) -> dict[str, int]:
        """``{"global_step": ...}``: restored before Lightning builds the training iterator."""
        trainer = getattr(self, "trainer", None)
        return {"global_step": int(trainer.global_step)} if trainer is not None else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume_step = int(state_dict.get("global_step", 0))

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._resume_step = 0  # a later fit without a checkpoint starts at its own step
