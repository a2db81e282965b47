"""Byte-window datasets for language modelling: random training windows and sliding evaluation
windows that score every byte of a range exactly once."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


def sliding_windows(start: int, end: int, context: int, stride: int) -> np.ndarray:
    """Scored target ranges ``[a, b)`` (shape ``(windows, 2)``) covering ``[max(start, 1), end)``
    exactly once: the first window scores up to ``context`` targets, each later one ``stride``."""
    p0 = max(start, 1)
    if p0 >= end:
        return np.zeros((0, 2), dtype=np.int64)
    ends = [min(p0 + context, end)]
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


class RandomWindowDataset(Dataset):
    """``num_samples`` random ``context + 1``-byte windows of ``[start, end)``, redrawn per epoch.

    Start offsets come from a ``torch.Generator`` seeded with ``(seed, epoch)`` (see
    :meth:`set_epoch`), so an epoch's windows are reproducible, e.g. after resuming. Items:
    ``{"input_ids": (context,), "targets": (context,)}`` (long), targets = inputs shifted by one.
    """

    def __init__(
        self,
        data: torch.Tensor,
        start: int,
        end: int,
        context: int,
        num_samples: int,
        seed: int = 0,
    ) -> None:
        if end - start < context + 1:
            raise ValueError(
                f"the training split has {end - start} bytes, fewer than "
                f"context + 1 = {context + 1}: use a smaller context or more data"
            )
        self.data, self.start, self.end, self.context = data, start, end, context
        self.num_samples, self.seed = num_samples, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        mixed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, np.uint64)[0]
        g = torch.Generator().manual_seed(int(mixed) & (2**63 - 1))
        self.starts = torch.randint(
            self.start, self.end - self.context, (self.num_samples,), generator=g
        )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = int(self.starts[i])
        chunk = self.data[s : s + self.context + 1].long()
        return {"input_ids": chunk[:-1], "targets": chunk[1:]}


class EpochDistributedSampler(DistributedSampler):
    """A non-shuffling ``DistributedSampler`` that passes ``set_epoch`` on to the dataset.

    Being a ``DistributedSampler``, Lightning keeps it (it does not inject its own under DDP).
    """

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)
