"""Where attnlab looks for data, caches and configs.

The data directory is resolved in this order:

1. the ``ATTNLAB_DATA_DIR`` environment variable, if set;
2. ``../shared/data`` next to the repository checkout (the layout of the
   development machines), or ``../shared/data`` relative to the current directory;
3. ``None`` -- loaders then fall back to their online source (the Hugging Face
   hub id for IMDb, the official URL for enwik8).

Configs read it through the ``${attnlab_data_dir:}`` OmegaConf resolver, and a
user can always override ``paths.data_dir=/some/dir`` on the command line.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA_DIR = "ATTNLAB_DATA_DIR"
ENV_CACHE_DIR = "ATTNLAB_CACHE_DIR"

PACKAGE_DIR = Path(__file__).resolve().parent
#: Repository root for an editable / source install (``src/attnlab`` -> repo).
REPO_ROOT = PACKAGE_DIR.parents[1]
CONF_DIR = REPO_ROOT / "conf" if (REPO_ROOT / "conf").is_dir() else PACKAGE_DIR / "conf"


def default_data_dir() -> str | None:
    """Return the data directory to use by default, or ``None`` if none exists."""
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return str(Path(env).expanduser().resolve())
    for cand in (REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return str(cand.resolve())
    return None


def default_cache_dir() -> str:
    """Cache for trained tokenizers etc.: ``$ATTNLAB_CACHE_DIR`` or ``~/.cache/attnlab``."""
    env = os.environ.get(ENV_CACHE_DIR)
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "attnlab"
    return str(base.resolve())
