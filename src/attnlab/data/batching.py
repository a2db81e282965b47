"""Batching helpers for variable-length token sequences: length-bucketed sampling and padding."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, Sampler


class EpochSequentialSampler(Sampler[int]):
    """Yields ``0 .. n-1`` in order and remembers the epoch set by ``set_epoch``.

    Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler`` before every epoch;
    :class:`LengthBucketBatchSampler` reads the epoch from here.
    """

    def __init__(self, n: int) -> None:
        self.n = int(n)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


class LengthBucketBatchSampler(BatchSampler):
    """Shuffled batches of similar-length examples, different but reproducible every epoch.

    Each epoch, with a NumPy generator seeded by ``(seed, epoch)``: shuffle the indices yielded by
    ``sampler``, cut them into groups of ``bucket_size * batch_size``, sort each group by length,
    cut each group into batches, and shuffle the order of all batches. Padding is then small while
    batches remain random.

    The epoch is that of ``sampler`` (``sampler.epoch``, set by Lightning through
    ``sampler.set_epoch``) when it has one, else the value given to :meth:`set_epoch`. Under DDP
    Lightning re-creates this sampler around a ``DistributedSampler``; each rank then buckets its
    own shard.

    Args:
        sampler: yields the dataset indices to batch (e.g. :class:`EpochSequentialSampler`).
        batch_size: examples per batch.
        drop_last: drop the incomplete last batch of the epoch.
        lengths: length (tokens) of every example of the dataset, indexed like the dataset.
        bucket_size: batches per length-sorted group.
        seed: base seed.
        batches_done: called when iteration starts (after Lightning restored a checkpoint);
            returns how many batches of this epoch were already trained, which are skipped so
            that a run resumed mid-epoch continues with the batches an uninterrupted run sees.
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        *,
        lengths: Sequence[int] | np.ndarray,
        bucket_size: int = 50,
        seed: int = 0,
        batches_done: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.batches_done = batches_done
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        self.lengths = np.asarray(lengths)
        self.bucket_size = int(bucket_size)
        self.seed = int(seed)
        self._epoch = 0

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", self._epoch))

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (also on the wrapped sampler, if it has ``set_epoch``)."""
        self._epoch = int(epoch)
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        indices = rng.permutation(np.fromiter(iter(self.sampler), dtype=np.int64))
        group = self.batch_size * self.bucket_size
        batches: list[list[int]] = []
        for start in range(0, len(indices), group):
            chunk = indices[start : start + group]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            for b in range(0, len(chunk), self.batch_size):
                batch = chunk[b : b + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch.tolist())
        order = rng.permutation(len(batches))
        skip = min(max(0, int(self.batches_done())), len(order)) if self.batches_done else 0
        for i in order[skip:]:
            yield batches[i]

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class TokenizedDataset(Dataset):
    """Token-id sequences with labels; item ``i`` is ``(ids[order[i]], labels[order[i]])``.

    Args:
        ids: one 1-D integer array per example.
        labels: one label per example, or ``None`` for unlabelled data.
        order: optional permutation (e.g. sorted by length for evaluation).
    """

    def __init__(
        self,
        ids: Sequence[np.ndarray],
        labels: Sequence[int] | np.ndarray | None,
        order: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        self.ids = ids
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.order = None if order is None else np.asarray(order, dtype=np.int64)

    @property
    def lengths(self) -> np.ndarray:
        """Length of each item, in item order."""
        lens = np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))
        return lens if self.order is None else lens[self.order]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int | None]:
        j = int(i) if self.order is None else int(self.order[i])
        return self.ids[j], None if self.labels is None else int(self.labels[j])


def collate_classification(
    items: Sequence[tuple[Any, int | None]], pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Right-pad ``(ids, label)`` pairs to the longest sequence of the batch.

    Returns:
        ``{"input_ids": LongTensor (batch, seq), "padding_mask": BoolTensor (batch, seq)`` (True =
        real token), ``"labels": LongTensor (batch,)}``; ``"labels"`` is left out when any label
        is ``None``.
    """
    lengths = torch.tensor([len(ids) for ids, _ in items], dtype=torch.long)
    width = int(lengths.max()) if len(items) else 0
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(items):
        input_ids[row, : len(ids)] = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "padding_mask": torch.arange(width)[None, :] < lengths[:, None],
    }
    if all(label is not None for _, label in items):
        batch["labels"] = torch.tensor([label for _, label in items], dtype=torch.long)
    return batch


def loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator. Without one, every new loader iterator (each epoch, each
    validation) draws its base seed from the global torch RNG, which shifts the dropout masks
    after it: a run resumed from a checkpoint taken just before an epoch starts would then
    diverge from the uninterrupted run."""
    return torch.Generator().manual_seed(int(seed))


def eval_sampler(dataset: Sized, trainer: Any) -> Sampler[int] | None:
    """Sampler for a val/test loader: ``None`` (sequential) in one process; under DDP each rank
    takes every ``world_size``-th item with no padding, so every example/window is scored once.

    Lightning's default ``DistributedSampler`` pads the split by repeating items when its length
    is not divisible by the world size, which would count them twice in accuracy and bits per
    byte. Being a ``DistributedSampler`` subclass, this one is kept by Lightning as is.
    """
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if world <= 1:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(
        dataset, num_replicas=world, rank=int(trainer.global_rank), shuffle=False
    )
