"""Where a run's numbers go: CSV always, Weights & Biases (offline by default) when configured.

One W&B run per job: a sweep's jobs can share a process (basic launcher), so each job ends its W&B
run when it ends (:func:`finish_trackers`) and the next starts its own; the id is kept in
``<run dir>/wandb_id`` so a resumed run continues the same W&B run; names and groups carry the
job's overrides (:func:`run_names`), so the seeds of one configuration share a group and
different configurations never do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from attnlab.config import job_overrides, slug

log = logging.getLogger("attnlab")


def run_names(cfg: DictConfig) -> tuple[str, str]:
    """``(group, name)`` of a run for trackers: the group is ``<study>/<name>`` plus the job's
    overrides (Hydra's ``override_dirname``, seed and bookkeeping keys excluded), so the seeds of
    one configuration share a group and different configurations never do; the name adds
    ``-seed<seed>``."""
    overrides = job_overrides()
    base = f"{cfg.name}[{slug(overrides, max_len=80)}]" if overrides else str(cfg.name)
    group = str(cfg.logger.get("group") or f"{cfg.study}/{base}")
    return group[:128], f"{base}-seed{cfg.seed}"  # W&B takes at most 128 characters


def wandb_run_id(run_dir: Path) -> tuple[str, bool]:
    """The W&B run id of this run directory (kept in ``<run dir>/wandb_id``) and whether it
    already existed, i.e. whether this start continues an earlier W&B run."""
    path = run_dir / "wandb_id"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip(), True
    import secrets

    run_id = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
    path.write_text(run_id + "\n")
    return run_id, False


def build_loggers(
    cfg: DictConfig, run_dir: Path, params: dict[str, int], runtime: dict[str, Any] | None = None
) -> list[Logger]:
    """CSV always; W&B (offline unless told otherwise) when ``logger.kind == wandb``.

    One W&B run per run directory: its id is kept in ``<run dir>/wandb_id`` and a resumed run
    continues it (``resume="allow"``); :func:`finish_trackers` ends it when the job ends.
    ``runtime`` (precision and threads actually used, the machine, the SLURM job) is added to the
    W&B config under ``runtime``.
    """
    loggers: list[Logger] = [CSVLogger(str(run_dir), name="", version="")]
    lg = cfg.logger
    if lg.kind == "wandb":
        finish_trackers()  # a run left open by an earlier job in this process must not be reused
        group, name = run_names(cfg)
        run_id, resumed = wandb_run_id(run_dir)
        if resumed:
            log.info("W&B: continuing run %s (%s)", run_id, name)
        loggers.append(
            WandbLogger(
                project=lg.project,
                entity=lg.get("entity"),
                offline=bool(lg.offline),
                save_dir=str(run_dir),
                group=group,
                job_type=lg.get("job_type", "train"),
                name=name,
                id=run_id,
                resume="allow",
                tags=list(cfg.get("tags", [])) or None,
                config={**OmegaConf.to_container(cfg, resolve=True), "runtime": runtime or {}},
            )
        )
    for logger in loggers:
        logger.log_hyperparams({"params": params})
    return loggers


def finish_trackers(exit_code: int = 0) -> None:
    """End this process's W&B run, if one is open, so the next job (a sweep runs its jobs in one
    process) starts its own instead of logging into this one."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)
