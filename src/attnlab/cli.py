"""``attnlab <command> [hydra overrides]``: one console script, thin commands.

Each command composes a config from ``conf/``, instantiates, and calls one
function (DESIGN.md, convention 11). ``attnlab <command> --help`` shows the
command's config and groups (Hydra's help).
"""

from __future__ import annotations

import os
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
  bench      attention/decoding/training speed+memory (conf/bench.yaml: bench.quick=true)
  analyze    head importance by ablation, attention maps (conf/analyze.yaml: ckpt=PATH)
  report     tables + plots from run/multirun dirs   (plain paths: attnlab report DIR... [--out D])

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
        from attnlab.commands import run_command

        run_command(config_name, fn, cfg)  # one-line errors; failed sweep jobs don't stop -m

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


def _bench(cfg: DictConfig) -> object:
    from attnlab.bench import run_bench

    return run_bench(cfg)


def _analyze(cfg: DictConfig) -> object:
    from attnlab.analyze import analyze

    return analyze(cfg)


def check_composes(config_name: str, args: list[str]) -> None:
    """Compose the config once with ``args`` (single runs; sweeps are expanded by Hydra) so that
    an override Hydra rejects (an unknown key, a bad value) is a one-line error.

    Raises:
        ValueError: Hydra's message, on one line.
    """
    if "-m" in args or "--multirun" in args or any(a.startswith("-") for a in args):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            compose(config_name, overrides=[a for a in args if not a.startswith("hydra.")])
    except (HydraException, OmegaConfBaseException) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        lines = [ln for ln in lines if not ln.startswith(("full_key:", "object_type", "Set the"))]
        raise ValueError("; ".join(ln.rstrip(".") for ln in lines) or type(err).__name__) from err


def _resume_in_place(args: list[str]) -> list[str]:
    """``resume=<run dir>`` continues that run in its own directory: add ``hydra.run.dir=<it>``
    (single runs only, and only when the user did not set ``hydra.run.dir``)."""
    if "-m" in args or "--multirun" in args or any(a.startswith("hydra.run.dir=") for a in args):
        return args
    for a in args:
        if a.startswith("resume="):
            value = a.split("=", 1)[1].strip("'\"")
            if value and os.path.isdir(value):
                return [*args, f"hydra.run.dir={value}"]
    return args


COMMANDS: dict[str, tuple[str, Callable[[DictConfig], object]]] = {
    "train": ("train", _train),
    "evaluate": ("evaluate", _evaluate),
    "generate": ("generate", _generate),
    "bench": ("bench", _bench),
    "analyze": ("analyze", _analyze),
    "report": ("", _analyze),  # plain argparse, dispatched in main() before Hydra
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``attnlab`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if argv[0] not in COMMANDS and "LOCAL_RANK" in os.environ and "ATTNLAB_COMMAND" in os.environ:
        # a DDP worker that Lightning started by re-running our argv, which lacks the command
        argv.insert(0, os.environ["ATTNLAB_COMMAND"])
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        sys.exit(
            f"attnlab: unknown command {cmd!r}; choose one of: {', '.join(COMMANDS)}.\n\n{USAGE}"
        )
    if cmd == "report":  # takes paths, not Hydra overrides
        from attnlab.report import main as report_main

        report_main(rest)
        return
    register_resolvers()
    try:
        check_group_overrides([a for a in rest if not a.startswith("-")])
        check_composes(COMMANDS[cmd][0], rest)
    except ValueError as err:
        sys.exit(f"attnlab {cmd}: {err}")
    if cmd == "train":
        rest = _resume_in_place(rest)
    config_name, fn = COMMANDS[cmd]
    os.environ["ATTNLAB_COMMAND"] = cmd  # inherited by DDP workers (see above)
    sys.argv = [f"attnlab {cmd}", *rest]
    _hydra_command(config_name, fn)()


if __name__ == "__main__":
    main()
