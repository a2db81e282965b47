"""``attnlab report PATH... [--out DIR]``: tables and plots from run directories, offline.

A run directory is one that ``attnlab train`` wrote: ``config.yaml`` (resolved config),
``metrics.csv`` (Lightning's CSV logger) and ``summary.json``. PATHs may be run dirs or any
folder above them (``multirun/...``); they are searched recursively.

Grouping. Completed runs are split into sections by (study, task). Within a section, a run's
configuration is its ``config.yaml`` flattened to dotted keys (``optim.lr``, ``model.n_heads``;
lists are values), less the keys in :data:`IGNORED_KEYS` and :data:`IGNORED_NAMES` (the seed,
paths, logging and other settings that do not change the experiment), plus the Hydra choice
names from ``summary.json`` as the keys ``attention`` and ``model`` (:data:`CHOICE_KEYS`). Every
key whose value is not the same in all the section's runs becomes a column, and a row is one
combination of their values: a row only aggregates runs that differ in nothing but the seed (and
ignored keys), so different learning rates, precisions, widths... are never averaged. When a
choice key varies, the keys under it whose values follow from the choice (``attention.head_dim``
is null for softmax and 32 for fixed_head) are not shown as columns of their own. A row's seeds
are aggregated as mean ± sample standard deviation (ddof=1; "±" is left out for a single seed).
The same configuration and seed in more than one run dir (a rerun) is flagged in the seeds cell,
e.g. ``1 (seed 0 ×2)``: such runs are averaged within their seed first, so a seed counts once.
Above each table, a short list names the varying keys, some settings all runs share
(:data:`SHARED_SHOWN`) and any duplicate seeds with their run dirs. Besides the varying keys,
the table shows the heads and head size as built (``summary.json``), for information only.
A run whose summary has another status (``failed``, ``interrupted``), that has no summary.json,
or (completed) no config.yaml to tell its configuration, is listed under "Failed or unfinished
runs" with its status and error.

Writes ``report.md`` and PNG plots into ``--out`` (default: the first PATH) and prints the
markdown. Plots: validation metric against step and against tokens seen (mean over seeds, one
line per row, labelled by the varying keys' values) and, when ``model.n_heads`` varies, best
validation and test metric against ``n_heads`` with one line per combination of the other
varying keys and ±1 std error bars.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

#: Config keys that are not configuration of the experiment: a key is ignored when it is one of
#: these or lies under one (``paths`` covers ``paths.run_dir``). Locations (``paths.*``, the
#: tokenizer cache), bookkeeping (``name``, ``tags``, ``resume``, ``checkpoint_every_n_steps``),
#: logging and progress display (``logger.*``, ``trainer.log_every_n_steps``,
#: ``trainer.enable_progress_bar``), parallelism that does not change the results (``threads``,
#: ``task.data.num_workers``) and Hydra's own settings. Runs differing only in these are
#: aggregated in one row.
IGNORED_KEYS: tuple[str, ...] = (
    "paths",
    "name",
    "resume",
    "logger",
    "tags",
    "threads",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "task.data.num_workers",
    "task.data.cache_dir",
    "checkpoint_every_n_steps",
    "hydra",
)
#: Key names ignored at any depth: the seed is what a row aggregates over (``task.data.seed``
#: is an interpolation of ``seed``).
IGNORED_NAMES: tuple[str, ...] = ("seed",)
#: Hydra config groups whose choice name (``summary.json``) is a pseudo-key of the configuration.
CHOICE_KEYS: tuple[str, ...] = ("attention", "model")
#: Settings named in a section's "shared" line when all its runs have the same value.
SHARED_SHOWN: tuple[str, ...] = (
    "attention",
    "model",
    "model.d_model",
    "model.n_layers",
    "model.n_heads",
    "task.max_len",
    "optim.lr",
    "trainer.precision",
    "trainer.max_epochs",
    "trainer.max_steps",
)
UNITS = {"acc": "accuracy", "bpb": "bits per byte"}
HEADS_KEY = "model.n_heads"
MAX_ERROR_CHARS = 500


class _Absent:
    """The value of a key a run's config does not have (e.g. ``attention.chunk_size``)."""

    def __repr__(self) -> str:
        return "—"


ABSENT = _Absent()


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run dirs (holding ``config.yaml`` or ``summary.json``) under ``paths``, sorted.

    Raises:
        FileNotFoundError: a PATH does not exist.
    """
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"report: {p} does not exist; pass run or multirun dirs")
        for name in ("config.yaml", "summary.json"):
            for f in p.rglob(name):
                if ".hydra" not in f.parts and "wandb" not in f.parts:
                    found.add(f.parent)
    return sorted(found)


def _freeze(value: Any) -> Any:
    """A hashable, comparable form of a config value: lists become tuples."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``; lists (as tuples) are values."""
    flat: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            flat.update(flatten(v, key + "."))
        else:
            flat[key] = _freeze(v)
    return flat


def is_ignored(key: str) -> bool:
    """Whether a dotted config key is left out of the configuration (:data:`IGNORED_KEYS`)."""
    if key.rsplit(".", 1)[-1] in IGNORED_NAMES:
        return True
    return any(key == p or key.startswith(p + ".") for p in IGNORED_KEYS)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    cfg = OmegaConf.load(path)
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that needs Hydra (a hand-written file): keep the text
        container = OmegaConf.to_container(cfg, resolve=False)
    return container if isinstance(container, dict) else {}


def load_run(run_dir: Path) -> dict[str, Any]:
    """One run as a record: study, task, seed, ``config`` (the dotted keys that identify its
    configuration, ignored keys left out, the choice names added), status, metrics, curve."""
    run_dir = Path(run_dir)
    cfg = _read_config(run_dir / "config.yaml")
    summ_path = run_dir / "summary.json"
    try:
        summary = json.loads(summ_path.read_text()) if summ_path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # cut short while being written
        summary = {"status": "unreadable", "error": f"summary.json: {err}"}
    summary = summary if isinstance(summary, dict) else {"status": "unreadable"}
    task = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
    config = {k: v for k, v in flatten(cfg).items() if not is_ignored(k)}
    for choice in CHOICE_KEYS:
        value = summary.get(choice)
        if value is None and isinstance(cfg.get(choice), dict) and choice == "attention":
            value = str(cfg[choice].get("_target_", "?")).rsplit(".", 1)[
                -1
            ]  # as config.group_choice
        config[choice] = ABSENT if value is None else value
    rec: dict[str, Any] = {
        "run_dir": str(run_dir),
        "study": str(cfg.get("study", "default")),
        "task": str(summary.get("task", task.get("name", "?"))),
        "seed": summary.get("seed", cfg.get("seed")),
        "config": config,
        "n_heads": summary.get("n_heads", config.get(HEADS_KEY)),
        "head_dim": summary.get("head_dim"),
        "monitor": str(summary.get("monitor", task.get("monitor", "val/?"))),
        "monitor_mode": str(task.get("monitor_mode", "max")),
    }
    status = str(summary.get("status") or "unknown")
    if not summary:
        rec.update(status="unknown", error="no summary.json (crashed, killed or still running)")
        return rec
    if status != "completed":
        rec.update(status=status, error=str(summary.get("error") or status))
        return rec
    if not cfg:
        rec.update(
            status="completed (no config.yaml)",
            error="no config.yaml: its configuration is unknown, so it is not aggregated",
        )
        return rec
    metric = rec["monitor"].split("/", 1)[-1]
    rec.update(
        status="completed",
        metric=metric,
        best_val=summary.get("best_val", math.nan),
        test=(summary.get("test") or {}).get(f"test/{metric}", math.nan),
        params=(summary.get("params") or {}).get("total", math.nan),
        tokens_per_sec=summary.get("tokens_per_sec", math.nan),
        peak_mem_mb=summary.get("peak_mem_mb", math.nan),
        wall_time_s=summary.get("wall_time_s", math.nan),
        curve=_val_curve(run_dir / "metrics.csv", rec["monitor"]),
    )
    return rec


def _val_curve(path: Path, monitor: str) -> pd.DataFrame:
    """Rows of metrics.csv holding ``monitor``: columns step, tokens, value."""
    empty = pd.DataFrame(columns=["step", "tokens", "value"])
    if not path.exists():
        return empty
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):  # empty or cut short
        return empty
    if monitor not in df or "step" not in df:
        return empty
    df = df[df[monitor].notna()]
    tokens = df["val/tokens_seen"] if "val/tokens_seen" in df else np.nan
    return pd.DataFrame({"step": df["step"], "tokens": tokens, "value": df[monitor]})


@dataclass
class Section:
    """The completed runs of one (study, task), grouped into rows."""

    study: str
    task: str
    runs: list[dict[str, Any]]
    keys: list[str]  # the varying config keys: the table's first columns, in order
    rows: dict[tuple, list[dict[str, Any]]]  # values of ``keys`` -> the row's runs
    shared: dict[str, Any]  # keys with one value over all the runs
    follow: dict[str, list[str]] = field(default_factory=dict)  # choice -> keys it determines

    @property
    def title(self) -> str:
        return f"{self.study} / {self.task}"

    def sorted_rows(self) -> list[tuple[tuple, list[dict[str, Any]]]]:
        return sorted(self.rows.items(), key=lambda kv: [_sort_value(v) for v in kv[0]])


def _sort_value(v: Any) -> tuple:
    """Values in natural order: absent, null, booleans, numbers as numbers (1, 4, 16), text."""
    if v is ABSENT:
        return (0, 0, "")
    if v is None:
        return (1, 0, "")
    if isinstance(v, bool):
        return (2, int(v), "")
    if isinstance(v, int | float):
        return (3, v, "")
    return (4, 0, str(v))


def build_section(study: str, task: str, runs: list[dict[str, Any]]) -> Section:
    """Group completed runs: one row per combination of the keys that vary among them."""
    all_keys = sorted({k for r in runs for k in r["config"]})
    values = {k: {r["config"].get(k, ABSENT) for r in runs} for k in all_keys}
    varying = [k for k in all_keys if len(values[k]) > 1]
    shared = {k: next(iter(values[k])) for k in all_keys if len(values[k]) == 1}
    follow: dict[str, list[str]] = {}
    for choice in CHOICE_KEYS:
        if choice not in varying:
            continue
        for key in [k for k in varying if k.startswith(choice + ".")]:
            per_choice: dict[Any, set] = defaultdict(set)
            for r in runs:
                per_choice[r["config"].get(choice, ABSENT)].add(r["config"].get(key, ABSENT))
            if all(len(s) == 1 for s in per_choice.values()):
                follow.setdefault(choice, []).append(key)
    dropped = {k for ks in follow.values() for k in ks}
    choices = [k for k in CHOICE_KEYS if k in varying]
    keys = choices + [k for k in varying if k not in dropped and k not in choices]
    rows: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        rows[tuple(r["config"].get(k, ABSENT) for k in keys)].append(r)
    return Section(study, task, runs, keys, dict(rows), shared, follow)


def group_runs(runs: list[dict[str, Any]]) -> list[Section]:
    """The completed runs as one :class:`Section` per (study, task), sorted."""
    by_section: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        if r["status"] == "completed":
            by_section[(r["study"], r["task"])].append(r)
    return [build_section(s, t, rs) for (s, t), rs in sorted(by_section.items())]


def _fmt(v: Any) -> str:
    """A config value as in YAML: null, true, [0.9, 0.95]; floats in their shortest exact form."""
    if v is ABSENT:
        return "—"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return repr(v) if isinstance(v, float) else str(v)


def _cell(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|")


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _by_seed(rs: list[dict[str, Any]]) -> dict[Any, list[dict[str, Any]]]:
    seeds: dict[Any, list[dict]] = defaultdict(list)
    for r in rs:
        seeds[r["seed"]].append(r)
    return dict(sorted(seeds.items(), key=lambda kv: _sort_value(kv[0])))


def _seed_values(rs: list[dict[str, Any]], name: str) -> list[float]:
    """One value per seed: runs repeating a seed are averaged first, so a seed counts once."""
    out = []
    for group in _by_seed(rs).values():
        v = [float(r[name]) for r in group if _finite(r.get(name))]
        if v:
            out.append(float(np.mean(v)))
    return out


def _mean_std(values: Sequence[float], digits: int = 4) -> str:
    v = np.asarray([x for x in values if _finite(x)], dtype=float)
    if len(v) == 0:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _duplicates(rs: list[dict[str, Any]]) -> dict[Any, int]:
    """Seeds that occur in more than one run of a row, with their counts."""
    return {s: n for s, n in Counter(r["seed"] for r in rs).items() if n > 1}


def seeds_cell(rs: list[dict[str, Any]]) -> str:
    """The number of distinct seeds, with any repeated seed flagged: ``1 (seed 0 ×2)``."""
    dup = _duplicates(rs)
    text = str(len(_by_seed(rs)))
    if dup:
        flags = ", ".join(
            f"seed {_fmt(s)} ×{n}"
            for s, n in sorted(dup.items(), key=lambda kv: _sort_value(kv[0]))
        )
        text += f" ({flags})"
    return text


def _as_built(section: Section) -> list[str]:
    """Informative columns from summary.json (display only): the heads and head size built."""
    cols = ["head_dim"]
    if HEADS_KEY not in section.keys:
        cols.insert(0, "n_heads")
    return cols


def _one(rs: list[dict[str, Any]], name: str) -> str:
    vals = sorted({_freeze(r.get(name)) for r in rs}, key=_sort_value)
    return "/".join(_fmt(v) for v in vals)


def first_step(curve: pd.DataFrame | None, reach: float, higher: bool = True) -> float:
    """The first validated step whose value reaches ``reach`` (``>=``, or ``<=`` when lower is
    better); NaN when no validation did."""
    if curve is None or curve.empty:
        return math.nan
    hit = curve[curve["value"] >= reach] if higher else curve[curve["value"] <= reach]
    return float(hit["step"].min()) if len(hit) else math.nan


def _reach_cell(rs: list[dict[str, Any]], reach: float) -> str:
    """``first step`` per seed (``-`` where a seed never reached it), e.g. ``750, -``."""
    cells = []
    for r in sorted(rs, key=lambda r: _sort_value(r.get("seed"))):
        higher = r.get("monitor_mode", "max") != "min"
        step = first_step(r.get("curve"), reach, higher)
        cells.append("-" if math.isnan(step) else f"{int(step) + 1:,}")  # steps done
    return ", ".join(cells)


def table(section: Section, reach: float | None = None) -> str:
    """Markdown table, one row per configuration (seeds aggregated). With ``reach``, a column
    gives the number of steps after which validation first reached it, per seed."""
    metrics = sorted({r["metric"] for r in section.runs})
    metric = metrics[0] if len(metrics) == 1 else "(task.monitor)"
    built = _as_built(section)
    head = [*section.keys, *built, "seeds", "params", f"best val/{metric}", f"test/{metric}"]
    if reach is not None:
        head.append(f"steps to val/{metric} {reach:g}")
    head += ["train tokens/s", "peak mem (MiB)", "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, rs in section.sorted_rows():
        params = [r["params"] for r in rs if _finite(r["params"])]
        cells = [_fmt(v) for v in key] + [_one(rs, c) for c in built]
        cells += [seeds_cell(rs), f"{int(np.mean(params)):,}" if params else "n/a"]
        cells += [_mean_std(_seed_values(rs, k)) for k in ("best_val", "test")]
        if reach is not None:
            cells.append(_reach_cell(rs, reach))
        cells += [_mean_std(_seed_values(rs, k), 0) for k in ("tokens_per_sec", "peak_mem_mb")]
        cells += [_mean_std(_seed_values(rs, "wall_time_s"), 0)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def describe(section: Section) -> str:
    """The list above a section's table: what varies between its rows, what all runs share and
    any duplicate seeds."""
    n_rows = len(section.rows)
    rows = f"{n_rows} configuration{'s' if n_rows != 1 else ''}"
    if section.keys:
        varying = ", ".join(f"`{k}`" for k in section.keys)
        first = f"{len(section.runs)} runs, {rows}; rows differ in {varying}"
    else:
        first = f"{len(section.runs)} runs, {rows}: they differ in nothing but the seed"
    follows = [f"`{k}` follows `{choice}`" for choice, ks in section.follow.items() for k in ks]
    if follows:
        first += f" ({'; '.join(follows)})"
    lines = [f"- {first}; a row aggregates its seeds."]
    shared = [f"{k}={_fmt(section.shared[k])}" for k in SHARED_SHOWN if k in section.shared]
    if shared:
        lines.append(f"- Shared by all runs: {', '.join(shared)}.")
    dups = [
        (s, [r["run_dir"] for r in rs if r["seed"] == s])
        for _, rs in section.sorted_rows()
        for s in _duplicates(rs)
    ]
    if dups:
        where = "; ".join(f"seed {_fmt(s)} in {', '.join(ds)}" for s, ds in dups)
        lines.append(
            "- **Duplicate seeds** (the same configuration and seed in more than one run dir; "
            f"averaged within the seed, so ± is over distinct seeds): {where}."
        )
    return "\n".join(lines)


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """Legend names: the last part of a dotted key, the whole key where that is ambiguous."""
    last = Counter(k.rsplit(".", 1)[-1] for k in keys)
    return {k: k.rsplit(".", 1)[-1] if last[k.rsplit(".", 1)[-1]] == 1 else k for k in keys}


def _label(keys: Sequence[str], values: Sequence[Any], default: str = "all runs") -> str:
    """``softmax lr=0.001``: a choice by its name, another key as name=value."""
    short = _short_names(keys)
    parts = [
        _fmt(v) if k in CHOICE_KEYS else f"{short[k]}={_fmt(v)}"
        for k, v in zip(keys, values, strict=True)
    ]
    return " ".join(parts) or default


def _mean_curve(rs: list[dict[str, Any]]) -> pd.DataFrame | None:
    """The validation curve averaged within each seed, then over seeds."""
    per_seed = []
    for group in _by_seed(rs).values():
        curves = [r["curve"].astype(float) for r in group if len(r["curve"])]
        if curves:
            per_seed.append(pd.concat(curves).groupby("step", as_index=False).mean())
    if not per_seed:
        return None
    return pd.concat(per_seed).groupby("step", as_index=False).mean()


def plot_curves(section: Section, out: Path) -> Path:
    """Validation metric against step and tokens seen; one line per row, mean over seeds."""
    import matplotlib.pyplot as plt

    metric = section.runs[0]["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, rs in section.sorted_rows():
        curve = _mean_curve(rs)
        if curve is None:
            continue
        for ax, x in zip(axes, ("step", "tokens"), strict=True):
            ax.plot(curve[x], curve["value"], marker="o", ms=3, label=_label(section.keys, key))
    for ax, xlabel in zip(axes, ("optimizer step", "training tokens seen"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"val/{metric} ({UNITS.get(metric, metric)})")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{section.title}: validation {metric} (mean over seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_heads(section: Section, out: Path) -> Path | None:
    """Best val and test metric against ``model.n_heads`` (when it varies), one line per
    combination of the other varying keys, ±1 std error bars over seeds."""
    import matplotlib.pyplot as plt

    if HEADS_KEY not in section.keys:
        return None
    i = section.keys.index(HEADS_KEY)
    others = [k for k in section.keys if k != HEADS_KEY]
    lines: dict[tuple, list[tuple[float, list[dict]]]] = defaultdict(list)
    for key, rs in section.rows.items():
        if _finite(key[i]):
            lines[key[:i] + key[i + 1 :]].append((key[i], rs))
    if len({h for items in lines.values() for h, _ in items}) < 2:
        return None
    metric = section.runs[0]["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for rest, items in sorted(lines.items(), key=lambda kv: [_sort_value(v) for v in kv[0]]):
        items.sort(key=lambda t: t[0])
        heads = [h for h, _ in items]
        for ax, name in zip(axes, ("best_val", "test"), strict=True):
            vals = [np.array(_seed_values(rs, name), dtype=float) for _, rs in items]
            mean = [v.mean() if len(v) else np.nan for v in vals]
            std = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]
            ax.errorbar(heads, mean, yerr=std, marker="o", capsize=3,
                        label=_label(others, rest))  # fmt: skip
    for ax, name in zip(axes, (f"best val/{metric}", f"test/{metric}"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of heads model.n_heads (log2 scale)")
        ax.set_ylabel(f"{name} ({UNITS.get(metric, metric)})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{section.title}: metric against heads (mean ± 1 std over seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def failed_table(runs: list[dict[str, Any]]) -> str:
    """The "Failed or unfinished runs" section ("" when every run completed)."""
    failed = [r for r in runs if r["status"] != "completed"]
    if not failed:
        return ""
    lines = [
        "## Failed or unfinished runs\n",
        "| run dir | status | error |",
        "| --- | --- | --- |",
    ]
    for r in failed:
        error = " ".join(str(r["error"]).split())
        if len(error) > MAX_ERROR_CHARS:
            error = error[: MAX_ERROR_CHARS - 1] + "…"
        lines.append(f"| {_cell(r['run_dir'])} | {_cell(r['status'])} | {_cell(error)} |")
    return "\n".join(lines) + "\n"


def report(
    paths: Sequence[str | Path], out: str | Path | None = None, reach: float | None = None
) -> str:
    """Build the report for ``paths``; write report.md and PNGs into ``out``; return the text.
    ``reach``: add a column with the step at which validation first reached this value.

    Raises:
        FileNotFoundError: a PATH does not exist, or no run directory was found under them.
    """
    import matplotlib

    matplotlib.use("Agg")
    dirs = find_run_dirs(paths)
    if not dirs:
        raise FileNotFoundError(f"report: no run dirs (config.yaml/summary.json) under {paths}")
    out_dir = Path(out if out is not None else paths[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in dirs]
    parts = [f"# attnlab report\n\n{len(runs)} runs from: {', '.join(map(str, paths))}\n"]
    for section in group_runs(runs):
        stem = f"{section.study}_{section.task}".replace("/", "_")
        parts.append(f"## {section.title}\n\n{describe(section)}\n\n{table(section, reach)}\n")
        png = plot_curves(section, out_dir / f"{stem}_val_curves.png")
        parts.append(f"![validation curves]({png.name})\n")
        heads = plot_heads(section, out_dir / f"{stem}_vs_heads.png")
        if heads is not None:
            parts.append(f"![metric against heads]({heads.name})\n")
    failed = failed_table(runs)
    if failed:
        parts.append(failed)
    text = "\n".join(parts)
    (out_dir / "report.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    """``attnlab report PATH... [--out DIR]``."""
    ap = argparse.ArgumentParser(prog="attnlab report", description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", help="run dirs or multirun dirs (searched recursively)")
    ap.add_argument("--out", default=None, help="where report.md and PNGs go (default: PATH 1)")
    ap.add_argument(
        "--reach",
        type=float,
        default=None,
        help="add a column: steps until validation first reached this value of the monitored "
        "metric (e.g. 0.9 for accuracy; for bits per byte, the first value at or below it)",
    )
    args = ap.parse_args(argv)
    try:
        print(report(args.paths, args.out, args.reach))
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from err
