"""Config checks that run before anything is built or read (DESIGN.md: fail at config time)."""

from __future__ import annotations

from omegaconf import DictConfig

from attnlab.errors import NONFINITE_MODES


def check_config(cfg: DictConfig) -> None:
    """Validate what can be checked before anything is built or read: ``optim.*``, ``nonfinite``,
    ``nonfinite_max_skipped``, ``checkpoint_every_n_steps``.

    Raises:
        ValueError: naming the key, the bad value and the valid choices.
    """
    from omegaconf import OmegaConf

    from attnlab.optim import check_optim

    optim = OmegaConf.to_container(cfg.get("optim", {}), resolve=True)
    target = optim.pop("_target_", "attnlab.optim.build_optimizer")
    optim.pop("_partial_", None)
    if target == "attnlab.optim.build_optimizer":  # another optimiser checks its own settings
        check_optim(optim)
    frac = cfg.get("nonfinite_max_skipped", 0.05)
    if isinstance(frac, bool) or not isinstance(frac, int | float) or not 0 <= frac <= 1:
        raise ValueError(f"nonfinite_max_skipped={frac!r} must be a fraction in [0, 1].")
    mode = cfg.get("nonfinite", "stop")
    if mode not in NONFINITE_MODES:
        raise ValueError(f"nonfinite={mode!r} is not one of {list(NONFINITE_MODES)}.")
    every = cfg.get("checkpoint_every_n_steps")
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ValueError(
            f"checkpoint_every_n_steps={every!r} must be a positive integer, or null to save "
            "only at validation."
        )
