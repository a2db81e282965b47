"""Lightning callbacks: throughput, tokens seen and peak memory; the non-finite guard; random
states in checkpoints (stop signals and ``last.ckpt``: :mod:`attnlab.interrupts`).

- :class:`NonFiniteGuard`: a non-finite loss or gradient stops training (``nonfinite: stop``)
  before the optimizer step, or skips that step (``nonfinite: skip``).
- :class:`RNGStateCallback`: a stopped (SIGTERM) or killed run resumed from its checkpoint
  continues with the same random state (enwik8 batches are a pure function of (seed, global
  step), :class:`attnlab.data.windows.StepSampler`; IMDb's sampler skips the batches of the
  interrupted epoch already trained, :class:`attnlab.data.imdb.IMDbDataModule`).
"""

from __future__ import annotations

import logging
import random
import resource
import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from attnlab.errors import NONFINITE_FIXES, NONFINITE_MODES, NonFiniteError

log = logging.getLogger("attnlab")


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


class NonFiniteGuard(pl.Callback):
    """Check the loss and gradients before every optimizer step.

    Args:
        mode: ``"stop"`` raises :class:`NonFiniteError` naming the step (the weights are still
            the last finite ones and no checkpoint of the bad step is written); ``"skip"``
            drops the gradients so the optimizer leaves the weights unchanged, and counts the
            skipped steps (``skipped``, logged as ``train/skipped_steps``).

    Under fp16 loss scaling (``16-mixed``) an infinite gradient is the scaler's business (it
    skips the step and lowers the scale), so only the loss is checked there.
    """

    def __init__(self, mode: str = "stop") -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite={mode!r} is not one of {list(NONFINITE_MODES)}.")
        self.mode, self.skipped = mode, 0
        self._loss: torch.Tensor | None = None

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        what = None
        if self._loss is not None and not torch.isfinite(self._loss).all():
            what = f"loss {self._loss.float().mean().item()}"
        elif not scaled:
            bad = [
                n
                for n, p in pl_module.named_parameters()
                if p.grad is not None and not torch.isfinite(p.grad).all()
            ]
            if bad:
                what = f"gradient of {len(bad)} parameter(s), first {bad[0]}"
        if what is None:
            return
        step = trainer.global_step
        if self.mode == "stop":
            raise NonFiniteError(
                f"non-finite {what} at step {step} (epoch {trainer.current_epoch}); training "
                f"stopped before the weights were updated, the last good checkpoint is kept. "
                f"Fix: {NONFINITE_FIXES}."
            )
        if scaled:
            return  # GradScaler skips the step itself
        self.skipped += 1
        log.warning("non-finite %s at step %d: step skipped (%d so far)", what, step, self.skipped)
        optimizer.zero_grad(set_to_none=True)  # AdamW/SGD leave parameters without grads alone
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


class RNGStateCallback(pl.Callback):
    """Checkpoint the Python, NumPy and torch (CPU, CUDA) random states; restore them just
    before the first training batch after resuming, so dropout masks continue as if the run
    had never stopped."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {
            "python": random.getstate(),
            "numpy": _plain(np.random.get_state()),  # plain types: weights_only loading works
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, *args: Any) -> None:
        if self._pending is None:
            return
        s, self._pending = self._pending, None
        random.setstate(s["python"])
        kind, keys, *rest = s["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(s["torch"])
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])


def _plain(state: tuple) -> tuple:
    return tuple(x.tolist() if isinstance(x, np.ndarray) else x for x in state)
