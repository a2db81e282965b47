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
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from attnlab.callbacks import ThroughputMonitor, peak_memory_mb
from attnlab.config import group_choice
from attnlab.hardware import (
    apply_threads,
    device_type,
    machine_info,
    resolve_precision,
    resolve_threads,
)
from attnlab.interrupts import (
    Interrupted,
    LastCheckpoint,
    StopSignals,
    finish_interrupted,
    slurm_info,
)
from attnlab.models import build_model, count_parameters
from attnlab.reliability import (
    NONFINITE_FIXES,
    AtomicCheckpointIO,
    NonFiniteGuard,
    RNGStateCallback,
    check_config,
    restore_metrics,
)
from attnlab.resume import check_resume, resume_checkpoint
from attnlab.tasks import TASKS, TaskModule
from attnlab.tracking import build_loggers, finish_trackers

log = logging.getLogger("attnlab")

BACKBONE_KEYS = (
    "d_model",
    "n_layers",
    "n_heads",
    "norm",
    "ffn",
    "ffn_hidden",
    "positions",
    "prenorm",
    "dropout",
)


def make_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiate ``cfg.task.data``; its constructor checks the settings and reads nothing.

    Raises:
        ValueError: a bad ``task.data.*`` value, as one line naming the key (Hydra's
            multi-line instantiation error is unwrapped).
    """
    from hydra.errors import InstantiationException

    try:
        return instantiate(cfg.task.data)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, TypeError):  # an unknown or missing argument
            raise ValueError(f"task.data: {cause}") from err
        if isinstance(cause, ValueError | FileNotFoundError):
            raise type(cause)(f"task.data: {cause}") from err
        raise


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiate ``cfg.task.data`` and set it up for fitting (tokenizer, splits)."""
    dm = make_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def build_network(cfg: DictConfig, vocab_size: int) -> nn.Module:
    """The model for ``cfg.task.kind`` from ``cfg.model`` and ``cfg.attention``."""
    m = cfg.model
    model = build_model(
        cfg.task.kind,
        instantiate(cfg.attention),
        vocab_size=vocab_size,
        max_len=cfg.task.max_len,
        num_classes=cfg.task.get("num_classes", 2),
        pooling=m.get("pooling", "mean"),
        tie_embeddings=m.get("tie_embeddings", True),
        **{k: m[k] for k in BACKBONE_KEYS if k in m},
    )
    if m.get("compile"):  # in place: forward compiled lazily, state_dict keys unchanged
        model.compile()
    return model


def build_task(cfg: DictConfig, model: nn.Module, vocab_size: int) -> TaskModule:
    """Wrap ``model`` in the LightningModule for ``cfg.task.kind``."""
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config["vocab_size"] = vocab_size
    kwargs: dict[str, Any] = {
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "run_config": run_config,
    }
    if cfg.task.kind == "classification":
        kwargs["num_classes"] = cfg.task.num_classes
    return TASKS[cfg.task.kind](model, **kwargs)


def resolve_runtime(cfg: DictConfig) -> dict[str, Any]:
    """Resolve what the hardware decides, once, before anything is read (DESIGN.md, 14).

    Sets ``cfg.trainer.precision`` to the precision that will run (``auto`` resolved) and
    returns the record that goes into ``summary.json`` and the W&B config: ``precision``,
    ``precision_reason``, ``threads``, ``threads_reason``, ``device``, ``hardware``, ``slurm``.

    Raises:
        ValueError: a GPU trainer without a GPU, an unknown precision, fp16 on the CPU, or bad
            ``threads`` (see :mod:`attnlab.hardware`).
    """
    device = device_type(cfg.trainer.get("accelerator", "auto"))
    precision = resolve_precision(cfg.trainer.get("precision", "auto"), device)
    threads = resolve_threads(cfg.get("threads", "auto"), _processes_per_machine(cfg, device))
    with open_dict(cfg):
        cfg.trainer.precision = precision.value
    return {
        "device": device,
        "precision": precision.value,
        "precision_reason": precision.reason,
        "threads": threads.value,
        "threads_reason": threads.reason,
        "hardware": machine_info(device),
        "slurm": slurm_info(),
    }


def _processes_per_machine(cfg: DictConfig, device: str) -> int:
    """CPU DDP runs one process per device on this machine; everything else one."""
    devices = cfg.trainer.get("devices", 1)
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if device == "cpu" and strategy.startswith("ddp") and isinstance(devices, int):
        return max(1, devices)
    return 1


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
    build_network(cfg, vocab_size=8)  # bad model/attention settings fail before data loading
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
    model = build_network(cfg, vocab_size)
    params = count_parameters(model)
    task = build_task(cfg, model, vocab_size)

    ckpt_dir = run_dir / "checkpoints"
    # Fixed names (no -v1 copies): best.ckpt is replaced only by a better model (its score is
    # part of the checkpointed callback state, so this holds across resumes); last.ckpt is
    # written at every validation and by LastCheckpoint.
    checkpoint = ModelCheckpoint(
        dirpath=str(ckpt_dir),
        filename="best",
        monitor=cfg.task.monitor,
        mode=cfg.task.monitor_mode,
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
    )
    throughput = ThroughputMonitor(log_every=cfg.trainer.get("log_every_n_steps", 20))
    max_steps = int(cfg.trainer.get("max_steps", -1) or -1)  # enforced by LastCheckpoint
    last_ckpt = LastCheckpoint(
        signals, ckpt_dir / "last.ckpt", cfg.get("checkpoint_every_n_steps"), max_steps
    )
    guard = NonFiniteGuard(cfg.get("nonfinite", "stop"))
    callbacks = [
        checkpoint,
        throughput,
        LearningRateMonitor(logging_interval="step"),
        guard,
        last_ckpt,
        RNGStateCallback(),
    ]
    pre_resume = run_dir / "metrics.pre-resume.csv"
    if ckpt_path and (run_dir / "metrics.csv").exists():
        restore_metrics(run_dir, pre_resume)  # left behind by a resumed run that crashed
        (run_dir / "metrics.csv").replace(pre_resume)  # CSVLogger would delete it
    loggers = build_loggers(cfg, run_dir, params, runtime)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        _target_="lightning.pytorch.Trainer",
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=str(run_dir),
        plugins=_plugins(),
        max_steps=-1,
    )
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


def _plugins() -> list[Any]:
    """Atomic checkpoint writes; under SLURM, Lightning's cluster environment without its own
    auto-requeue (attnlab requeues itself: :mod:`attnlab.interrupts`)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


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
