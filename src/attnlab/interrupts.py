"""Stopping early without losing work: SIGTERM, SLURM pre-emption and time limits.

One mechanism for every way a run is told to stop (Lightning's own SLURM auto-requeue is turned
off, so there is no second one):

- **Signals.** SIGTERM always; under SLURM also SIGUSR1 and SIGUSR2 (submitit asks SLURM for
  ``--signal=USR2@<signal_delay_s>`` before the time limit; sbatch scripts often use USR1).
  The handler only records the signal (and forwards it to local DDP workers).
- **Safe points.** :class:`LastCheckpoint` acts at the next point where a checkpoint resumes exactly:
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


def job_state(job_id: str) -> str | None:
    """SLURM's state of ``job_id`` (``squeue -o %T``), e.g. ``RUNNING``; ``None`` if unknown.

    A job being pre-empted (in its grace time) or warned of its time limit is ``RUNNING``; after
    ``scancel`` or an ``scontrol requeue`` from outside it is ``COMPLETING``.
    """
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    state = proc.stdout.strip().splitlines()
    return state[0].strip() if proc.returncode == 0 and state else None


def max_time_requeues(default: int = 5) -> int:
    """How often a job may requeue itself after time-limit warnings (USR1/USR2): the submitit
    launcher's ``max_num_timeout`` when running under it, else ``default``."""
    try:
        from hydra.core.hydra_config import HydraConfig

        value = HydraConfig.get().launcher.get("max_num_timeout")
        return int(value) if value is not None else default
    except Exception:
        return default


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
        """Put back the handlers that were there before :meth:`install`. SLURM's early-warning
        signals (USR1/USR2) are ignored from then on: the run is over, and a late one must not
        kill the process on its way out (or requeue a finished job)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s, handler in self._previous.items():
            if s in (signal.SIGUSR1, signal.SIGUSR2):
                handler = signal.SIG_IGN
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


class LastCheckpoint(Checkpoint):
    """Keep ``last.ckpt`` at points a run resumes from exactly, and act on stop signals there.

    - every ``every_n_steps`` optimizer steps (``checkpoint_every_n_steps``), at the end of the
      batch -- unless a validation runs right after that batch: then the save happens at the
      end of the validation (the ``best`` ``ModelCheckpoint`` writes ``last.ckpt`` there too).
      Lightning restores a checkpoint taken at the end of an epoch's last batch, before its
      validation, into a corrupt epoch count (a later resume replays an epoch), so none is
      taken there;
    - a recorded stop signal (:class:`StopSignals`) is acted on at the same points: save, then
      raise :class:`Interrupted`; during the final test, stop after the current batch.

    A :class:`~lightning.pytorch.callbacks.Checkpoint` so that Lightning orders it after the
    ``ModelCheckpoint`` callbacks (at a validation's end ``best.ckpt`` is written first). Under
    DDP the ranks agree first (any rank's signal stops all).

    It also enforces ``trainer.max_steps`` (Lightning runs with ``max_steps=-1``): at that step
    it asks the trainer to stop, and Lightning validates before it does. Lightning's own
    step-limited ("iteration-based") mode resumes a checkpoint taken at an epoch's end into
    the wrong epoch, so it is not used.

    Args:
        signals: the run's :class:`StopSignals`.
        path: ``<run dir>/checkpoints/last.ckpt``.
        every_n_steps: periodic saves (``None``: only at validation and on a stop signal).
        max_steps: stop after this many optimizer steps (``None`` or ``<= 0``: no limit).
    """

    def __init__(
        self,
        signals: StopSignals,
        path: str | Path,
        every_n_steps: int | None = None,
        max_steps: int | None = None,
    ):
        self.signals, self.path = signals, str(path)
        self.every_n_steps = every_n_steps
        self.max_steps = int(max_steps) if max_steps and max_steps > 0 else None
        self.saved_at: int | None = None
        self.validated_at: int | None = None  # global step of the newest fit validation
        self._pending: Interrupted | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"validated_at": self.validated_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validated_at = state_dict.get("validated_at")

    def _requested(self, trainer: pl.Trainer) -> bool:
        local = self.signals.received is not None
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(local, all=False))
        return local

    def _save(self, trainer: pl.Trainer) -> None:
        if self.saved_at != trainer.global_step or not Path(self.path).exists():
            trainer.save_checkpoint(self.path)
            self.saved_at = trainer.global_step

    def _stop(self, trainer: pl.Trainer, where: str) -> None:
        """Save now; raise once Lightning has logged this batch (next batch start, or the end
        of training): raising inside the hook would drop the batch's row from metrics.csv."""
        self._save(trainer)
        self._pending = Interrupted(self.signals.received or signal.SIGTERM, where, self.saved_at)

    def _raise_pending(self) -> None:
        if self._pending is not None:
            err, self._pending = self._pending, None
            raise err

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._raise_pending()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raise_pending()  # the stop came on the last batch: do not go on to the test

    def _limit(self, trainer: pl.Trainer) -> None:
        if self.max_steps is not None and trainer.global_step >= self.max_steps:
            trainer.should_stop = True  # Lightning validates, then ends the fit

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signals.install(trainer)  # over Lightning's SIGTERM handler: one mechanism
        self._limit(trainer)  # a resumed run that had already reached max_steps
        if self._requested(trainer):  # arrived while the data and model were set up
            raise Interrupted(self.signals.received or signal.SIGTERM, "before training", None)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signals.install(trainer)
        if self._requested(trainer):
            raise Interrupted(self.signals.received or signal.SIGTERM, "test", trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._limit(trainer)
        if self._validation_due(trainer):
            return  # saved (and stopped, if asked) at the end of that validation
        if self._requested(trainer):
            self._stop(trainer, "training")
            return
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._save(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before ModelCheckpoint saves in on_validation_end, so the saved state has it
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.validated_at = trainer.global_step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self._requested(trainer) and self._pending is None:
            self._stop(trainer, "validation")

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._requested(trainer):
            raise Interrupted(self.signals.received or signal.SIGTERM, "test", trainer.global_step)

    @staticmethod
    def _validation_due(trainer: pl.Trainer) -> bool:
        """Whether a validation runs right after this training batch."""
        loop = trainer.fit_loop
        if not trainer.val_dataloaders and trainer.limit_val_batches == 0:
            return False
        try:
            return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))
        except Exception:  # private Lightning API: if it moves, save at once (mid-epoch: exact)
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
        msg += "; " + _slurm_requeue(err, slurm)
    if slurm is None or "; requeued" not in msg:
        msg += f"; continue it with the same overrides plus resume={ckpt.parent.parent}"
    return f"{msg}. Exit status {err.code}."


def _slurm_requeue(err: Interrupted, slurm: dict[str, Any]) -> str:
    """Requeue this SLURM job if it was pre-empted or warned of its time limit (and not too
    often); not if it was cancelled or requeued from outside. Returns what happened."""
    job = slurm["job_id"]
    state = job_state(job)
    if state not in (None, "RUNNING"):
        return f"SLURM job {job} is {state} (cancelled, or requeued from outside): not requeued"
    timeouts = err.signum in (signal.SIGUSR1, signal.SIGUSR2)
    limit = max_time_requeues()
    if timeouts and slurm.get("restart_count", 0) >= limit:
        return (
            f"SLURM job {job} already requeued {slurm['restart_count']} times (limit {limit}, "
            "hydra.launcher.max_num_timeout): not requeued"
        )
    ok, said = requeue(job)
    if ok:
        return f"requeued SLURM job {job}: it resumes from the last checkpoint in the same run dir"
    return f"could not requeue SLURM job {job} ({said})"
