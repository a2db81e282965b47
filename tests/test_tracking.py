"""W&B records a sweep can trust: one W&B run per job (also when the jobs share a process),
names and groups that carry the job's overrides, and a resumed run continuing its W&B run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab.paths import default_data_dir
from attnlab.tasks import LanguageModelTask
from attnlab.train import train
from tests.test_train import TINY_ENWIK8, TINY_MODEL, tiny_cfg

pytestmark = pytest.mark.skipif(default_data_dir() is None, reason="needs ../shared/data")
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
WANDB_TINY = [o for o in TINY_MODEL if o != "logger=none"] + ["logger=wandb"]


def _runs(job: Path) -> list[Path]:
    """The offline W&B run files of one job directory."""
    return sorted(job.glob("wandb/offline-run-*/run-*.wandb"))


def test_each_sweep_job_logs_to_its_own_wandb_run(tmp_path):
    """The issue's repro: with the basic launcher every job after the first used to log into the
    first job's W&B run (its name and config), and only job 0 had a wandb/ folder."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "attnlab.cli", "train", "-m", *WANDB_TINY, *TINY_ENWIK8,
         "seed=0,1", "optim.lr=1e-3", "task.data.train_batches_per_epoch=3",
         f"paths.cache_dir={tmp_path / 'c'}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "already in progress" not in proc.stdout + proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    ids = [(job / "wandb_id").read_text().strip() for job in jobs]
    assert len(set(ids)) == 2
    for seed, (job, run_id) in enumerate(zip(jobs, ids, strict=True)):
        runs = _runs(job)
        assert [r.name for r in runs] == [f"run-{run_id}.wandb"]
        data = runs[0].read_bytes()
        other = 1 - seed
        # the job's own config (task.data.seed follows seed) and name, not the other job's
        assert f'"seed":{seed},'.encode() in data and f'"seed":{other},'.encode() not in data
        assert f"-seed{seed}".encode() in data and f"-seed{other}".encode() not in data
        assert b"[model.d_model-32_" in data  # the name and group carry the job's overrides
        # the directory is named by the job, its seed and its overrides too
        assert job.name.startswith(f"{seed}_enwik8-softmax-h2_seed{seed}_model.d_model-32_")


def test_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    orig = LanguageModelTask.training_step

    def crash(self, batch, batch_idx):
        if self.trainer.global_step == 3:
            raise RuntimeError("simulated crash")
        return orig(self, batch, batch_idx)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [*TINY_ENWIK8, "logger=wandb", "checkpoint_every_n_steps=2"]
    monkeypatch.setattr(LanguageModelTask, "training_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(tmp_path, args))
    monkeypatch.setattr(LanguageModelTask, "training_step", orig)
    run = tmp_path / "run"
    first_id = (run / "wandb_id").read_text().strip()
    import wandb

    assert wandb.run is None  # the crashed job's W&B run was finished, not left open
    summary = train(tiny_cfg(tmp_path, args))  # resume=auto: same run dir
    assert summary["status"] == "completed" and summary["attempts"] == 2
    assert (run / "wandb_id").read_text().strip() == first_id
    runs = _runs(run)
    assert len(runs) == 2 and all(r.name == f"run-{first_id}.wandb" for r in runs)
    assert wandb.run is None
