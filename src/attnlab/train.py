"""Build everything from a composed config and run it: ``train(cfg) -> summary``.

This is the function ``attnlab train`` calls and the tests call (DESIGN.md,
convention 11). Outputs in ``cfg.paths.run_dir``: ``config.yaml`` (resolved),
``metrics.csv``, ``summary.json``, ``checkpoints/{best,last}.ckpt`` and, with
W&B, ``wandb/offline-run-*``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from attnlab.build import (
    build_callbacks,
    build_loggers,
    build_task,
    build_trainer,
    make_datamodule,
    resolve_runtime,
)
from attnlab.callbacks import NonFiniteGuard, ThroughputMonitor, peak_memory_mb
from attnlab.checks import check_config
from attnlab.config import group_choice
from attnlab.errors import NONFINITE_FIXES
from attnlab.hardware import apply_threads
from attnlab.interrupts import Interrupted, LastCheckpoint, StopSignals, finish_interrupted
from attnlab.models import count_parameters
from attnlab.resume import check_resume, resume_checkpoint
from attnlab.tasks.base import TaskModule
from attnlab.tracking import finish_trackers, restore_metrics

log = logging.getLogger("attnlab")

#: the callbacks a training run needs (``conf/callbacks/default.yaml``): the summary reads them
REQUIRED_CALLBACKS = {
    "model_checkpoint": ModelCheckpoint,
    "throughput": ThroughputMonitor,
    "nonfinite": NonFiniteGuard,
    "last_checkpoint": LastCheckpoint,
}


def start_line(runtime: dict[str, Any]) -> str:
    """The one line a run prints at start: precision and threads, and why."""
    hw = runtime["hardware"]
    where = hw.get("gpu") or hw["cpu"]
    line = (
        f"attnlab: {runtime['device']} ({where}), precision {runtime['precision']} "
        f"({runtime['precision_reason']}), {runtime['threads']} torch "
        f"thread{'s' if runtime['threads'] != 1 else ''} "
        f"({runtime['threads_reason']})"
    )
    if runtime.get("slurm"):
        line += f", SLURM job {runtime['slurm']['job_id']}"
    return line


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test and summarise one run. Returns the summary (also written to summary.json).

    Raises:
        ValueError: a config error, found before any data is read.
        Interrupted: a stop signal (SIGTERM; SLURM's USR1/USR2) ended the run early, after saving
            ``last.ckpt`` (and requeueing, under SLURM); a ``SystemExit`` with status 128 + signal.
    """
    start = time.perf_counter()
    check_config(cfg)
    runtime = resolve_runtime(cfg)
    build_task(cfg, vocab_size=8)  # bad model/attention/task/optim settings fail before data
    dm = make_datamodule(cfg)  # bad task.data.* values too (nothing is read yet)
    ckpt_path = resume_checkpoint(cfg)  # may move paths.run_dir (resume=<run dir>)
    if ckpt_path:
        check_resume(cfg, ckpt_path)  # refuses changed shapes/data before anything is written
    signals = StopSignals(slurm=runtime["slurm"] is not None)
    signals.install()
    exit_code = 1
    try:
        summary = _train(cfg, dm, runtime, signals, ckpt_path, start)
        exit_code = 0
        return summary
    except SystemExit as stop:  # Interrupted: 128 + signal
        exit_code = stop.code if isinstance(stop.code, int) else 1
        raise
    finally:
        signals.restore()
        finish_trackers(exit_code)


def _train(
    cfg: DictConfig,
    dm: pl.LightningDataModule,
    runtime: dict[str, Any],
    signals: StopSignals,
    ckpt_path: str | None,
    start: float,
) -> dict[str, Any]:
    apply_threads(runtime["threads"])
    log.info(start_line(runtime))
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    pl.seed_everything(cfg.seed, workers=True)

    dm.prepare_data()
    dm.setup("fit")
    vocab_size = int(dm.vocab_size)
    task = build_task(cfg, vocab_size)
    params = count_parameters(task.model)
    callbacks = build_callbacks(cfg, run_dir, signals)
    checkpoint, throughput, guard, last_ckpt = (
        _required(callbacks, name, cls) for name, cls in REQUIRED_CALLBACKS.items()
    )
    ckpt_dir = run_dir / "checkpoints"
    pre_resume = run_dir / "metrics.pre-resume.csv"
    if ckpt_path and (run_dir / "metrics.csv").exists():
        restore_metrics(run_dir, pre_resume)  # left behind by a resumed run that crashed
        (run_dir / "metrics.csv").replace(pre_resume)  # CSVLogger would delete it
    loggers = build_loggers(cfg, run_dir, params, runtime)
    trainer = build_trainer(cfg, list(callbacks.values()), loggers, run_dir)
    try:
        trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
        validate_final(trainer, task, dm, checkpoint, last_ckpt)
        best_path = checkpoint.best_model_path or None
        if best_path:  # the best weights only: ckpt_path= would also restore every callback's
            # state from best.ckpt (tokens seen, times, skipped steps), so the summary would
            # report the run as it was at its best validation, not at its end
            state = torch.load(best_path, map_location="cpu", weights_only=False)["state_dict"]
            task.load_state_dict(state)
        test_metrics = trainer.test(task, datamodule=dm)[0]
    except Interrupted as err:
        msg = finish_interrupted(err, runtime["slurm"], ckpt_dir / "last.ckpt")
        if trainer.is_global_zero:
            restore_metrics(run_dir, pre_resume)
            interrupted = {
                "status": "interrupted",
                "error": msg,
                "global_step": trainer.global_step,
                "last_checkpoint": str(ckpt_dir / "last.ckpt"),
                "run_dir": str(run_dir),
                **{k: runtime[k] for k in ("precision", "threads", "hardware", "slurm")},
            }
            (run_dir / "summary.json").write_text(json.dumps(interrupted, indent=2))
        log.error("attnlab train: %s", msg)
        raise
    best = checkpoint.best_model_score
    run_time = throughput.summary
    status, error = "completed", None
    limit = float(cfg.get("nonfinite_max_skipped", 0.05))
    if guard.skipped > limit * max(1, trainer.global_step):
        status = "failed"
        error = (
            f"skipped {guard.skipped} of {trainer.global_step} steps for a non-finite loss or "
            f"gradient (nonfinite=skip), more than nonfinite_max_skipped={limit}: the numbers of "
            f"this run are not trustworthy. Fix: {NONFINITE_FIXES}"
        )
        log.error("attnlab train: %s", error)
    summary = {
        "status": status,
        **({"error": error} if error else {}),
        "nonfinite_skipped": guard.skipped,
        "task": cfg.task.name,
        "attention": group_choice("attention", cfg),
        "model": group_choice("model", cfg),
        "n_heads": cfg.model.n_heads,
        "head_dim": task.model.backbone.attentions[0].head_dim,
        "d_model": cfg.model.d_model,
        "n_layers": cfg.model.n_layers,
        "seed": cfg.seed,
        "params": params,
        "monitor": cfg.task.monitor,
        "best_val": float(best) if best is not None else math.nan,
        "test": {k: float(v) for k, v in test_metrics.items()},
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        # over the whole run: this attempt from its start to here, plus the earlier attempts'
        # fit time up to the checkpoint this one resumed from
        "wall_time_s": throughput.earlier_attempts_s + (time.perf_counter() - start),
        "peak_mem_mb": peak_memory_mb(task.device),
        **run_time,
        "best_checkpoint": best_path,
        "last_checkpoint": str(ckpt_dir / "last.ckpt"),
        "run_dir": str(run_dir),
        **{k: runtime[k] for k in ("precision", "precision_reason", "threads", "threads_reason")},
        "hardware": runtime["hardware"],
        "slurm": runtime["slurm"],
    }
    if trainer.is_global_zero:
        restore_metrics(run_dir, pre_resume)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(format_summary(summary))
    return summary


def validate_final(
    trainer: pl.Trainer,
    task: TaskModule,
    dm: pl.LightningDataModule,
    checkpoint: ModelCheckpoint,
    last: LastCheckpoint,
) -> None:
    """Validate the final weights when training ended between validations (``max_steps``), so
    ``best.ckpt`` is the best of every model the run ended with; it is replaced only by a better
    score, and ``last.ckpt`` is rewritten with the updated record."""
    if last.validated_at == trainer.global_step or trainer.limit_val_batches == 0:
        return
    metrics = trainer.validate(task, datamodule=dm, verbose=False)[0]
    score = metrics.get(checkpoint.monitor)
    if score is None:
        return
    score = torch.as_tensor(float(score), dtype=torch.float64)
    best = checkpoint.best_model_score
    better = best is None or (score < best if checkpoint.mode == "min" else score > best)
    log.info("final validation at step %d: %s %.4f", trainer.global_step, checkpoint.monitor, score)
    if better:
        path = str(Path(checkpoint.dirpath) / "best.ckpt")
        checkpoint.best_model_score, checkpoint.best_model_path = score, path
        checkpoint.best_k_models, checkpoint.kth_best_model_path = {path: score}, path
        checkpoint.kth_value = score
        trainer.save_checkpoint(path)
    last.validated_at = trainer.global_step
    trainer.save_checkpoint(last.path)


def _required(callbacks: dict[str, pl.Callback], name: str, cls: type) -> Any:
    """``callbacks[name]``, which must be a ``cls``: the run summary and resumes read it."""
    cb = callbacks.get(name)
    if not isinstance(cb, cls):
        raise ValueError(
            f"callbacks.{name} must be a {cls.__module__}.{cls.__name__} (got "
            f"{type(cb).__name__ if cb is not None else 'nothing'}): attnlab's run summary and "
            "exact resumes read it; keep it in conf/callbacks/default.yaml."
        )
    return cb


def format_summary(s: dict[str, Any]) -> str:
    """The end-of-run table printed by ``attnlab train``."""
    metric = s["monitor"].split("/", 1)[1]
    test = s["test"].get(f"test/{metric}", math.nan)
    rows = [
        ("task", s["task"]),
        ("attention", s["attention"]),
        (
            "model",
            f"{s['model']}: d_model {s['d_model']}, {s['n_layers']} layers, "
            f"{s['n_heads']} heads x head_dim {s['head_dim']}",
        ),
        ("params", f"{s['params']['total']:,} (attention {s['params']['attention']:,})"),
        (f"best {s['monitor']}", f"{s['best_val']:.4f}"),
        (f"test/{metric}", f"{test:.4f}"),
        ("steps / epochs", f"{s['global_step']} / {s['epochs']}"),
        *(
            [("skipped steps", f"{s['nonfinite_skipped']} (non-finite; {s['status']})")]
            if s.get("nonfinite_skipped")
            else []
        ),
        ("wall time", f"{s['wall_time_s']:.0f} s"),
        ("train tokens/s", f"{s['tokens_per_sec']:,.0f}"),
        ("peak memory", f"{s['peak_mem_mb']:,.0f} MiB"),
        ("precision / threads", f"{s.get('precision', '?')} / {s.get('threads', '?')}"),
        ("run dir", s["run_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(str(v)) for _, v in rows))
    body = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    return f"\n{line}\nattnlab run summary\n{line}\n{body}\n{line}"
