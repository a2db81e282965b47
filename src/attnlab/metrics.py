"""Metrics. Bits per byte is a torchmetrics ``Metric`` so it is exact under DDP."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

LN2 = math.log(2.0)


def nats_to_bits(nats):  # noqa: ANN001, ANN201 - float or Tensor in, the same out
    """Nats to bits: ``nats / ln 2`` (the one conversion every bits-per-byte figure uses)."""
    return nats / LN2


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Bits per byte: ``total_nats / n_bytes / ln 2``, the summed cross-entropy (nats) over
    all scored bytes, per byte, in bits -- the enwik8 / Hutter Prize metric
    (Al-Rfou et al. 2019; Dai et al. 2019).

    Raises:
        ValueError: ``n_bytes`` <= 0.
    """
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, got {n_bytes}")
    return nats_to_bits(total_nats / n_bytes)


class BitsPerByte(Metric):
    """Sums cross-entropy nats and counts scored bytes; ``compute()`` = sum / count / ln 2.

    ``update(nats: (N,) per-byte losses in nats)`` or ``update(total_nats, count)``.
    States are summed across processes, so every byte counts once under DDP
    (provided the sampler does not duplicate samples; see :mod:`attnlab.data.enwik8`).
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nats", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nats: Tensor, count: Tensor | int | None = None) -> None:
        if count is None:
            self.nats += nats.detach().double().sum()
            self.count += nats.numel()
        else:
            self.nats += nats.detach().double().sum()
            self.count += int(count)

    def compute(self) -> Tensor:
        return nats_to_bits(self.nats / self.count.clamp_min(1))
