"""Studies end to end: experiment configs, sweeps through the real CLI (basic and submitit
launchers), ``attnlab report``, DDP exactness of bits per byte, and ``attnlab analyze``."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from attnlab.build import build_task
from attnlab.config import available, compose
from attnlab.evaluate import load_checkpoint, restore_task
from attnlab.paths import CONF_DIR, default_data_dir
from tests.test_train import TINY_ENWIK8, TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
TINY = [o for o in TINY_MODEL + TINY_ENWIK8 if not o.startswith("task.data.limit_val_bytes")]
TINY += ["task.data.limit_val_bytes=300"]  # 19 sliding windows: odd, so DDP ranks get 10 + 9
needs_data = pytest.mark.skipif(default_data_dir() is None, reason="needs ../shared/data")


def _cli(*args: str, timeout: int = 240) -> str:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "attnlab.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _sweep_values(name: str) -> dict[str, list[str]]:
    """The sweep's values per key (seed aside), expanded as Hydra's BasicSweeper does:
    with a config loader, so ``glob(*)`` lists the config group's options."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.load(Path(CONF_DIR) / "experiment" / f"{name}.yaml").hydra.sweeper.params
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF_DIR)))
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(
        [f"{k}={v}" for k, v in params.items() if k != "seed"]
    )
    return {o.key_or_group: list(o.sweep_string_iterator()) for o in overrides}


@pytest.mark.parametrize("name", available("experiment"))
def test_experiment_composes_and_builds_every_sweep_point(name):
    grid = (
        _sweep_values(name)
        if "sweeper"
        in str(OmegaConf.load(Path(CONF_DIR) / "experiment" / f"{name}.yaml").get("hydra", ""))
        else {}
    )
    points = [dict(zip(grid, vals, strict=True)) for vals in itertools.product(*grid.values())]
    for point in points or [{}]:
        overrides = [f"+experiment={name}", "logger=none", *(f"{k}={v}" for k, v in point.items())]
        cfg = compose("train", overrides, run_dir="/tmp/unused")
        assert cfg.study == name
        model = build_task(cfg, vocab_size=300).model
        for key, value in point.items():
            if key.startswith("model."):
                assert str(OmegaConf.select(cfg, key)) == value
        attn = model.backbone.attentions[0]
        if point.get("attention") == "fixed_head":
            assert attn.head_dim == 32  # fixed whatever n_heads is
        elif "model.n_heads" in point:
            assert attn.head_dim * attn.n_heads == cfg.model.d_model


def test_variant_ablation_covers_every_variant():
    sweeper = OmegaConf.load(Path(CONF_DIR) / "experiment" / "variant_ablation.yaml").hydra.sweeper
    assert sweeper.params.attention == "glob(*)"  # a new variant joins without editing the list
    assert sorted(_sweep_values("variant_ablation")["attention"]) == available("attention")


def test_slurm_launcher_config_composes():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from attnlab.config import register_resolvers

    register_resolvers()  # as the CLI does: the launcher's resources use ${attnlab_slurm:...}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose("train", ["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # resources follow the trainer: the default CPU trainer asks for no GPU (tests/test_slurm.py)
    assert launcher.gpus_per_node is None and launcher.timeout_min > 0 and launcher.mem_gb > 0


def _check_report(sweep: Path, out: Path) -> None:
    text = _cli("report", str(sweep), "--out", str(out))
    summaries = [json.loads(p.read_text()) for p in sweep.rglob("summary.json")]
    assert len(summaries) == 4 and all(s["status"] == "completed" for s in summaries)
    rows = [line for line in text.splitlines() if line.startswith("| softmax") or
            line.startswith("| fixed_head")]  # fmt: skip
    assert len(rows) == 2
    for row in rows:
        att = row.split("|")[1].strip()
        runs = [s for s in summaries if s["attention"] == att]
        vals = np.array([s["best_val"] for s in runs])
        tests = np.array([s["test"]["test/bpb"] for s in runs])
        assert f"{vals.mean():.4f} ± {vals.std(ddof=1):.4f}" in row
        assert f"{tests.mean():.4f} ± {tests.std(ddof=1):.4f}" in row
        assert f"| {runs[0]['head_dim']} |" in row and "| 2 |" in row  # head_dim, seeds
    assert (out / "report.md").read_text() in text + "\n"
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["default_enwik8_val_curves.png"]
    assert all(p.stat().st_size > 5000 for p in pngs)


@needs_data
def test_multirun_report_and_analyze(tmp_path):
    sweep = tmp_path / "sweep"
    _cli("train", "-m", "attention=softmax,fixed_head", "seed=0,1", *TINY,
         f"hydra.sweep.dir={sweep}")  # fmt: skip
    _check_report(sweep, tmp_path / "report")
    (sweep / "9_broken").mkdir()  # a job that died before writing its summary
    (sweep / "9_broken" / "config.yaml").write_text("name: enwik8-softmax-h2\nstudy: default\n")
    assert "| no summary.json" in _cli("report", str(sweep))

    ckpt = next(sweep.glob("0_*/checkpoints/best.ckpt"))
    cfg = compose("analyze", [f"ckpt={ckpt}", "limit=200", f"out={tmp_path / 'an'}"])
    from attnlab.analyze import analyze

    result = analyze(cfg)
    assert result["drops"].shape == (1, 2) and np.isfinite(result["drops"]).all()
    for name in ("head_importance.png", "attention_layer0.png", "head_importance.md"):
        assert (tmp_path / "an" / name).stat().st_size > 0


@needs_data
def test_submitit_local_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    _cli("train", "-m", "hydra/launcher=submitit_local", "attention=softmax", "seed=0,1", *TINY,
         f"hydra.sweep.dir={sweep}")  # fmt: skip
    summaries = [json.loads(p.read_text()) for p in sweep.rglob("summary.json")]
    assert sorted(s["seed"] for s in summaries) == [0, 1]
    assert all(s["status"] == "completed" for s in summaries)


def _val_bpb_one_process(ckpt: Path) -> tuple[float, int]:
    run_cfg, raw = load_checkpoint(ckpt)
    task = restore_task(run_cfg, raw)
    dm = instantiate(run_cfg.task.data)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    bpb = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/bpb"]
    return bpb, len(dm.eval_dataset("val"))


@needs_data
def test_ddp_bits_per_byte_equal_single_process(tmp_path):
    run = tmp_path / "ddp"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    _cli("train", *ddp, *TINY, f"hydra.run.dir={run}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] > 0
    ckpt = run / "checkpoints" / "last.ckpt"
    single, windows = _val_bpb_one_process(ckpt)
    assert windows % 2 == 1  # DistributedSampler would pad one window and count it twice
    out = _cli("evaluate", f"ckpt={ckpt}", "split=val", "trainer.devices=2", "+trainer.strategy=ddp",
               "trainer.precision=32-true", "trainer.enable_progress_bar=false")  # fmt: skip
    values = [float(v) for v in re.findall(r'"val/bpb": ([0-9.e+-]+)', out)]
    assert values and all(v == pytest.approx(single, abs=1e-5) for v in values)
