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

from lightning.pytorch.loggers import CSVLogger, WandbLogger
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
    group = f"{cfg.study}/{base}"
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


def wandb_logger(
    cfg: DictConfig,
    run_dir: Path,
    runtime: dict[str, Any] | None = None,
    project: str = "attnlab",
    entity: str | None = None,
    offline: bool = True,
    group: str | None = None,
    job_type: str = "train",
) -> WandbLogger:
    """Lightning's ``WandbLogger`` for one job (``conf/logger/wandb.yaml``, ``_partial_: true``:
    the builder passes ``cfg``, ``run_dir`` and ``runtime``).

    One W&B run per run directory: its id is kept in ``<run dir>/wandb_id`` and a resumed run
    continues it (``resume="allow"``); :func:`finish_trackers` ends it when the job ends.
    ``runtime`` (precision and threads actually used, the machine, the SLURM job) is added to the
    W&B config under ``runtime``. ``group`` null: ``<study>/<name>[<overrides>]`` (:func:`run_names`).
    """
    finish_trackers()  # a run left open by an earlier job in this process must not be reused
    default_group, name = run_names(cfg)
    run_id, resumed = wandb_run_id(run_dir)
    if resumed:
        log.info("W&B: continuing run %s (%s)", run_id, name)
    return WandbLogger(
        project=project,
        entity=entity,
        offline=bool(offline),
        save_dir=str(run_dir),
        group=(group or default_group)[:128],
        job_type=job_type,
        name=name,
        id=run_id,
        resume="allow",
        tags=list(cfg.get("tags", [])) or None,
        config={**OmegaConf.to_container(cfg, resolve=True), "runtime": runtime or {}},
    )


def csv_logger(run_dir: Path) -> CSVLogger:
    """``<run dir>/metrics.csv``: always written (``attnlab report`` and resumes read it)."""
    return CSVLogger(str(run_dir), name="", version="")


def finish_trackers(exit_code: int = 0) -> None:
    """End this process's W&B run, if one is open, so the next job (a sweep runs its jobs in one
    process) starts its own instead of logging into this one."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


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
