"""Config helpers: compose ``conf/`` with Hydra, list the registry, register resolvers.

The conf folder is the registry (DESIGN.md, convention 3): the variants are the
files in ``conf/attention``, the tasks those in ``conf/task``, and so on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from attnlab.paths import CONF_DIR, default_cache_dir, default_data_dir


def _subdir(base: str | None, sub: str) -> str | None:
    return None if base in (None, "", "None") else str(Path(base) / sub)


def slug(*parts: str, max_len: int = 120) -> str:
    """``parts`` joined with ``_`` as one safe path component (``/`` and spaces replaced); over
    ``max_len`` characters it is cut and ends with a hash of the whole, so names stay unique."""
    import hashlib

    text = "_".join(str(p) for p in parts if p not in (None, ""))
    text = text.replace(os.sep, "|").replace(" ", "")
    if len(text) > max_len:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        text = f"{text[: max_len - 9]}_{digest}"
    return text or "run"


def job_overrides() -> str:
    """This job's overrides as Hydra's ``hydra.job.override_dirname`` (``k=v,k=v``), without the
    keys in ``hydra.job.config.override_dirname.exclude_keys`` (seed, paths, logging...);
    ``""`` outside a Hydra job."""
    try:
        return str(HydraConfig.get().job.override_dirname or "")
    except ValueError:  # Hydra not initialised
        return ""


def group_choice(group: str, cfg: DictConfig) -> str:
    """The option chosen for config group ``group`` (e.g. ``softmax`` for ``attention``): Hydra's
    runtime choice when known, else the class name of ``cfg[group]._target_``."""
    try:
        return str(HydraConfig.get().runtime.choices[group])
    except (ValueError, KeyError):
        return str(cfg[group].get("_target_", "?")).rsplit(".", 1)[-1]


def _wandb_offline() -> bool:
    return os.environ.get("WANDB_MODE", "offline") != "online"


def _device_count(devices: object) -> int:
    """How many devices Lightning's ``trainer.devices`` means: a count, ``auto`` (one per task
    under SLURM: the GPUs SLURM gives the job), or a list / ``"0,1"`` string of device ids."""
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    text = str(devices).strip()
    if text == "auto":
        return 1
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"trainer.devices={devices!r} is not a device count or list") from None
    if count < 1:
        raise ValueError(
            f"trainer.devices={devices!r} asks for every device of the node, which a SLURM job "
            "cannot request; set trainer.devices=N (hydra/launcher=slurm asks for N GPUs and N tasks)."
        )
    return count


#: host memory per task (GB) that hydra/launcher=slurm asks for by default
SLURM_MEM_GB_PER_TASK = 4


def _slurm_resource(what: str, trainer: DictConfig) -> int | None:
    """``${attnlab_slurm:<what>,${trainer}}``: the SLURM resources of a job that runs ``trainer``.

    - ``gpus_per_node``: ``trainer.devices`` when the accelerator is a GPU (``gpu``/``cuda``),
      else None (no GPU request: a CPU partition would refuse the gres).
    - ``tasks_per_node``: one task per device (Lightning under SLURM runs one process per device
      and checks ``--ntasks-per-node`` against ``trainer.devices``).
    - ``nodes``: ``trainer.num_nodes`` (1 unless DDP sets it).
    - ``mem_gb``: :data:`SLURM_MEM_GB_PER_TASK` per task.
    """
    devices = _device_count(trainer.get("devices", 1))
    if what == "gpus_per_node":
        gpu = str(trainer.get("accelerator", "cpu")).lower() in ("gpu", "cuda")
        return devices if gpu else None
    if what == "tasks_per_node":
        return devices
    if what == "nodes":
        return int(trainer.get("num_nodes", 1) or 1)
    if what == "mem_gb":
        return SLURM_MEM_GB_PER_TASK * devices
    raise ValueError(
        f"attnlab_slurm: unknown resource {what!r}; one of gpus_per_node, tasks_per_node, "
        "nodes, mem_gb"
    )


RESOLVERS = {
    "attnlab_data_dir": default_data_dir,  # ${attnlab_data_dir:}
    "attnlab_cache_dir": default_cache_dir,  # ${attnlab_cache_dir:}
    "attnlab_subdir": _subdir,  # ${attnlab_subdir:${paths.data_dir},imdb} (None stays None)
    "attnlab_wandb_offline": _wandb_offline,  # True unless WANDB_MODE=online
    "attnlab_slurm": _slurm_resource,  # ${attnlab_slurm:gpus_per_node,${trainer}} (launcher/slurm)
    "attnlab_slug": slug,  # ${attnlab_slug:${hydra.job.num},${hydra.job.override_dirname}}
}


def register_resolvers() -> None:
    """Register the ``attnlab_*`` OmegaConf resolvers used in ``conf/`` (idempotent)."""
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def available(group: str) -> list[str]:
    """Names of the configs in ``conf/<group>`` (e.g. the attention variants)."""
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def compose(
    config_name: str = "train", overrides: Sequence[str] = (), run_dir: str | None = None
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides, outside a Hydra app.

    Sets Hydra's runtime config so ``${hydra:...}`` interpolations resolve, with
    ``run_dir`` as the run's output directory (tests pass a temporary one), and resolves the
    returned config, so it does not change when another config is composed later.

    Raises:
        ValueError: an override names an unknown option of a config group; the
            message lists the available ones.
    """
    register_resolvers()
    check_group_overrides(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    if run_dir is not None:
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    # Resolve now: ``${hydra:...}`` reads a global that the next compose() overwrites.
    OmegaConf.resolve(cfg)
    return cfg


def check_group_overrides(overrides: Sequence[str]) -> None:
    """Raise ValueError naming the options when ``group=value`` names a missing config."""
    for ov in overrides:
        key, _, value = ov.partition("=")
        key = key.lstrip("+~")
        if key.startswith("hydra/"):  # Hydra's groups also come from plugins (launchers); it checks
            continue
        if (Path(CONF_DIR) / key).is_dir() and value and "," not in value:
            if value not in available(key):
                raise ValueError(
                    f"unknown {key} {value!r}; available: {', '.join(available(key))}."
                )
