"""The real entry points on small slices of the real data (DESIGN.md, convention 10)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from attnlab.build import build_task
from attnlab.config import compose
from attnlab.data.enwik8 import Enwik8DataModule
from attnlab.evaluate import load_checkpoint
from attnlab.metrics import LN2, BitsPerByte
from attnlab.paths import default_data_dir
from attnlab.train import train
from tests.conftest import VARIANTS, positions_for

pytestmark = pytest.mark.skipif(default_data_dir() is None, reason="needs ../shared/data")

TINY_MODEL = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "logger=none",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=2",
]
TINY_IMDB = [
    "task=imdb",
    "task.max_len=64",
    "task.data.limit_train=96",
    "task.data.limit_val=32",
    "task.data.limit_test=32",
    "task.data.vocab_size=300",
    "task.data.batch_size=16",
    "trainer.max_epochs=1",
    "optim.warmup_steps=2",
]
TINY_ENWIK8 = [
    "task=enwik8",
    "task.max_len=32",
    "task.data.batch_size=8",
    "task.data.train_batches_per_epoch=4",
    "task.data.limit_val_bytes=300",
    "task.data.limit_test_bytes=300",
    "trainer.max_epochs=1",
    "optim.warmup_steps=2",
]


def tiny_cfg(tmp_path: Path, task: list[str], *extra: str):
    overrides = [*TINY_MODEL, *task, f"paths.cache_dir={tmp_path / 'cache'}", *extra]
    return compose("train", overrides, run_dir=str(tmp_path / "run"))


@pytest.mark.parametrize("task", ["imdb", "enwik8"])
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_trains_on_each_task(tmp_path, name, task):
    cfg = tiny_cfg(
        tmp_path,
        TINY_IMDB if task == "imdb" else TINY_ENWIK8,
        f"attention={name}",
        f"model.positions={positions_for(name)}",
    )
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["global_step"] > 0
    metric = "test/acc" if task == "imdb" else "test/bpb"
    assert math.isfinite(summary["test"][metric]) and math.isfinite(summary["best_val"])
    if task == "enwik8":
        assert 0 < summary["test"]["test/bpb"] < 9  # bytes: log2(256) = 8 bits at chance
    run = Path(cfg.paths.run_dir)
    assert (run / "summary.json").exists() and (run / "checkpoints" / "last.ckpt").exists()


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "attnlab.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_cli_train_writes_summary_metrics_and_offline_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    args = [a for a in TINY_MODEL if a != "logger=none"] + TINY_IMDB
    proc = _run_cli(
        "train",
        *args,
        "logger=wandb",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert "attnlab run summary" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "imdb" and summary["attention"] == "softmax"
    assert 0 <= summary["test"]["test/acc"] <= 1 and summary["params"]["total"] > 0
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/acc") for r in rows)
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline, "no offline W&B run was written"
    # evaluate rebuilds the model from the checkpoint's config and scores the same test split
    proc = _run_cli(
        "evaluate",
        f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}",
        "trainer.enable_progress_bar=false",
        "trainer.precision=32-true",
        cwd=tmp_path,
    )
    result = json.loads(proc.stdout[proc.stdout.rindex('{\n  "ckpt"') :])
    assert result["split"] == "test"
    assert result["test/acc"] == pytest.approx(summary["test"]["test/acc"])


def test_cli_generate_from_enwik8_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    _run_cli("train", *TINY_MODEL, *TINY_ENWIK8, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    greedy = [
        _run_cli(
            "generate",
            f"ckpt={ckpt}",
            "prompt='<page>'",
            "max_new_tokens=20",
            "temperature=0",
            cwd=tmp_path,
        ).stdout
        for _ in range(2)
    ]
    assert greedy[0] == greedy[1] and greedy[0].startswith("<page>")
    cfg, raw = load_checkpoint(ckpt)
    assert cfg.task.module._target_ == "attnlab.tasks.LanguageModelTask" and "state_dict" in raw


def test_unknown_variant_lists_the_available_ones(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "attnlab.cli", "train", "attention=softmx"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "unknown attention 'softmx'; available:" in proc.stderr and "linear" in proc.stderr


def score_bytes_brute_force(
    model: torch.nn.Module, data: torch.Tensor, start: int, end: int, context: int
) -> tuple[float, int]:
    """Reference scorer: each byte in [max(start,1), end) predicted from up to ``context``
    preceding bytes, one forward pass per byte. Returns (total nats, bytes scored).
    Slow; for tests of the sliding-window evaluator."""
    total, count = 0.0, 0
    with torch.no_grad():
        for p in range(max(start, 1), end):
            ctx = data[max(0, p - context) : p].long()[None]
            logp = F.log_softmax(model(ctx)[0, -1].float(), -1)
            total -= logp[int(data[p])].item()
            count += 1
    return total, count


def test_sliding_window_bpb_equals_brute_force_per_byte_scoring(tmp_path):
    """Every byte of the split scored exactly once; bpb = mean nats / ln 2.

    With stride 1 every byte is predicted from the full ``context`` preceding bytes, which
    is what the per-byte brute force does; larger strides trade context for speed (the
    exactly-once coverage at any stride is tested in test_data_enwik8.py)."""
    data = bytes(range(32, 127)) * 20 + b"the quick brown fox jumps over the lazy dog. " * 20
    path = tmp_path / "bytes.txt"
    path.write_bytes(data)
    context = 16
    dm = Enwik8DataModule(path=str(path), context=context, batch_size=4, eval_stride=1, seed=0)
    dm.setup("fit")
    cfg = compose(
        "train",
        [
            "task=enwik8",
            f"task.max_len={context}",
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.dropout=0.0",
        ],
        run_dir=str(tmp_path / "run"),
    )
    torch.manual_seed(0)
    task = build_task(cfg, 256).eval()
    model = task.model
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    metrics = trainer.validate(task, datamodule=dm, verbose=False)[0]
    start, end = dm.splits["val"]
    nats, count = score_bytes_brute_force(model, dm.data, start, end, context)
    assert count == end - start == dm.num_scored_bytes("val")
    assert metrics["val/bpb"] == pytest.approx(nats / count / LN2, rel=1e-4)
    assert metrics["val/loss"] == pytest.approx(nats / count, rel=1e-3)


def test_bits_per_byte_metric_is_nats_over_ln2():
    m = BitsPerByte()
    m.update(torch.tensor([1.0, 2.0]))
    m.update(torch.tensor([3.0]))
    assert m.compute().item() == pytest.approx(6.0 / 3 / math.log(2))
