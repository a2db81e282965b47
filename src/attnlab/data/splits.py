"""Seeded, stratified splits and subsets of labelled examples."""

from __future__ import annotations

import numpy as np


def _allocate(counts: np.ndarray, n: int) -> np.ndarray:
    """Split ``n`` over classes in proportion to ``counts`` (largest-remainder rounding)."""
    quota = n * counts / counts.sum()
    take = np.floor(quota).astype(np.int64)
    for c in np.argsort(-(quota - take), kind="stable")[: n - take.sum()]:
        take[c] += 1
    return np.minimum(take, counts)


def stratified_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``arange(len(labels))`` into (kept, held-out ``fraction``), stratified by label.

    Each class contributes ``round(fraction * class_size)`` held-out examples. Both arrays sorted.
    """
    kept, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


def stratified_subset(
    indices: np.ndarray, labels: np.ndarray, n: int | None, rng: np.random.Generator
) -> np.ndarray:
    """A sorted random subset of ``n`` of ``indices`` keeping the class proportions of
    ``labels[indices]`` (all of them if ``n`` is ``None`` or not smaller)."""
    if n is None or n >= len(indices):
        return np.sort(indices)
    classes, counts = np.unique(labels[indices], return_counts=True)
    take = _allocate(counts, int(n))
    parts = [
        rng.choice(indices[labels[indices] == c], size=k, replace=False)
        for c, k in zip(classes, take)
    ]
    return np.sort(np.concatenate(parts))
