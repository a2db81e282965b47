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

import errno
import json
import logging
import os
import random
import shutil
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


class DiskFullError(OSError):
    """A checkpoint could not be written: no space left on the device."""


#: Errors whose message is the whole story: ``attnlab <command>`` prints them as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NonFiniteError,
    DiskFullError,
)
#: Free space (bytes) under which a failed write is taken for a full disk.
LOW_SPACE = 256 * 2**20


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
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, OSError | RuntimeError) and _disk_full(err, path.parent):
                free = shutil.disk_usage(path.parent).free / 2**20
                raise DiskFullError(
                    errno.ENOSPC,
                    f"no space left on device writing checkpoint {path} ({free:.0f} MiB free in "
                    f"{path.parent}); free some space (or set hydra.run.dir on another disk) and "
                    "resume: the previous checkpoint is intact",
                ) from err
            raise


def _disk_full(err: BaseException, directory: Path) -> bool:
    """Whether a failed write is explained by a full disk (torch reports ENOSPC as a
    RuntimeError such as "inline_container.cc ... unexpected pos")."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(directory).free < LOW_SPACE
    except OSError:
        return False


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
    from attnlab.config import group_choice

    return {
        "status": "failed",
        "error": f"{type(err).__name__}: {err}",
        "error_type": type(err).__name__,
        "traceback": "".join(traceback.format_exception(err)),
        "task": cfg.task.name,
        "attention": group_choice("attention", cfg),
        "model": group_choice("model", cfg),
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
    except SystemExit as stop:  # a stop signal (attnlab.interrupts.Interrupted): the sweep ends
        if command == "train" and _is_multirun():
            log.error(sweep_stopped_message(stop))
        raise
    except Exception as err:
        if command == "train" and _is_multirun():
            summary = failed_summary(cfg, err)
            run_dir = Path(cfg.paths.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log.error("job failed (%s); continuing the sweep. %s", run_dir, summary["error"])
            return summary
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = user_message(err)
        if message is not None:
            log.debug("attnlab %s failed", command, exc_info=True)
            sys.exit(f"attnlab {command}: {message}")
        raise


def user_message(err: BaseException) -> str | None:
    """The one-line message for a known user error, ``None`` for anything else (a bug)."""
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", None) or str(err).split(":", 1)[-1].strip().split()[0]
        hint = " (e.g. ckpt=<run dir>/checkpoints/best.ckpt)" if key == "ckpt" else ""
        return f"{key} is required: pass {key}=...{hint}"
    if isinstance(err, USER_ERRORS):
        return " ".join(str(err).split())  # one line
    return None


def sweep_jobs() -> list[list[str]] | None:
    """Every job of the running sweep (its override lists, in launch order), as Hydra's
    BasicSweeper expands them from ``<sweep dir>/multirun.yaml``; ``None`` for other sweepers."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    if not str(hc.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    saved = OmegaConf.load(Path(hc.sweep.dir) / "multirun.yaml")
    params = saved.hydra.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(saved.hydra.overrides.task)
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
    return [job for batch in batches for job in batch]


def _varying(jobs: list[list[str]]) -> set[str]:
    """The override keys whose values differ between the sweep's jobs."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for o in job:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    return {k for k, v in values.items() if len(v) > 1}


def sweep_stopped_message(stop: SystemExit) -> str:
    """What a stop signal dropped from a sweep: the jobs after the interrupted one."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    num = int(hc.job.num)
    try:
        jobs = sweep_jobs()
    except Exception:  # the sweep's own record is unreadable: say what is known
        jobs = None
    head = (
        f"sweep stopped (exit status {stop.code}) during job #{num} ({hc.runtime.output_dir}), "
        "which saved its checkpoint"
    )
    if jobs is None:
        return f"{head}; the jobs after it were not run"
    varying = _varying(jobs)
    dropped = [
        f"#{i}: {','.join(o for o in job if o.split('=', 1)[0] in varying) or ','.join(job)}"
        for i, job in enumerate(jobs)
        if i > num
    ]
    if not dropped:
        return f"{head}; it was the sweep's last job"
    return (
        f"{head}; {len(dropped)} of {len(jobs)} jobs were not run: {'; '.join(dropped)}. To "
        f"finish the sweep, run the same command with hydra.sweep.dir={hc.sweep.dir}: the "
        "interrupted job continues from its checkpoint, finished ones only re-test"
    )


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
