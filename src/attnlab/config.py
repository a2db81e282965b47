"""Config helpers: compose ``conf/`` with Hydra, list the registry, register resolvers.

The conf folder is the registry (DESIGN.md, convention 3): the variants are the
files in ``conf/attention``, the tasks those in ``conf/task``, and so on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from attnlab.paths import CONF_DIR, default_cache_dir, default_data_dir


def register_resolvers() -> None:
    """Register ``${attnlab_data_dir:}`` and ``${attnlab_cache_dir:}`` (idempotent)."""
    for name, fn in (
        ("attnlab_data_dir", default_data_dir),
        ("attnlab_cache_dir", default_cache_dir),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def available(group: str) -> list[str]:
    """Names of the configs in ``conf/<group>`` (e.g. the attention variants)."""
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides (outside a Hydra app).

    Raises:
        ValueError: an override names an unknown option of a group; the message
            lists the available ones.
    """
    register_resolvers()
    for ov in overrides:
        key, _, value = ov.partition("=")
        key = key.lstrip("+~")
        if (Path(CONF_DIR) / key).is_dir() and value and value not in available(key):
            raise ValueError(f"unknown {key} {value!r}; available: {', '.join(available(key))}.")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
