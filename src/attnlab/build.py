"""One builder: a composed config in, the run's parts out (lightning-hydra-template style).

``attnlab train``, ``evaluate``, ``generate``, ``analyze`` and ``bench`` all build through here:

- :func:`make_datamodule` -- ``task.data`` (``_target_``: the task's LightningDataModule);
- :func:`build_task` -- ``model`` (``_target_``: :class:`~attnlab.models.Backbone`, partial) with
  ``attention`` (``_target_``: the variant, partial), causal when the task class says so, then
  ``task.module`` (``_target_``: the task's LightningModule, partial) adds its head, with
  ``optim`` (``_target_``: the optimiser factory, partial);
- :func:`build_callbacks` -- ``callbacks.*`` (``_target_`` each);
- :func:`build_loggers` -- CSV always, plus ``logger`` (``_target_``) when set;
- :func:`build_trainer` -- ``trainer`` (Lightning's ``Trainer`` arguments).

No task kind, backbone option or callback is named in code: a new task is a ``task.module`` and
``task.data`` pair, a new backbone option is a ``Backbone`` argument set in ``conf/model/*.yaml``.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from attnlab.checkpointing import AtomicCheckpointIO
from attnlab.hardware import device_type, machine_info, resolve_precision, resolve_threads
from attnlab.interrupts import slurm_info
from attnlab.models import Backbone
from attnlab.tasks.base import TaskModule
from attnlab.tracking import csv_logger

log = logging.getLogger("attnlab")

#: keys of ``cfg.model`` the builder reads itself (everything else is a ``Backbone`` argument)
BUILDER_MODEL_KEYS = ("_target_", "_partial_", "compile")


def _unwrap(err: InstantiationException, where: str) -> Exception:
    """Hydra's multi-line instantiation error as one line naming the config key."""
    cause = err.__cause__ or err
    if isinstance(cause, TypeError):  # an unknown or missing argument
        return ValueError(f"{where}: {cause}")
    if isinstance(cause, ValueError | FileNotFoundError):
        return type(cause)(f"{where}: {cause}")
    return err


def make_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiate ``cfg.task.data``; its constructor checks the settings and reads nothing.

    Raises:
        ValueError: a bad ``task.data.*`` value, as one line naming the key.
    """
    try:
        return instantiate(cfg.task.data)
    except InstantiationException as err:
        raise _unwrap(err, "task.data") from err


def task_class(cfg: DictConfig) -> type[TaskModule]:
    """The LightningModule class named by ``cfg.task.module._target_``.

    Raises:
        ValueError: ``task.module`` is missing or does not name a :class:`TaskModule`.
    """
    module = cfg.task.get("module")
    target = module.get("_target_") if module is not None else None
    if not target:
        raise ValueError(
            f"task {cfg.task.get('name')!r} has no task.module._target_: a task config names "
            "its LightningModule there (README, 'Adding a task')."
        )
    try:
        cls = get_class(str(target))
    except Exception as err:  # noqa: BLE001 - Hydra raises ImportError/ValueError variants
        raise ValueError(f"task.module._target_={target!r} cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, TaskModule)):
        raise ValueError(f"task.module._target_={target!r} is not an attnlab TaskModule.")
    return cls


def build_backbone(cfg: DictConfig, vocab_size: int, causal: bool) -> Backbone:
    """``cfg.model`` (a partial ``Backbone``) with ``cfg.attention``, ``task.max_len`` and
    ``causal`` filled in.

    Raises:
        ValueError: an unknown ``model.*`` key, or a bad size or combination (the backbone checks).
    """
    model = OmegaConf.to_container(cfg.model, resolve=True)
    target = model.get("_target_", "attnlab.models.Backbone")
    kwargs = {k: v for k, v in model.items() if k not in BUILDER_MODEL_KEYS}
    cls = get_class(str(target))
    accepted = inspect.signature(cls).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        options = [k for k in accepted if k not in ("vocab_size", "attention", "max_len", "causal")]
        raise ValueError(f"unknown model setting(s) {unknown}; {target} takes {options}.")
    try:  # nested ``_target_`` nodes (a norm or FFN factory) become objects/partials
        kwargs = instantiate(OmegaConf.create(kwargs), _convert_="all")
    except InstantiationException as err:
        raise _unwrap(err, "model") from err
    attention = instantiate(cfg.attention)
    return cls(
        vocab_size=vocab_size,
        attention=attention,
        max_len=int(cfg.task.max_len),
        causal=causal,
        **kwargs,
    )


def build_task(cfg: DictConfig, vocab_size: int) -> TaskModule:
    """The task's LightningModule around a new backbone: ``task.module`` with ``optim``.

    ``model.compile: true`` compiles the task's network in place (forward compiled lazily,
    ``state_dict`` keys unchanged).

    Raises:
        ValueError: a bad ``model.*``, ``attention.*``, ``task.module.*`` or ``optim.*`` setting.
    """
    cls = task_class(cfg)
    backbone = build_backbone(cfg, vocab_size, causal=cls.causal)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config["vocab_size"] = vocab_size
    try:
        optim = instantiate(cfg.optim)
        make_task = instantiate(cfg.task.module)  # a partial (``_partial_: true``)
    except InstantiationException as err:
        raise _unwrap(err, "task.module / optim") from err
    try:
        task = make_task(
            backbone=backbone, vocab_size=vocab_size, optim=optim, run_config=run_config
        )
    except TypeError as err:  # an unknown or missing task.module argument
        raise ValueError(f"task.module ({cls.__name__}): {err}") from err
    if cfg.model.get("compile"):
        task.model.compile()
    return task


def build_callbacks(cfg: DictConfig, run_dir: Path, signals: Any) -> dict[str, pl.Callback]:
    """``cfg.callbacks`` by name. A partial gets the run's objects its constructor asks for:
    ``dirpath`` (``<run dir>/checkpoints``), ``path`` (``<run dir>/checkpoints/last.ckpt``),
    ``signals`` (the :class:`~attnlab.interrupts.StopSignals`)."""
    ckpt_dir = run_dir / "checkpoints"
    offered = {"dirpath": str(ckpt_dir), "path": ckpt_dir / "last.ckpt", "signals": signals}
    out: dict[str, pl.Callback] = {}
    for name, spec in (cfg.get("callbacks") or {}).items():
        if spec is None:
            continue
        try:
            made = instantiate(spec)
        except InstantiationException as err:
            raise _unwrap(err, f"callbacks.{name}") from err
        if callable(made) and not isinstance(made, pl.Callback):  # a partial
            params = inspect.signature(made).parameters
            made = made(**{k: v for k, v in offered.items() if k in params})
        out[str(name)] = made
    return out


def build_loggers(
    cfg: DictConfig, run_dir: Path, params: dict[str, int], runtime: dict[str, Any]
) -> list[Logger]:
    """CSV (``metrics.csv``) always; plus ``cfg.logger`` when it has a ``_target_`` (a partial
    called with ``cfg``, ``run_dir`` and ``runtime``), e.g. :func:`attnlab.tracking.wandb_logger`."""
    loggers: list[Logger] = [csv_logger(run_dir)]
    spec = cfg.get("logger")
    if spec is not None and spec.get("_target_"):
        loggers.append(instantiate(spec)(cfg=cfg, run_dir=run_dir, runtime=runtime))
    for logger in loggers:
        logger.log_hyperparams({"params": params})
    return loggers


def build_trainer(
    cfg: DictConfig, callbacks: list[pl.Callback], loggers: list[Logger] | bool, run_dir: Path
) -> pl.Trainer:
    """Lightning's ``Trainer`` from ``cfg.trainer`` (``max_steps`` is enforced by
    :class:`~attnlab.interrupts.LastCheckpoint`, so the Trainer runs with ``max_steps=-1``);
    checkpoints written atomically; under SLURM, Lightning's cluster environment without its
    own auto-requeue (attnlab requeues itself: :mod:`attnlab.interrupts`)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return instantiate(
        cfg.trainer,
        _target_="lightning.pytorch.Trainer",
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=str(run_dir),
        plugins=plugins,
        max_steps=-1,
    )


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
