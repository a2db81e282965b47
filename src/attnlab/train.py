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
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from attnlab.callbacks import ThroughputMonitor, peak_memory_mb
from attnlab.models import build_model, count_parameters
from attnlab.reliability import (
    AtomicCheckpointIO,
    NonFiniteGuard,
    RNGStateCallback,
    SigtermCheckpoint,
    check_config,
    restore_metrics,
)
from attnlab.tasks import TASKS, TaskModule

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


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiate ``cfg.task.data`` and set it up for fitting (tokenizer, splits)."""
    dm = instantiate(cfg.task.data)
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


def build_loggers(cfg: DictConfig, run_dir: Path, params: dict[str, int]) -> list[Logger]:
    """CSV always; W&B (offline unless told otherwise) when ``logger.kind == wandb``."""
    loggers: list[Logger] = [CSVLogger(str(run_dir), name="", version="")]
    lg = cfg.logger
    if lg.kind == "wandb":
        loggers.append(
            WandbLogger(
                project=lg.project,
                entity=lg.get("entity"),
                offline=bool(lg.offline),
                save_dir=str(run_dir),
                group=lg.group,
                job_type=lg.get("job_type", "train"),
                name=f"{cfg.name}-seed{cfg.seed}",
                tags=list(cfg.get("tags", [])) or None,
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    for logger in loggers:
        logger.log_hyperparams({"params": params})
    return loggers


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """``resume``: false | true (this run dir's last.ckpt) | a run dir | a .ckpt path."""
    resume = cfg.get("resume", False)
    if resume in (False, None):
        return None
    path = run_dir if resume is True else Path(str(resume))
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.exists():
        log.warning("resume requested but %s does not exist; starting from scratch", path)
        return None
    log.info("resuming from %s", path)
    return str(path)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test and summarise one run. Returns the summary (also written to summary.json)."""
    start = time.perf_counter()
    check_config(cfg)
    build_network(cfg, vocab_size=8)  # bad model/attention settings fail before data loading
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    pl.seed_everything(cfg.seed, workers=True)

    dm = build_datamodule(cfg)
    vocab_size = int(dm.vocab_size)
    model = build_network(cfg, vocab_size)
    params = count_parameters(model)
    task = build_task(cfg, model, vocab_size)

    ckpt_dir = run_dir / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=str(ckpt_dir),
        filename="best",
        monitor=cfg.task.monitor,
        mode=cfg.task.monitor_mode,
        save_top_k=1,
        save_last=True,
    )
    throughput = ThroughputMonitor(log_every=cfg.trainer.get("log_every_n_steps", 20))
    callbacks = [checkpoint, throughput, LearningRateMonitor(logging_interval="step")]
    if cfg.get("checkpoint_every_n_steps"):  # Lightning defers monitored saves to validation
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(ckpt_dir),
                filename="last",
                every_n_train_steps=cfg.checkpoint_every_n_steps,
                enable_version_counter=False,
            )
        )
    callbacks += [
        NonFiniteGuard(cfg.get("nonfinite", "stop")),
        SigtermCheckpoint(ckpt_dir / "last.ckpt"),
        RNGStateCallback(),
    ]
    ckpt_path = resume_checkpoint(cfg, run_dir)
    pre_resume = run_dir / "metrics.pre-resume.csv"
    if ckpt_path and (run_dir / "metrics.csv").exists():
        restore_metrics(run_dir, pre_resume)  # left behind by a resumed run that crashed
        (run_dir / "metrics.csv").replace(pre_resume)  # CSVLogger would delete it
    loggers = build_loggers(cfg, run_dir, params)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        _target_="lightning.pytorch.Trainer",
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    fit_time = time.perf_counter() - start

    best_path = checkpoint.best_model_path or None
    test_metrics = trainer.test(task, datamodule=dm, ckpt_path=best_path or None)[0]
    best = checkpoint.best_model_score
    summary = {
        "status": "completed",
        "task": cfg.task.name,
        "attention": _choice("attention", cfg),
        "model": _choice("model", cfg),
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
        "fit_time_s": fit_time,
        "wall_time_s": time.perf_counter() - start,
        "peak_mem_mb": peak_memory_mb(task.device),
        **throughput.summary,
        "best_checkpoint": best_path,
        "run_dir": str(run_dir),
    }
    if trainer.is_global_zero:
        restore_metrics(run_dir, pre_resume)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(format_summary(summary))
    return summary


def _choice(group: str, cfg: DictConfig) -> str:
    """The config-group option chosen for ``group`` (e.g. ``softmax``), if known."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices[group])
    except (ValueError, KeyError):
        return str(cfg[group].get("_target_", "?")).rsplit(".", 1)[-1]


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
        ("wall time", f"{s['wall_time_s']:.0f} s"),
        ("train tokens/s", f"{s['tokens_per_sec']:,.0f}"),
        ("peak memory", f"{s['peak_mem_mb']:,.0f} MiB"),
        ("run dir", s["run_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(str(v)) for _, v in rows))
    body = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    return f"\n{line}\nattnlab run summary\n{line}\n{body}\n{line}"
