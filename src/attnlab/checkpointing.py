"""Checkpoint files: written atomically, and compared with the model built from their config.

:class:`AtomicCheckpointIO`: checkpoints are written to a temporary file in the same directory and
moved into place with ``os.replace``, so a crash mid-save never leaves a truncated ``last.ckpt``;
a full disk is reported as :class:`~attnlab.errors.DiskFullError` with the previous checkpoint
intact. :func:`state_dict_mismatch` says how a checkpoint's weights differ from a model.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from attnlab.errors import LOW_SPACE, DiskFullError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a partial file: write ``.<name>.tmp-*`` beside the
    target, flush and fsync, then ``os.replace`` (atomic on POSIX). On failure the temporary
    file is removed and the previous checkpoint is untouched."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, OSError | RuntimeError) and _disk_full(err, path.parent):
                free = shutil.disk_usage(path.parent).free / 2**20
                raise DiskFullError(
                    errno.ENOSPC,
                    f"no space left on device writing checkpoint {path} ({free:.0f} MiB free in "
                    f"{path.parent}); free some space (or set hydra.run.dir on another disk) and "
                    "resume: the previous checkpoint is intact",
                ) from err
            raise


def _disk_full(err: BaseException, directory: Path) -> bool:
    """Whether a failed write is explained by a full disk (torch reports ENOSPC as a
    RuntimeError such as "inline_container.cc ... unexpected pos")."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(directory).free < LOW_SPACE
    except OSError:
        return False


def state_dict_mismatch(model: dict[str, torch.Tensor], ckpt: dict[str, torch.Tensor]) -> str:
    """Describe how checkpoint weights ``ckpt`` differ from the ``model`` built from the config:
    parameters missing, unexpected, or with other shapes (first few of each)."""
    shapes = [
        f"{k} {tuple(ckpt[k].shape)} in the checkpoint vs {tuple(v.shape)} in the model"
        for k, v in model.items()
        if k in ckpt and tuple(ckpt[k].shape) != tuple(v.shape)
    ]
    parts = [
        ("different shapes", shapes),
        ("missing from the checkpoint", [k for k in model if k not in ckpt]),
        ("unexpected in the checkpoint", [k for k in ckpt if k not in model]),
    ]
    found = "; ".join(f"{what}: {', '.join(v[:5])}" for what, v in parts if v)
    return (
        f"the checkpoint does not match the model built from its config ({found}). Use the "
        "config the checkpoint was trained with (do not override model.*, attention.* or "
        "task.max_len), or retrain."
    )
