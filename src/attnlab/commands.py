"""How ``attnlab <command>`` ends: one-line errors, failed sweep jobs recorded, stopped sweeps.

- :func:`run_command`: ``attnlab <command>`` prints known errors as one line
  (:func:`attnlab.errors.user_message`); under ``-m`` a failed job writes ``summary.json`` with
  ``status: failed`` and the sweep goes on.
- :func:`sweep_stopped_message`: what a stop signal dropped from a sweep.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from attnlab.errors import user_message

log = logging.getLogger("attnlab")


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


def sweep_jobs() -> list[list[str]] | None:
    """Every job of the running sweep (its override lists, in launch order), as Hydra's
    BasicSweeper expands them from ``<sweep dir>/multirun.yaml``; ``None`` for other sweepers."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from attnlab.paths import CONF_DIR

    hc = HydraConfig.get()
    if not str(hc.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    saved = OmegaConf.load(Path(hc.sweep.dir) / "multirun.yaml")
    params = saved.hydra.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(saved.hydra.overrides.task)
    # a config loader lets sweeps such as attention=glob(*) expand to the files they match
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    parser = OverridesParser.create(config_loader=loader)
    batches = BasicSweeper.split_arguments(parser.parse_overrides(args), None)
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
