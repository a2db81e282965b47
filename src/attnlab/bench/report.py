"""Targets, the printed ratio table and the plots of an ``attnlab bench`` result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _cell(rows: list[dict], name: str, n: int, causal: bool, key: str) -> float | None:
    for r in rows:
        if r["name"] == name and r["n"] == n and r["causal"] == causal:
            v = r.get(key)
            return v if isinstance(v, float) else None
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def targets(res: dict[str, Any], t: dict[str, Any], roles: dict[str, dict]) -> list[dict]:
    """Each target: ``{target, value, threshold, met}`` (met None when not measured).

    ``t`` is ``bench.targets`` (thresholds, from conf/bench.yaml); ``roles`` the capabilities of
    each variant (:func:`attnlab.bench.roles`): a target applies to every variant with the
    capability it measures (a chunk size, a recurrent or a KV-cache decoding step), so a new
    variant is measured without naming it anywhere.
    """
    rows = res.get("attention", [])
    out: list[dict] = []

    def add(target: str, value: float | None, threshold: str, ok: bool | None) -> None:
        out.append({"target": target, "value": value, "threshold": threshold, "met": ok})

    mha = t["vs_mha"]
    for name in mha["variants"]:
        for causal in (False, True):
            v = _ratio(_cell(rows, "mha", mha["n"], causal, "time_s"),
                       _cell(rows, name, mha["n"], causal, "time_s"))  # fmt: skip
            add(f"{name} speed / nn.MultiheadAttention, n={mha['n']}, causal={causal}", v,
                f">= {mha['min']}", None if v is None else v >= mha["min"])  # fmt: skip
    sc, nv = t["chunked_scaling"], t["chunked_vs_naive"]
    chunks = res.get("chunk_sweeps", {})
    for name, r in roles.items():
        if r.get("chunk_size") is None:
            continue
        for key, label in (("time_s", "time"), ("mem_mb", "memory")):
            v = _ratio(_cell(rows, name, sc["long"], True, key),
                       _cell(rows, name, sc["short"], True, key))  # fmt: skip
            add(f"causal {name} {label} {sc['long']} / {sc['short']}", v, f"<= {sc['max']}",
                None if v is None else v <= sc["max"])  # fmt: skip
        v = _ratio(_cell(rows, "naive_linear", nv["n"], True, "time_s"),
                   _cell(rows, name, nv["n"], True, "time_s"))  # fmt: skip
        add(f"causal {name} speed-up over naive masked quadratic, n={nv['n']}", v,
            f">= {nv['min']}", None if v is None else v >= nv["min"])  # fmt: skip
        sweep = chunks.get(name, {})
        err = sweep.get("error_vs_naive", {}).get(r["chunk_size"])
        add(f"causal {name} (chunk {r['chunk_size']}) max |diff| vs naive, fp32, "
            f"n={sweep.get('n')}", None if err is None else err["max_abs"],
            "allclose atol=rtol=1e-5", None if err is None else err["allclose_1e-5"])  # fmt: skip
    gen = res.get("generation", {})
    rg, kv = t["recurrent_generation"], t["kv_cache_generation"]
    for name, r in roles.items():
        if not r.get("supports_step"):
            continue
        if r.get("recurrent"):
            step = gen.get(f"{name}_step", {})
            v = _ratio(step.get(rg["long"]), step.get(rg["short"]))
            add(f"generation: {name} (recurrent) time/token at {rg['long']} / at {rg['short']}",
                v, f"<= {rg['max']}", None if v is None else v <= rg["max"])  # fmt: skip
        else:
            v = _ratio(gen.get(f"{name}_recompute", {}).get(kv["at"]),
                       gen.get(f"{name}_step", {}).get(kv["at"]))  # fmt: skip
            add(f"generation: {name} recompute / KV cache at {kv['at']}", v, f">= {kv['min']}",
                None if v is None else v >= kv["min"])  # fmt: skip
    lim = t["lightning_overhead"]["max"]
    for task, tr in res.get("training", {}).items():
        add(f"training {task}: Lightning overhead vs plain loop (1 - tok/s ratio)",
            tr["overhead"], f"<= {lim}", tr["overhead"] <= lim)  # fmt: skip
    prec = res.get("bf16_mixed", {})
    if prec:
        bad = [k for k, v in prec.items() if not v["ok"]]
        add(f"bf16-mixed trains every variant ({len(prec)} variant/task pairs)", float(len(bad)),
            "0 failures", not bad)  # fmt: skip
    for blk in res.get("blocks", []):
        shape = blk["shape"]
        name = (f"L{shape['layers']} H{shape['heads']} C{shape['d_model']} T{shape['context']} "
                f"B{shape['batch']}")  # fmt: skip
        for row in ("modern", "nanogpt_like"):
            if row in blk["ratios"]:
                v, ci = blk["ratios"][row]["tokens"], blk["ratios"][row].get("tokens_ci")
                lo = t["blocks"]["min"]
                within = "" if ci is None else f" (95 % interval {ci[0]:.3f}–{ci[1]:.3f})"
                add(f"training tokens/s {row} / nanoGPT reference, {name}{within}", v,
                    f">= {lo}", v >= lo)  # fmt: skip
    for name, c in res.get("compile", {}).items():
        v = _ratio(c.get("tokens_per_s"), c.get("eager_tokens_per_s"))
        add(f"model.compile=true trains ({name}, enwik8): compiled/eager tok/s", v, "runs",
            "error" not in c)  # fmt: skip
    return out


def format_targets(rows: list[dict]) -> str:
    """The table ``attnlab bench`` prints (also pasted into benchmarks/README.md)."""
    lines = ["| target | value | threshold | met |", "|---|---|---|---|"]
    for r in rows:
        v = "n/a" if r["value"] is None else f"{r['value']:.3g}"
        met = {True: "met", False: "NOT met", None: "not measured"}[r["met"]]
        lines.append(f"| {r['target']} | {v} | {r['threshold']} | {met} |")
    return "\n".join(lines)


def plot_attention(rows: list[dict], out_dir: Path) -> list[Path]:
    """``attention_{causal,noncausal}.png``: log-log time and memory against length."""
    paths = []
    for causal in sorted({r["causal"] for r in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        names = list(dict.fromkeys(r["name"] for r in rows if r["causal"] == causal))
        for key, ax, unit in (("time_s", axes[0], "fwd+bwd time (s)"),
                              ("mem_mb", axes[1], "peak extra memory (MiB)")):  # fmt: skip
            for name in names:
                pts = [(r["n"], r[key]) for r in rows if r["name"] == name
                       and r["causal"] == causal and isinstance(r.get(key), float)]  # fmt: skip
                if pts:
                    ref = name in ("mha", "naive_softmax", "naive_linear")
                    ax.plot(*zip(*pts), "--" if ref else "-", marker="o", ms=3, label=name)
            ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=unit)
            ax.grid(True, which="both", alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.suptitle(f"one attention layer, {'causal' if causal else 'non-causal'}")
        fig.tight_layout()
        path = out_dir / f"attention_{'causal' if causal else 'noncausal'}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_generation(gen: dict[str, dict], out_dir: Path) -> Path:
    """``generation.png``: seconds per token against position (log-log)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for mode, pts in gen.items():
        xs = sorted(pts)
        ax.plot(xs, [pts[p] for p in xs], marker="o", ms=3, label=mode)
    ax.set(xscale="log", yscale="log", xlabel="position", ylabel="time per token (s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "generation.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
