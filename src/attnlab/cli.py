"""``attnlab <command> [hydra overrides]``: one console script, thin commands.

Each command composes a config from ``conf/``, instantiates, and calls one
function (DESIGN.md, convention 11). ``attnlab <command> --help`` shows the
command's config and groups (Hydra's help).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from attnlab.config import check_group_overrides, register_resolvers
from attnlab.paths import CONF_DIR

USAGE = """usage: attnlab <command> [key=value ...] [-m] [--help]

commands:
  train      fit a model, test it, print a summary   (conf/train.yaml)
  evaluate   score a checkpoint on a split           (conf/evaluate.yaml: ckpt=PATH split=test)
  generate   sample bytes from an enwik8 model       (conf/generate.yaml: ckpt=PATH prompt=...)

examples:
  attnlab train                                   # IMDb, softmax attention, modern block, CPU
  attnlab train task=enwik8 attention=linear model.positions=learned
  attnlab train -m model.n_heads=1,2,4,8 seed=0,1,2
  attnlab evaluate ckpt=outputs/.../checkpoints/best.ckpt split=test
  attnlab generate ckpt=outputs/.../checkpoints/best.ckpt prompt="The " temperature=0.5

Run `attnlab <command> --help` for its options and config groups.
"""


def _hydra_command(config_name: str, fn: Callable[[DictConfig], object]) -> Callable[[], None]:
    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)
    def _run(cfg: DictConfig) -> None:
        fn(cfg)

    return _run


def _train(cfg: DictConfig) -> object:
    from attnlab.train import train

    return train(cfg)


def _evaluate(cfg: DictConfig) -> object:
    from attnlab.evaluate import evaluate

    return evaluate(cfg)


def _generate(cfg: DictConfig) -> object:
    from attnlab.evaluate import generate

    return generate(cfg)


COMMANDS: dict[str, tuple[str, Callable[[DictConfig], object]]] = {
    "train": ("train", _train),
    "evaluate": ("evaluate", _evaluate),
    "generate": ("generate", _generate),
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``attnlab`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        sys.exit(
            f"attnlab: unknown command {cmd!r}; choose one of: {', '.join(COMMANDS)}.\n\n{USAGE}"
        )
    register_resolvers()
    try:
        check_group_overrides([a for a in rest if not a.startswith("-")])
    except ValueError as err:
        sys.exit(f"attnlab {cmd}: {err}")
    config_name, fn = COMMANDS[cmd]
    sys.argv = [f"attnlab {cmd}", *rest]
    _hydra_command(config_name, fn)()


if __name__ == "__main__":
    main()
