"""Reliability plumbing: clear user errors, atomic checkpoints, non-finite guards, resumption.

- :class:`AtomicCheckpointIO`: checkpoints are written to a temporary file in the same
  directory and moved into place with ``os.replace``, so a crash mid-save never leaves a
  truncated ``last.ckpt``.
- :class:`NonFiniteGuard`: a non-finite loss or gradient stops training (``nonfinite: stop``)
  before the optimizer step, or skips that step (``nonfinite: skip``).
- :class:`RNGStateCallback` (+ :mod:`attnlab.interrupts` for SIGTERM and SLURM pre-emption): a
  stopped (SIGTERM) or killed (SIGKILL) run resumed with ``resume=true`` (or, the default,
  ``resume=auto`` in the same run dir) continues with the same global step, optimizer,
  scheduler and random state; enwik8 training batches are a pure function of (seed, global
  step) (:class:`attnlab.data.windows.StepSampler`), so they continue exactly too; IMDb's
  length-bucketed sampler skips the batches of the interrupted epoch already trained (see
  :class:`attnlab.data.imdb.IMDbDataModule`).
- :func:`run_command`: ``attnlab <command>`` prints known errors as one line; under ``-m`` a
  failed job writes ``summary.json`` with ``status: failed`` and the sweep goes on.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from omegaconf import DictConfig

log = logging.getLogger("attnlab")

NONFINITE_MODES = ("stop", "skip")
NONFINITE_FIXES = (
    "lower optim.lr, use trainer.precision=bf16-mixed instead of 16-mixed, set "
    "trainer.gradient_clip_val (e.g. 1.0), or pass nonfinite=skip to skip such steps"
)


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient (``nonfinite: stop``)."""


#: Errors whose message is the whole story: ``attnlab <command>`` prints them as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NonFiniteError)


def check_config(cfg: DictConfig) -> None:
    """Validate what can be checked before anything is built or read: ``optim.*``, ``nonfinite``,
    ``nonfinite_max_skipped``, ``checkpoint_every_n_steps``.

    Raises:
        ValueError: naming the key, the bad value and the valid choices.
    """
    from omegaconf import OmegaConf

    from attnlab.optim import check_optim

    check_optim(OmegaConf.to_container(cfg.get("optim", {}), resolve=True))
    frac = cfg.get("nonfinite_max_skipped", 0.05)
    if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 <= frac <= 1:
        raise ValueError(f"nonfinite_max_skipped={frac!r} must be a fraction in [0, 1].")
    mode = cfg.get("nonfinite", "stop")
    if mode not in NONFINITE_MODES:
        raise ValueError(f"nonfinite={mode!r} is not one of {list(NONFINITE_MODES)}.")
    every = cfg.get("checkpoint_every_n_steps")
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ValueError(
            f"checkpoint_every_n_steps={every!r} must be a positive integer, or null to save "
            "only at validation."
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a partial file: write ``.<name>.tmp-*`` beside the
    target, flush and fsync, then ``os.replace`` (atomic on POSIX). On failure the temporary
    file is removed and the previous checkpoint is untouched."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


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


def restore_metrics(run_dir: Path, saved: Path) -> None:
    """Merge a pre-resume ``metrics.csv`` (moved to ``saved``) into the new one: the old rows
    before the first step the resumed run logged, then the new rows (Lightning's CSVLogger
    deletes an existing metrics.csv)."""
    import csv

    if not saved.exists():
        return
    new_path = run_dir / "metrics.csv"
    old = list(csv.DictReader(saved.open()))
    new = list(csv.DictReader(new_path.open())) if new_path.exists() else []
    first = min((int(r["step"]) for r in new if r.get("step")), default=None)
    kept = [r for r in old if first is None or (r.get("step") and int(r["step"]) < first)]
    keys = sorted({k for r in kept + new for k in r})
    with new_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(kept + new)
    saved.unlink()


def failed_summary(cfg: DictConfig, err: BaseException) -> dict[str, Any]:
    """The ``summary.json`` of a failed run: status, error, traceback and the run's identity."""
    from attnlab.train import _choice

    return {
        "status": "failed",
        "error": f"{type(err).__name__}: {err}",
        "error_type": type(err).__name__,
        "traceback": "".join(traceback.format_exception(err)),
        "task": cfg.task.name,
        "attention": _choice("attention", cfg),
        "model": _choice("model", cfg),
        "n_heads": cfg.model.n_heads,
        "seed": cfg.seed,
        "run_dir": str(cfg.paths.run_dir),
    }


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_command(command: str, fn: Callable[[DictConfig], object], cfg: DictConfig) -> object:
    """Run ``fn(cfg)`` for ``attnlab <command>``.

    - ``train`` under ``-m`` (multirun): any exception writes ``summary.json`` with
      ``status: failed`` into the run dir, is logged, and the sweep continues.
    - Otherwise a :data:`USER_ERRORS` exception exits with ``attnlab <command>: <message>``
      (set ``HYDRA_FULL_ERROR=1`` for the traceback); other exceptions propagate.
    """
    try:
        return fn(cfg)
    except Exception as err:
        if command == "train" and _is_multirun():
            summary = failed_summary(cfg, err)
            run_dir = Path(cfg.paths.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log.error("job failed (%s); continuing the sweep. %s", run_dir, summary["error"])
            return summary
        if isinstance(err, USER_ERRORS) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            log.debug("attnlab %s failed", command, exc_info=True)
            sys.exit(f"attnlab {command}: {err}")
        raise


def state_dict_mismatch(model: dict[str, torch.Tensor], ckpt: dict[str, torch.Tensor]) -> str:
    """Describe how checkpoint weights ``ckpt`` differ from the ``model`` built from the config:
    parameters missing, unexpected, or with other shapes (first few of each)."""
    shapes = [
        f"{k} {tuple(ckpt[k].shape)} in the checkpoint vs {tuple(v.shape)} in the model"
        for k, v in model.items()
        if k in ckpt and tuple(ckpt[k].shape) != tuple(v.shape)
    ]
    parts = [
        ("different shapes", shapes),
        ("missing from the checkpoint", [k for k in model if k not in ckpt]),
        ("unexpected in the checkpoint", [k for k in ckpt if k not in model]),
    ]
    found = "; ".join(f"{what}: {', '.join(v[:5])}" for what, v in parts if v)
    return (
        f"the checkpoint does not match the model built from its config ({found}). Use the "
        "config the checkpoint was trained with (do not override model.*, attention.* or "
        "task.max_len), or retrain."
    )
