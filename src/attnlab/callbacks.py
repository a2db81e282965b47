"""Lightning callbacks: throughput, tokens seen and peak memory."""

from __future__ import annotations

import resource
import time
from typing import Any

import lightning.pytorch as pl
import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA allocator peak on GPU, process max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens in a batch: real tokens when there is a ``padding_mask``, else all inputs."""
    if "padding_mask" in batch:
        return int(batch["padding_mask"].sum())
    return int(batch["input_ids"].numel())


class ThroughputMonitor(pl.Callback):
    """Logs ``train/tokens_per_sec`` (tokens/s, averaged over ``log_every`` steps),
    ``train/tokens_seen`` (cumulative, per process times world size) and
    ``train/peak_mem_mb``; records the totals in ``self.summary``.

    The totals are checkpointed, so after a resume :attr:`summary` covers the whole run:
    ``tokens_seen``, training time and tokens (for tokens/s), the wall time of the fit up to the
    checkpoint (``fit_time_s``) and the number of attempts (starts, counting resumes).
    """

    def __init__(self, log_every: int = 20) -> None:
        self.log_every = log_every
        self.tokens_seen = 0
        self._window_tokens = 0
        self._window_start: float | None = None
        self._train_time = 0.0
        self._train_tokens = 0
        self._fit_time_before = 0.0  # fit wall time of earlier attempts, up to the checkpoint
        self._fit_start: float | None = None
        self.attempts = 1
        #: fit wall seconds of the attempts before this one (up to the checkpoint resumed from)
        self.earlier_attempts_s = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # freeze: the fit's wall time must not keep growing through test and summary
        self._fit_time_before = self.fit_time_s
        self._fit_start = None

    @property
    def fit_time_s(self) -> float:
        """Wall seconds of fitting over all attempts (each counted up to its checkpoint; the
        current one up to the end of the fit, once it has ended)."""
        now = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self._fit_time_before + now

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._window_start is None:
            self._window_start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        n = batch_tokens(batch) * trainer.world_size
        self.tokens_seen += n
        self._window_tokens += n
        if (batch_idx + 1) % self.log_every == 0 and self._window_start is not None:
            elapsed = time.perf_counter() - self._window_start
            self._train_time += elapsed
            self._train_tokens += self._window_tokens
            pl_module.log_dict(
                {
                    "train/tokens_per_sec": self._window_tokens / max(elapsed, 1e-9),
                    "train/tokens_seen": float(self.tokens_seen),
                    "train/peak_mem_mb": peak_memory_mb(pl_module.device),
                },
                on_step=True,
                on_epoch=False,
            )
            self._window_tokens, self._window_start = 0, None

    def _close_window(self) -> None:
        if self._window_start is not None:
            self._train_time += time.perf_counter() - self._window_start
            self._train_tokens += self._window_tokens
        self._window_tokens, self._window_start = 0, None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_window()  # evaluation time is not training time

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_window()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            pl_module.log("val/tokens_seen", float(self.tokens_seen), on_epoch=True)

    @property
    def summary(self) -> dict[str, float]:
        """Training throughput (tokens/s, excluding evaluation), tokens seen, training seconds,
        fit wall seconds and attempts, all over the whole run (resumes included)."""
        self._close_window()
        rate = self._train_tokens / self._train_time if self._train_time else float("nan")
        return {
            "tokens_per_sec": rate,
            "tokens_seen": float(self.tokens_seen),
            "train_time_s": self._train_time,
            "fit_time_s": self.fit_time_s,
            "attempts": self.attempts,
        }

    def state_dict(self) -> dict[str, Any]:
        self._close_window()
        return {
            "tokens_seen": self.tokens_seen,
            "train_time": self._train_time,
            "train_tokens": self._train_tokens,
            "fit_time": self.fit_time_s,
            "attempts": self.attempts,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
        self._train_time = float(state_dict.get("train_time", 0.0))
        self._train_tokens = int(state_dict.get("train_tokens", 0))
        self._fit_time_before = float(state_dict.get("fit_time", 0.0))
        self.earlier_attempts_s = self._fit_time_before
        self._fit_start = time.perf_counter()  # restored at the start of this attempt's fit
        self.attempts = int(state_dict.get("attempts", 1)) + 1
