"""Continuing a run: which checkpoint (``resume``), and which settings may change on the way.

A resumed run must be the run it continues: settings that the checkpoint's weights or the order
of its batches depend on (model, attention, task and data, seed, devices) are refused, with a
one-line error, before the run directory is touched; settings that can change (optimiser,
length of training, precision, logging) are applied and logged, never silently ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from attnlab.legacy import upgrade_run_config

log = logging.getLogger("attnlab")


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to continue from, per ``resume``; may move ``paths.run_dir``.

    - ``auto`` (default): ``<run dir>/checkpoints/last.ckpt`` if it exists (a requeued SLURM job,
      or a command re-run into the same ``hydra.run.dir``), else start fresh;
    - ``true``: ``<run dir>/checkpoints/last.ckpt``, which must exist;
    - a run directory: its ``checkpoints/last.ckpt``; the run continues in that directory;
    - a ``.ckpt`` file: continue from it, writing into this run's directory;
    - ``false``: start fresh, in a run directory that holds no checkpoints yet.

    Raises:
        FileNotFoundError: ``resume`` names a checkpoint or run directory that does not exist.
        ValueError: ``resume=false`` in a run directory that already holds a run's checkpoints
            (starting over would overwrite them).
    """
    resume = cfg.get("resume", "auto")
    run_dir = Path(cfg.paths.run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    text = str(resume).strip().lower() if resume is not None else "false"
    if resume is False or text in ("false", "none", "null"):
        if last.exists():
            raise ValueError(
                f"resume=false, but {run_dir} already holds a run ({last}); starting over would "
                "overwrite it. Continue it with resume=auto (or true), or choose a new "
                "hydra.run.dir."
            )
        return None
    if text == "auto":
        if last.exists():
            log.info("resume=auto: continuing the run in %s from %s", run_dir, last)
            return str(last)
        return None
    if resume is True or text == "true":
        path = last
    else:
        path = Path(str(resume)).expanduser()
        if path.is_dir():
            if path.resolve() != run_dir.resolve():
                with open_dict(cfg):
                    cfg.paths.run_dir = str(path)
                log.info("resume=%s: continuing the run in that directory", path)
            path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"resume={resume}: {path} does not exist. Pass the run directory of an earlier run "
            "(resume=<run dir>) or its checkpoint (resume=<run dir>/checkpoints/last.ckpt); "
            "resume=auto starts fresh when there is nothing to continue."
        )
    log.info("resuming from %s", path)
    return str(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by ``attnlab train`` (on the CPU).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated, corrupt, or not an attnlab checkpoint; the message
            names it and what to use instead.
    """
    import pickle
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass <run dir>/checkpoints/best.ckpt or last.ckpt."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile, AttributeError, ImportError, IndexError, KeyError) as err:  # fmt: skip
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot read checkpoint {path}: it is truncated or corrupt ({first}); use another "
            "one (<run dir>/checkpoints/last.ckpt or best.ckpt), or retrain."
        ) from err
    if not isinstance(ckpt, dict) or "attnlab_config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(
            f"{path} is not an attnlab checkpoint (no attnlab_config/state_dict): it was not "
            "written by `attnlab train`."
        )
    ckpt["attnlab_config"] = upgrade_run_config(ckpt["attnlab_config"])  # older layouts
    return ckpt


#: Settings a resumed run may change; applied from the resume on and logged.
CHANGEABLE = (
    "optim.",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.gradient_clip_val",
    "trainer.val_check_interval",
    "trainer.precision",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.deterministic",
    "checkpoint_every_n_steps",
    "nonfinite",
    "threads",
    "logger.",
    "callbacks.",
    "paths.",
    "task.data.num_workers",
    "task.data.eval_batch_size",
    "task.data.limit_test",
    "task.data.cache_dir",
    "task.data.path",
    "task.data.data_dir",
    "name",
    "study",
    "tags",
    "resume",
)
#: Settings that define the run (weights' shapes, data and batch order): refused when changed.
FIXED = ("model.", "attention.", "task.", "seed", "trainer.")


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            out.update(_flat(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = cfg
    return out


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def check_resume(cfg: DictConfig, ckpt_path: str) -> list[str]:
    """Compare the run's settings with those saved in the checkpoint it resumes from.

    Returns the changes that will apply (``"optim.lr: 0.001 -> 0.0003"``), which are logged.

    Raises:
        ValueError: (one line, before anything is written) settings the checkpoint depends on
            changed -- model or attention sizes, task, data, seed, devices, ... -- or the
            checkpoint cannot be read.
    """
    saved = read_checkpoint(ckpt_path)["attnlab_config"]
    old = _flat(saved)
    new = _flat(OmegaConf.to_container(cfg, resolve=True))
    changed = [k for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    changed = [k for k in changed if k != "vocab_size" and not k.startswith("hydra")]
    refused = [k for k in changed if not _matches(k, CHANGEABLE) and _matches(k, FIXED)]
    if refused:
        what = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ValueError(
            f"cannot resume from {ckpt_path}: {what}{more} changed, and the checkpoint's weights or "
            "its order of batches depend on them. Resume with the original values, or start a "
            "new run in another directory (hydra.run.dir=...)."
        )
    applied = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed if _matches(k, CHANGEABLE)]
    applied = [a for a in applied if not a.startswith(("paths.", "resume", "logger.", "name"))]
    for line in applied:
        log.warning("resume with a changed setting, applied from the resumed step on: %s", line)
    return applied
