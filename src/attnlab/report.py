"""``attnlab report PATH... [--out DIR]``: tables and plots from run directories, offline.

A run directory is one that ``attnlab train`` wrote: ``config.yaml`` (resolved config),
``metrics.csv`` (Lightning's CSV logger) and ``summary.json``. PATHs may be run dirs or any
folder above them (``multirun/...``); they are searched recursively. Runs are grouped by
(study, task); within a group a row is one configuration (attention variant, model, heads,
head size, width, depth, length) and its seeds are aggregated as mean ± sample standard
deviation (ddof=1; "±" is left out for a single seed). A run whose summary says
``status: failed``, or that has no summary.json, is listed with its error.

Writes ``report.md`` and PNG plots into ``--out`` (default: the first PATH) and prints the
markdown. Plots: validation metric against step and against tokens seen (mean over seeds, one
line per configuration) and, when the heads vary, best validation and test metric against
``n_heads`` with one line per variant and ±1 std error bars.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

CONFIG_KEYS = ("attention", "model", "n_heads", "head_dim", "d_model", "n_layers", "max_len")
UNITS = {"acc": "accuracy", "bpb": "bits per byte"}


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


def load_run(run_dir: Path) -> dict[str, Any]:
    """One run as a flat record: study, task, config keys, status, metrics, curves."""
    cfg = OmegaConf.load(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else {}
    cfg = OmegaConf.to_container(cfg) if cfg else {}
    summ_path = run_dir / "summary.json"
    summary = json.loads(summ_path.read_text()) if summ_path.exists() else {}
    task = cfg.get("task", {}) or {}
    model = cfg.get("model", {}) or {}
    name = str(cfg.get("name", run_dir.name))
    rec: dict[str, Any] = {
        "run_dir": str(run_dir),
        "study": cfg.get("study", "default"),
        "task": summary.get("task", task.get("name", "?")),
        "attention": summary.get("attention", name.split("-")[1] if "-" in name else "?"),
        "model": summary.get("model", "?"),
        "n_heads": summary.get("n_heads", model.get("n_heads")),
        "head_dim": summary.get("head_dim"),
        "d_model": summary.get("d_model", model.get("d_model")),
        "n_layers": summary.get("n_layers", model.get("n_layers")),
        "max_len": task.get("max_len"),
        "seed": summary.get("seed", cfg.get("seed")),
        "monitor": summary.get("monitor", task.get("monitor", "val/?")),
    }
    if not summary:
        rec.update(status="failed", error="no summary.json (crashed, killed or still running)")
        return rec
    if summary.get("status") != "completed":
        rec.update(status="failed", error=str(summary.get("error", summary.get("status"))))
        return rec
    metric = rec["monitor"].split("/", 1)[1]
    rec.update(
        status="completed",
        metric=metric,
        best_val=summary.get("best_val", math.nan),
        test=summary.get("test", {}).get(f"test/{metric}", math.nan),
        params=summary.get("params", {}).get("total", math.nan),
        tokens_per_sec=summary.get("tokens_per_sec", math.nan),
        peak_mem_mb=summary.get("peak_mem_mb", math.nan),
        wall_time_s=summary.get("wall_time_s", math.nan),
        curve=_val_curve(run_dir / "metrics.csv", rec["monitor"]),
    )
    return rec


def _val_curve(path: Path, monitor: str) -> pd.DataFrame:
    """Rows of metrics.csv holding ``monitor``: columns step, tokens, value."""
    if not path.exists():
        return pd.DataFrame(columns=["step", "tokens", "value"])
    df = pd.read_csv(path)
    if monitor not in df:
        return pd.DataFrame(columns=["step", "tokens", "value"])
    df = df[df[monitor].notna()]
    tokens = df["val/tokens_seen"] if "val/tokens_seen" in df else np.nan
    return pd.DataFrame({"step": df["step"], "tokens": tokens, "value": df[monitor]})


def _mean_std(values: Sequence[float], digits: int = 4) -> str:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _sort_key(kv: tuple) -> list:
    """Configs in natural order: numbers as numbers (1, 4, 16), the rest as text."""
    return [(0, x, "") if isinstance(x, int | float) else (1, 0, str(x)) for x in kv[0]]


def _label(key: tuple) -> str:
    c = dict(zip(CONFIG_KEYS, key, strict=True))
    return f"{c['attention']} h{c['n_heads']}×{c['head_dim']}"


def group_runs(runs: list[dict]) -> dict[tuple[str, str], dict[tuple, list[dict]]]:
    """``{(study, task): {config key: [completed runs (seeds)]}}``."""
    groups: dict[tuple[str, str], dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["status"] == "completed":
            groups[(r["study"], r["task"])][tuple(r[k] for k in CONFIG_KEYS)].append(r)
    return groups


def table(configs: dict[tuple, list[dict]]) -> str:
    """Markdown table, one row per configuration (seeds aggregated)."""
    metric = next(iter(configs.values()))[0]["metric"]
    head = [*CONFIG_KEYS, "seeds", "params", f"best val/{metric}", f"test/{metric}"]
    head += ["train tokens/s", "peak mem (MiB)", "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, rs in sorted(configs.items(), key=_sort_key):
        cells = [str(x) for x in key] + [
            str(len(rs)),
            f"{int(np.mean([r['params'] for r in rs])):,}",
        ]
        cells += [_mean_std([r["best_val"] for r in rs]), _mean_std([r["test"] for r in rs])]
        cells += [_mean_std([r[k] for r in rs], 0) for k in ("tokens_per_sec", "peak_mem_mb")]
        cells += [_mean_std([r["wall_time_s"] for r in rs], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(configs: dict[tuple, list[dict]], title: str, out: Path) -> Path:
    """Validation metric against step and tokens seen; one line per config, mean over seeds."""
    import matplotlib.pyplot as plt

    metric = next(iter(configs.values()))[0]["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, rs in sorted(configs.items(), key=_sort_key):
        curves = pd.concat([r["curve"] for r in rs]).groupby("step", as_index=False).mean()
        for ax, x in zip(axes, ("step", "tokens"), strict=True):
            ax.plot(curves[x], curves["value"], marker="o", ms=3, label=_label(key))
    for ax, xlabel in zip(axes, ("optimizer step", "training tokens seen"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"val/{metric} ({UNITS.get(metric, metric)})")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{title}: validation {metric} (mean over seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_heads(configs: dict[tuple, list[dict]], title: str, out: Path) -> Path | None:
    """Best val and test metric against n_heads, one line per variant, ±1 std error bars."""
    import matplotlib.pyplot as plt

    if len({k[CONFIG_KEYS.index("n_heads")] for k in configs}) < 2:
        return None
    metric = next(iter(configs.values()))[0]["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    by_variant: dict[str, list[tuple[int, list[dict]]]] = defaultdict(list)
    for key, rs in configs.items():
        by_variant[str(key[0])].append((int(key[CONFIG_KEYS.index("n_heads")]), rs))
    for variant, items in sorted(by_variant.items()):
        items.sort(key=lambda t: t[0])
        heads = [h for h, _ in items]
        for ax, field in zip(axes, ("best_val", "test"), strict=True):
            vals = [np.array([r[field] for r in rs], dtype=float) for _, rs in items]
            std = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]
            ax.errorbar(heads, [v.mean() for v in vals], yerr=std, marker="o", capsize=3,
                        label=variant)  # fmt: skip
    for ax, name in zip(axes, (f"best val/{metric}", f"test/{metric}"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of heads n_heads (log2 scale)")
        ax.set_ylabel(f"{name} ({UNITS.get(metric, metric)})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}: metric against heads (mean ± 1 std over seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def report(paths: Sequence[str | Path], out: str | Path | None = None) -> str:
    """Build the report for ``paths``; write report.md and PNGs into ``out``; return the text.

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
    for (study, task), configs in sorted(group_runs(runs).items()):
        title = f"{study} / {task}"
        stem = f"{study}_{task}".replace("/", "_")
        parts.append(f"## {title}\n\n{table(configs)}\n")
        png = plot_curves(configs, title, out_dir / f"{stem}_val_curves.png")
        parts.append(f"![validation curves]({png.name})\n")
        heads = plot_heads(configs, title, out_dir / f"{stem}_vs_heads.png")
        if heads is not None:
            parts.append(f"![metric against heads]({heads.name})\n")
    failed = [r for r in runs if r["status"] != "completed"]
    if failed:
        parts.append("## Failed runs\n\n| run dir | error |\n| --- | --- |")
        parts += [f"| {r['run_dir']} | {r['error']} |" for r in failed]
        parts.append("")
    text = "\n".join(parts)
    (out_dir / "report.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    """``attnlab report PATH... [--out DIR]``."""
    ap = argparse.ArgumentParser(prog="attnlab report", description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", help="run dirs or multirun dirs (searched recursively)")
    ap.add_argument("--out", default=None, help="where report.md and PNGs go (default: PATH 1)")
    args = ap.parse_args(argv)
    try:
        print(report(args.paths, args.out))
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from err
