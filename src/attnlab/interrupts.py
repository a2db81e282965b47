"""Stopping early without losing work: SIGTERM, SLURM pre-emption and time limits.

One mechanism for every way a run is told to stop (Lightning's own SLURM auto-requeue is turned
off, so there is no second one):

- **Signals.** SIGTERM always; under SLURM also SIGUSR1 and SIGUSR2 (submitit asks SLURM for
  ``--signal=USR2@<signal_delay_s>`` before the time limit; sbatch scripts often use USR1).
  The handler only records the signal (and forwards it to local DDP workers).
- **Safe points.** :class:`Preemption` acts at the next point where a checkpoint resumes exactly:
  at the end of the current training batch it saves ``last.ckpt`` and stops; a signal during
  validation lets validation finish (the checkpoint callbacks save at its end), then it saves
  and stops; during the final test it stops after the current batch (``resume`` re-runs the
  test from the final checkpoint); before training starts (data loading) it stops at once.
- **Then.** :func:`finish_interrupted`: under SLURM the job is requeued (``scontrol requeue``),
  and the requeued job resumes from ``last.ckpt`` in the same run directory (``resume: auto``).
  The process exits with status 128 + the signal number, never 0, so ``make``, scripts and
  schedulers see that the run did not finish.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint

log = logging.getLogger("attnlab")


class Interrupted(SystemExit):
    """A run stopped by a signal. ``code`` = 128 + the signal number (never 0).

    A ``SystemExit``: it ends the process (and a basic-launcher sweep) rather than being recorded
    as a failed job and skipped, like the signal that caused it.
    """

    def __init__(self, signum: int, where: str, step: int | None = None) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.where, self.step = int(signum), where, step

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


# --------------------------------------------------------------------------- SLURM
def slurm_info() -> dict[str, Any] | None:
    """This process's SLURM job, or ``None`` outside SLURM: ``job_id`` (``<array job>_<task>``
    for array jobs, what ``scontrol`` takes), ``array_job_id``, ``array_task_id``,
    ``restart_count`` (times requeued), ``partition``, ``node``, ``cpus_per_task``, ``procid``."""
    env = os.environ
    if not env.get("SLURM_JOB_ID"):
        return None
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    return {
        "job_id": f"{array_job}_{task}" if array_job and task else env["SLURM_JOB_ID"],
        "raw_job_id": env["SLURM_JOB_ID"],
        "array_job_id": array_job,
        "array_task_id": task,
        "restart_count": int(env.get("SLURM_RESTART_COUNT", "0") or 0),
        "partition": env.get("SLURM_JOB_PARTITION"),
        "node": env.get("SLURMD_NODENAME"),
        "job_name": env.get("SLURM_JOB_NAME"),
        "cpus_per_task": env.get("SLURM_CPUS_PER_TASK"),
        "procid": env.get("SLURM_PROCID"),
    }


def requeue(job_id: str) -> tuple[bool, str]:
    """``scontrol requeue <job_id>``; returns (ok, what scontrol said)."""
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        return False, f"not a SLURM job id: {job_id!r}"
    try:
        proc = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"{type(err).__name__}: {err}"
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


# --------------------------------------------------------------------------- signals
class StopSignals:
    """Records the first stop signal of a run. Installed by ``train`` before data loading and
    re-installed by :class:`Preemption` over the handler Lightning sets in ``fit``/``test``.

    Args:
        slurm: also catch SIGUSR1 and SIGUSR2 (SLURM's early-warning signals).
    """

    def __init__(self, slurm: bool = False) -> None:
        self.signals = [signal.SIGTERM] + ([signal.SIGUSR1, signal.SIGUSR2] if slurm else [])
        self.received: int | None = None
        self.trainer: pl.Trainer | None = None
        self._previous: dict[int, Any] = {}

    def install(self, trainer: pl.Trainer | None = None) -> None:
        """Handle the stop signals in this process (main thread only; a no-op elsewhere)."""
        if trainer is not None:
            self.trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.signals:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.received is None
        if first:
            self.received = signum
        launcher = getattr(getattr(self.trainer, "strategy", None), "launcher", None)
        if first and launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signum)  # local DDP workers get the signal too, as with Lightning's
        if first:
            log.warning(
                "received %s: stopping at the next safe point (end of the current batch, or of "
                "the current validation), after saving a checkpoint",
                signal.Signals(signum).name,
            )


class Preemption(Checkpoint):
    """Act on a recorded stop signal at the next safe point (see the module docstring).

    A :class:`~lightning.pytorch.callbacks.Checkpoint` so that Lightning orders it after the
    ``ModelCheckpoint`` callbacks: at the end of a validation, ``best.ckpt``/``last.ckpt`` are
    written before it saves and stops. Under DDP the ranks agree (any rank's signal stops all)
    before anything is saved.

    Args:
        signals: the run's :class:`StopSignals`.
        last_path: where to save (``<run dir>/checkpoints/last.ckpt``).
    """

    def __init__(self, signals: StopSignals, last_path: str | Path) -> None:
        self.signals, self.last_path = signals, str(last_path)
        self.saved_at: int | None = None

    def _requested(self, trainer: pl.Trainer) -> bool:
        local = self.signals.received is not None
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(local, all=False))
        return local

    def _stop(self, trainer: pl.Trainer, where: str) -> None:
        trainer.save_checkpoint(self.last_path)
        self.saved_at = trainer.global_step
        signum = self.signals.received or signal.SIGTERM
        raise Interrupted(signum, where, trainer.global_step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signals.install(trainer)  # over Lightning's SIGTERM handler: one mechanism
        if self._requested(trainer):  # arrived while the data and model were set up
            raise Interrupted(self.signals.received or signal.SIGTERM, "before training", None)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signals.install(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._requested(trainer) and not self._validation_due(trainer):
            self._stop(trainer, "training")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.training is False and self._requested(trainer):
            self._stop(trainer, "validation")

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._requested(trainer):
            raise Interrupted(self.signals.received or signal.SIGTERM, "test", trainer.global_step)

    @staticmethod
    def _validation_due(trainer: pl.Trainer) -> bool:
        """Whether a validation runs right after this batch (then stop after it instead)."""
        loop = trainer.fit_loop.epoch_loop
        try:
            return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
        except Exception:  # private Lightning API: if it moves, stop at once (still exact)
            return False


def finish_interrupted(err: Interrupted, slurm: dict[str, Any] | None, ckpt: Path) -> str:
    """Requeue under SLURM (rank 0 only) and return the one-line message to log and exit with."""
    where = {
        "training": f"saved {ckpt} at step {err.step}",
        "validation": f"finished the validation and saved {ckpt} at step {err.step}",
        "test": "stopped during the final test (training had finished; the checkpoints stand)",
        "before training": "stopped before training started; nothing to save",
    }[err.where]
    msg = f"{err.signal_name}: {where}; the run is NOT finished"
    if slurm is not None and str(slurm.get("procid") or "0") == "0":
        ok, said = requeue(slurm["job_id"])
        if ok:
            msg += (
                f"; requeued SLURM job {slurm['job_id']}: it resumes from the last checkpoint "
                "in the same run dir"
            )
        else:
            msg += f"; could not requeue SLURM job {slurm['job_id']} ({said})"
    if slurm is None or "requeued" not in msg:
        msg += f"; continue it with the same overrides plus resume={ckpt.parent.parent}"
    return f"{msg}. Exit status {err.code}."
