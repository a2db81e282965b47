"""``attnlab report`` groups runs by every configuration key that differs, never by a fixed list:
runs that differ in anything but the seed (and ignored keys) are never averaged. Fake run dirs
(config.yaml, summary.json, metrics.csv) written here; no training."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from attnlab import report as rep

BASE = {
    "trainer": {"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed",
                "log_every_n_steps": 20, "enable_progress_bar": False, "max_epochs": 1,
                "max_steps": -1},
    "logger": {"kind": "none"},
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "norm": "rmsnorm", "dropout": 0.0},
    "attention": {"_target_": "attnlab.attention.SoftmaxAttention", "_partial_": True,
                  "head_dim": None, "dropout": 0.0},
    "task": {"name": "enwik8", "kind": "lm", "max_len": 32, "monitor": "val/bpb",
             "data": {"batch_size": 8, "seed": 0, "num_workers": 0}},
    "optim": {"lr": 0.001, "weight_decay": 0.1, "betas": [0.9, 0.95], "warmup_steps": 2},
    "seed": 0, "threads": "auto", "resume": "auto", "checkpoint_every_n_steps": None,
    "nonfinite": "stop", "study": "default", "name": "enwik8-softmax-h2", "tags": [],
    "paths": {"data_dir": "/data", "cache_dir": "/cache", "run_dir": "?"},
}  # fmt: skip


def _set(cfg: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        cfg = cfg.setdefault(p, {})
    cfg[last] = value


def make_run(root: Path, dirname: str, /, *, seed: int = 0, best: float = 1.0, test: float | None = None,
             attention: str = "softmax", head_dim: int = 16, status: str = "completed",
             error: str | None = None, **overrides) -> Path:  # fmt: skip
    """A run dir as ``attnlab train`` leaves it; ``overrides``: dotted key (``__`` for ``.``)."""
    run = root / dirname
    run.mkdir(parents=True)
    cfg = copy.deepcopy(BASE)
    cfg["seed"] = cfg["task"]["data"]["seed"] = seed
    cfg["paths"]["run_dir"] = str(run)
    for key, value in overrides.items():
        _set(cfg, key.replace("__", "."), value)
    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    if status == "completed":
        test = best + 0.1 if test is None else test
        summary = {
            "status": "completed", "task": "enwik8", "attention": attention, "model": "modern",
            "n_heads": cfg["model"]["n_heads"], "head_dim": head_dim,
            "d_model": cfg["model"]["d_model"], "n_layers": cfg["model"]["n_layers"],
            "seed": seed, "params": {"total": 1000}, "monitor": "val/bpb", "best_val": best,
            "test": {"test/loss": 1.0, "test/bpb": test}, "tokens_per_sec": 100.0,
            "peak_mem_mb": 50.0, "wall_time_s": 2.0, "precision": cfg["trainer"]["precision"],
        }  # fmt: skip
        (run / "metrics.csv").write_text(
            f"epoch,step,val/bpb,val/tokens_seen\n0,2,{best + 0.5},100\n0,4,{best},200\n"
        )
    else:
        summary = {"status": status, "error": error, "seed": seed}
        if status == "failed":
            summary.update(task="enwik8", attention=attention, model="modern")
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def render(root: Path) -> str:
    """The report's text without the plots."""
    runs = [rep.load_run(d) for d in rep.find_run_dirs([root])]
    parts = [f"{rep.describe(s)}\n\n{rep.table(s)}" for s in rep.group_runs(runs)]
    return "\n\n".join([*parts, rep.failed_table(runs)])


def rows(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``text``, as {column: cell}."""
    all_lines = text.splitlines()
    start = next(i for i, ln in enumerate(all_lines) if ln.startswith("|"))
    lines = []
    for ln in all_lines[start:]:
        if not ln.startswith("|"):
            break
        lines.append(ln)
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    body = lines[2:]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")), strict=True))
            for ln in body]  # fmt: skip


def columns(text: str) -> list[str]:
    """The first table's config columns (those before the as-built n_heads/head_dim)."""
    head = next(ln for ln in text.splitlines() if ln.startswith("|"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    return cols[: min(cols.index(c) for c in ("n_heads", "head_dim", "seeds") if c in cols)]


def test_runs_differing_in_lr_with_the_same_seed_are_two_rows(tmp_path):
    make_run(tmp_path, "0_lr", seed=0, best=1.0, optim__lr=1e-4)
    make_run(tmp_path, "1_lr", seed=0, best=2.0, optim__lr=3e-3)
    text = render(tmp_path)
    assert columns(text) == ["optim.lr"]
    got = rows(text)
    assert [(r["optim.lr"], r["seeds"], r["best val/bpb"]) for r in got] == [
        ("0.0001", "1", "1.0000"),
        ("0.003", "1", "2.0000"),
    ]
    assert "±" not in text and "rows differ in `optim.lr`" in text


def test_seeds_of_one_configuration_aggregate_with_sample_std(tmp_path):
    best = {0: 1.0, 1: 1.2, 2: 1.7}
    for seed, b in best.items():
        make_run(tmp_path, f"a{seed}", seed=seed, best=b, test=b * 2, optim__lr=1e-3)
    for seed in (0, 1):
        make_run(tmp_path, f"b{seed}", seed=seed, best=5.0 + seed, optim__lr=3e-3)
    got = {r["optim.lr"]: r for r in rows(render(tmp_path))}
    assert set(got) == {"0.001", "0.003"}
    v = np.array(list(best.values()))
    assert got["0.001"]["seeds"] == "3"
    assert got["0.001"]["best val/bpb"] == f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"
    assert got["0.001"]["test/bpb"] == f"{2 * v.mean():.4f} ± {2 * v.std(ddof=1):.4f}"
    assert got["0.003"]["seeds"] == "2"
    assert got["0.003"]["best val/bpb"] == f"5.5000 ± {np.std([5.0, 6.0], ddof=1):.4f}"


def test_same_configuration_and_seed_twice_is_flagged(tmp_path):
    make_run(tmp_path / "sweep1", "0_run", seed=0, best=1.0)
    make_run(tmp_path / "sweep1", "1_run", seed=1, best=2.0)
    make_run(tmp_path / "sweep2", "0_rerun", seed=0, best=1.4)  # the same run again
    text = render(tmp_path)
    (row,) = rows(text)
    assert row["seeds"] == "2 (seed 0 ×2)"
    # seed 0 counts once (mean of its two runs, 1.2), then mean ± std over seeds 0 and 1
    assert row["best val/bpb"] == f"1.6000 ± {np.std([1.2, 2.0], ddof=1):.4f}"
    assert "Duplicate seeds" in text and "sweep1/0_run" in text and "sweep2/0_rerun" in text


def test_ignored_keys_do_not_split_rows_but_real_settings_do(tmp_path):
    for seed in (0, 1):  # differ in seed, task.data.seed, paths, name, logger, threads
        make_run(tmp_path, f"a{seed}", seed=seed, best=1.0 + seed, name=f"run{seed}",
                 logger__group=f"g{seed}", threads=seed + 1, paths__data_dir=f"/d{seed}",
                 task__data__num_workers=seed, trainer__enable_progress_bar=bool(seed))  # fmt: skip
    make_run(tmp_path, "b0", seed=0, best=3.0, task__data__batch_size=16)
    text = render(tmp_path)
    assert columns(text) == ["task.data.batch_size"]
    got = {r["task.data.batch_size"]: r for r in rows(text)}
    assert got["8"]["seeds"] == "2" and got["8"]["best val/bpb"].startswith("1.5000 ± ")
    assert got["16"]["seeds"] == "1"
    assert all(rep.is_ignored(k) for k in ("seed", "task.data.seed", "paths.run_dir", "name"))
    assert not rep.is_ignored("task.name") and not rep.is_ignored("trainer.precision")


def test_attention_choice_is_a_column_and_hides_what_it_determines(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path, f"s{seed}", seed=seed, best=1.0 + seed)
        make_run(tmp_path, f"f{seed}", seed=seed, best=2.0 + seed, attention="fixed_head",
                 head_dim=32, attention__head_dim=32)  # fmt: skip
    text = render(tmp_path)
    assert columns(text) == ["attention"]  # not attention.head_dim, nor fixed settings
    assert "`attention.head_dim` follows `attention`" in text
    got = rows(text)
    assert [(r["attention"], r["head_dim"], r["seeds"]) for r in got] == [
        ("fixed_head", "32", "2"),
        ("softmax", "16", "2"),
    ]
    row_lines = [ln for ln in text.splitlines() if ln.startswith(("| softmax", "| fixed_head"))]
    assert len(row_lines) == 2 and all("| 2 |" in ln for ln in row_lines)


def test_choice_dependent_key_that_varies_within_a_choice_stays_a_column(tmp_path):
    make_run(tmp_path, "s", best=1.0)
    make_run(tmp_path, "f16", best=2.0, attention="fixed_head", attention__head_dim=16)
    make_run(tmp_path, "f32", best=3.0, attention="fixed_head", attention__head_dim=32,
             head_dim=32)  # fmt: skip
    text = render(tmp_path)
    assert columns(text) == ["attention", "attention.head_dim"]
    assert len(rows(text)) == 3


def test_precision_is_configuration(tmp_path):
    make_run(tmp_path, "fp32", best=1.0, trainer__precision="32-true")
    make_run(tmp_path, "bf16", best=1.1, trainer__precision="bf16-mixed")
    text = render(tmp_path)
    assert columns(text) == ["trainer.precision"]
    assert [(r["trainer.precision"], r["seeds"]) for r in rows(text)] == [
        ("32-true", "1"),
        ("bf16-mixed", "1"),
    ]


def test_failed_interrupted_and_unfinished_runs_are_listed_with_errors(tmp_path):
    make_run(tmp_path, "0_ok", best=1.0)
    make_run(tmp_path, "1_bad", status="failed", error="ValueError: n_heads must divide d_model")
    make_run(tmp_path, "2_stop", status="interrupted",
             error="SIGTERM during training at step 7: saved last.ckpt")  # fmt: skip
    (tmp_path / "3_dead").mkdir()
    (tmp_path / "3_dead" / "config.yaml").write_text("name: x\nstudy: default\n")
    text = render(tmp_path)
    assert "## Failed or unfinished runs" in text
    failed = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if "_bad" in ln or
              "_stop" in ln or "_dead" in ln}  # fmt: skip
    assert "| failed | ValueError: n_heads must divide d_model |" in failed[str(tmp_path / "1_bad")]
    assert "| interrupted | SIGTERM during training at step 7" in failed[str(tmp_path / "2_stop")]
    assert "| no summary.json" in failed[str(tmp_path / "3_dead")]
    assert [r["seeds"] for r in rows(text)] == ["1"]  # only the completed run is aggregated


def test_report_writes_markdown_and_a_heads_plot_when_n_heads_varies(tmp_path):
    sweep = tmp_path / "sweep"
    for att, hd in (("softmax", None), ("fixed_head", 32)):
        for heads in (1, 2):
            for seed in (0, 1):
                make_run(sweep, f"{att}{heads}_{seed}", seed=seed, best=1.0 + heads + seed,
                         attention=att, head_dim=hd or 32 // heads, model__n_heads=heads,
                         attention__head_dim=hd)  # fmt: skip
    text = rep.report([sweep], tmp_path / "out")
    assert (tmp_path / "out" / "report.md").read_text() == text
    assert columns(text) == ["attention", "model.n_heads"]
    assert [r["seeds"] for r in rows(text)] == ["2"] * 4
    assert {p.name for p in (tmp_path / "out").glob("*.png")} == {
        "default_enwik8_val_curves.png",
        "default_enwik8_vs_heads.png",
    }


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        rep.main([str(tmp_path / "nope")])


def test_reach_column_gives_the_first_step_per_seed(tmp_path):
    # bpb is lower-better: the curve is best + 0.5 at step 2, best at step 4 (make_run)
    make_run(tmp_path, "a", seed=0, best=1.0, task__monitor_mode="min")
    make_run(tmp_path, "b", seed=1, best=1.6, task__monitor_mode="min")
    runs = [rep.load_run(d) for d in rep.find_run_dirs([tmp_path])]
    (section,) = rep.group_runs(runs)
    text = rep.table(section, reach=1.5)
    assert "steps to val/bpb 1.5" in text
    row = text.splitlines()[-1]
    assert "| 3, - |" in row  # seed 0: 1.5 at step index 2 (3 steps done); seed 1 never
    assert rep.first_step(runs[0]["curve"], 2.0, higher=False) == 2.0
    assert "steps to" not in rep.table(section)  # only when asked
