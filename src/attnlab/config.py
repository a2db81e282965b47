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
from omegaconf import DictConfig, OmegaConf, open_dict

from attnlab.paths import CONF_DIR, default_cache_dir, default_data_dir


def _subdir(base: str | None, sub: str) -> str | None:
    return None if base in (None, "", "None") else str(Path(base) / sub)


def _wandb_offline() -> bool:
    return os.environ.get("WANDB_MODE", "offline") != "online"


RESOLVERS = {
    "attnlab_data_dir": default_data_dir,  # ${attnlab_data_dir:}
    "attnlab_cache_dir": default_cache_dir,  # ${attnlab_cache_dir:}
    "attnlab_subdir": _subdir,  # ${attnlab_subdir:${paths.data_dir},imdb} (None stays None)
    "attnlab_wandb_offline": _wandb_offline,  # True unless WANDB_MODE=online
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
