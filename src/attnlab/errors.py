"""The errors attnlab raises for a user to act on, and how a command prints them.

- :class:`NonFiniteError`, :class:`DiskFullError` and the built-in ``ValueError`` /
  ``FileNotFoundError`` are :data:`USER_ERRORS`: ``attnlab <command>`` prints their message as one
  line (:func:`user_message`; :mod:`attnlab.commands` applies it).
"""

from __future__ import annotations

NONFINITE_MODES = ("stop", "skip")
NONFINITE_FIXES = (
    "lower optim.lr, use trainer.precision=bf16-mixed instead of 16-mixed, set "
    "trainer.gradient_clip_val (e.g. 1.0), or pass nonfinite=skip to skip such steps"
)


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient (``nonfinite: stop``)."""


class DiskFullError(OSError):
    """A checkpoint could not be written: no space left on the device."""


#: Errors whose message is the whole story: ``attnlab <command>`` prints them as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    NonFiniteError,
    DiskFullError,
)
#: Free space (bytes) under which a failed write is taken for a full disk.
LOW_SPACE = 256 * 2**20


def user_message(err: BaseException) -> str | None:
    """The one-line message for a known user error, ``None`` for anything else (a bug)."""
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", None) or str(err).split(":", 1)[-1].strip().split()[0]
        hint = " (e.g. ckpt=<run dir>/checkpoints/best.ckpt)" if key == "ckpt" else ""
        return f"{key} is required: pass {key}=...{hint}"
    if isinstance(err, USER_ERRORS):
        return " ".join(str(err).split())  # one line
    return None
