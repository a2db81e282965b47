"""Records a sweep can trust: checkpoints that are what their names say, resumes that are exact
(epoch boundaries and repeated resumes included) and explicit about changed settings, stop signals
that never lose work silently, data that cannot train is refused, and one-line errors instead of
tracebacks. Each test is a repro of a reported failure, on tiny settings."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch

from attnlab.config import compose
from attnlab.errors import DiskFullError
from attnlab.paths import default_data_dir
from attnlab.tasks import ClassificationTask, LanguageModelTask
from attnlab.train import train
from tests.test_errors import run_cli
from tests.test_train import TINY_ENWIK8, TINY_IMDB, TINY_MODEL, tiny_cfg

needs_data = pytest.mark.skipif(default_data_dir() is None, reason="needs ../shared/data")
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

# 6 batches an epoch, 3 epochs, a periodic checkpoint every 3 steps: one falls on each epoch end
EPOCHS3 = ["trainer.max_epochs=3", "trainer.log_every_n_steps=1", "trainer.deterministic=true",
           "checkpoint_every_n_steps=3", "model.dropout=0.1"]  # fmt: skip
TASKS = {
    "enwik8": [*TINY_ENWIK8, "task.data.train_batches_per_epoch=6"],
    "imdb": [*TINY_IMDB, "task.data.limit_train=48", "task.data.batch_size=8"],
}


def _rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "metrics.csv").open()))


def _logged(run: Path) -> dict[tuple[int, str], float]:
    """Every logged value but timings: ``{(step, column): value}``."""
    skip = ("tokens_per_sec", "peak_mem", "epoch")
    out = {}
    for r in _rows(run):
        for k, v in r.items():
            if k != "step" and v not in ("", None) and not any(s in k for s in skip):
                out[(int(r["step"]), k)] = float(v)
    return out


def _crash_at(monkeypatch, task_cls, step: int) -> None:
    orig = task_cls.__dict__.get("_orig_training_step", task_cls.training_step)

    def crash(self, batch, batch_idx):
        if self.trainer.global_step == step:
            raise RuntimeError("simulated crash")
        return orig(self, batch, batch_idx)

    monkeypatch.setattr(task_cls, "training_step", crash)


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


# ----------------------------------------------------------------------------- run times
@needs_data
def test_summary_times_are_not_longer_than_the_run(tmp_path, monkeypatch):
    """wall_time_s is the run's wall time: the fit time stops at the end of the fit (it used to
    keep running through the test, which was then counted twice)."""
    orig = LanguageModelTask.test_step

    def slow_test_step(self, batch, batch_idx):
        if batch_idx == 0:
            time.sleep(1.5)  # a test phase long enough for double counting to show
        return orig(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModelTask, "test_step", slow_test_step)
    cfg = tiny_cfg(tmp_path, TASKS["enwik8"])
    start = time.perf_counter()
    got = train(cfg)
    elapsed = time.perf_counter() - start
    assert 0 < got["train_time_s"] <= got["fit_time_s"] < got["wall_time_s"] <= elapsed
    assert got["wall_time_s"] >= elapsed - 1.0  # all of the run, up to writing the summary
    assert got["wall_time_s"] - got["fit_time_s"] >= 1.5  # the test phase is outside the fit


# ----------------------------------------------------------------------------- exact resume
@needs_data
@pytest.mark.parametrize("limit", [None, 16], ids=["epochs", "max_steps"])
@pytest.mark.parametrize("task", ["imdb", "enwik8"])
def test_resume_twice_across_an_epoch_boundary_is_exact(tmp_path, monkeypatch, task, limit):
    """Killed just after the epoch-end checkpoint, resumed, killed again mid-epoch, resumed: the
    run logs every value an uninterrupted run logs, ends at the same step, keeps only best.ckpt
    and last.ckpt, best.ckpt is the best model, and the summary covers the whole run."""
    task_cls = LanguageModelTask if task == "enwik8" else ClassificationTask
    args = [*TASKS[task], *EPOCHS3, *([f"trainer.max_steps={limit}"] if limit else [])]
    ref = train(tiny_cfg(tmp_path / "ref", args))
    steps = limit or 18
    assert ref["global_step"] == steps

    run = tmp_path / "run" / "run"
    for crash, saved in ((7, 6), (10, 9)):  # 6: the end of epoch 0; 9: mid-epoch 1
        _crash_at(monkeypatch, task_cls, crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(tiny_cfg(tmp_path / "run", args))  # resume=auto after the first attempt
        monkeypatch.undo()
        assert _step(run / "checkpoints" / "last.ckpt") == saved
    got = train(tiny_cfg(tmp_path / "run", args))

    assert got["global_step"] == steps and got["attempts"] == 3
    want, have = _logged(tmp_path / "ref" / "run"), _logged(run)
    assert set(want) == set(have)
    for key, value in want.items():
        assert have[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert got["best_val"] == pytest.approx(ref["best_val"], rel=1e-6)
    assert got["test"] == pytest.approx(ref["test"], rel=1e-6)
    assert got["tokens_seen"] == ref["tokens_seen"]  # the whole run, not the last attempt
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert got["best_checkpoint"] == str(run / "checkpoints" / "best.ckpt")
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    ref_best = torch.load(
        tmp_path / "ref" / "run" / "checkpoints" / "best.ckpt", map_location="cpu",
        weights_only=False,
    )  # fmt: skip
    assert best["global_step"] == ref_best["global_step"]


@needs_data
def test_max_steps_between_validations_still_validates_the_final_model(tmp_path):
    summary = train(tiny_cfg(tmp_path, TINY_ENWIK8, "trainer.max_steps=3"))  # 4 batches an epoch
    vals = [r for r in _rows(tmp_path / "run") if r.get("val/bpb")]
    assert summary["global_step"] == 3 and len(vals) == 1
    assert summary["best_val"] == pytest.approx(float(vals[0]["val/bpb"]))
    assert Path(summary["best_checkpoint"]).name == "best.ckpt"


# ----------------------------------------------------------------------------- resume changes
@needs_data
def test_resume_applies_a_new_learning_rate_and_logs_it(tmp_path, monkeypatch, caplog):
    args = [*TASKS["enwik8"], "checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1",
            "optim.min_lr_ratio=0.1"]  # fmt: skip
    _crash_at(monkeypatch, LanguageModelTask, 3)
    with pytest.raises(RuntimeError):
        train(tiny_cfg(tmp_path, [*args, "optim.lr=1e-3"]))
    monkeypatch.undo()
    train(tiny_cfg(tmp_path, [*args, "optim.lr=1e-4"]))  # was silently ignored: lr stayed 1e-3
    assert any("optim.lr: 0.001 -> 0.0001" in r.getMessage() for r in caplog.records)
    lrs = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in _rows(tmp_path / "run")
           if r.get("lr-AdamW/pg1")}  # fmt: skip
    from attnlab.optim import warmup_cosine

    for step in (2, 4):  # warmup 2, 6 steps: the new peak lr times the schedule
        assert lrs[step] == pytest.approx(1e-4 * warmup_cosine(step, 2, 6, 0.1), rel=1e-6)


@needs_data
@pytest.mark.parametrize("change", ["model.n_heads=4", "model.d_model=64", "seed=1"])
def test_resume_refuses_settings_the_checkpoint_depends_on_before_touching_the_run(
    tmp_path, change
):
    train(tiny_cfg(tmp_path, TINY_ENWIK8))
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in (run / "config.yaml", run / "metrics.csv")}
    key = change.split("=")[0]
    with pytest.raises(ValueError, match=f"cannot resume from .*{key} .* changed"):
        train(tiny_cfg(tmp_path, TINY_ENWIK8, change))
    assert {p: p.read_bytes() for p in before} == before  # nothing rewritten or renamed
    assert not (run / "metrics.pre-resume.csv").exists()
    if change != "model.d_model=64":  # the reported traceback: check the CLI's line once
        return
    proc = run_cli("train", *TINY_MODEL, *TINY_ENWIK8, change, f"hydra.run.dir={run}",
                   f"paths.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("attnlab train: cannot resume from")


def test_resume_path_that_does_not_exist_is_an_error(tmp_path):
    cfg = tiny_cfg(tmp_path, TINY_ENWIK8, f"resume={tmp_path / 'typo'}")
    with pytest.raises(FileNotFoundError, match="resume=.*typo.*does not exist"):
        train(cfg)
    assert not (tmp_path / "run").exists()


@needs_data
def test_resume_false_never_overwrites_a_finished_run(tmp_path):
    train(tiny_cfg(tmp_path, TINY_ENWIK8, "task.data.train_batches_per_epoch=2"))
    with pytest.raises(ValueError, match="resume=false, but .* already holds a run"):
        train(tiny_cfg(tmp_path, TINY_ENWIK8, "resume=false"))


# ----------------------------------------------------------------------------- stop signals
class _SigtermDuringValidation(pl.Callback):
    def on_validation_batch_start(self, trainer, *args) -> None:
        if trainer.state.fn == "fit":
            os.kill(os.getpid(), signal.SIGTERM)


@needs_data
def test_sigterm_during_validation_saves_after_it_and_exits_nonzero(tmp_path):
    # a callback added from the command line, as a user would (conf/callbacks/default.yaml)
    sigterm = "+callbacks.sigterm._target_=tests.test_trust._SigtermDuringValidation"
    cfg = tiny_cfg(tmp_path, TINY_ENWIK8, "trainer.max_epochs=2", sigterm)
    with pytest.raises(SystemExit) as stop:
        train(cfg)
    assert stop.value.code == 128 + signal.SIGTERM
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu",
                      weights_only=False)  # fmt: skip
    assert ckpt["global_step"] == 4  # the end of epoch 0, its validation done
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "finished the validation" in summary["error"]
    vals = [r for r in _rows(tmp_path / "run") if r.get("val/bpb")]
    assert len(vals) == 1  # the interrupted validation's result was logged, not lost


SLOW = """
import sys, time
from attnlab.tasks import LanguageModelTask as T
orig = T.training_step
T.training_step = lambda self, batch, i: (time.sleep(0.2), orig(self, batch, i))[1]
from attnlab.cli import main
main(sys.argv[1:])
"""


@needs_data
def test_sigterm_in_a_sweep_says_which_jobs_were_not_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW, "train", "-m", *TINY_MODEL, *TINY_ENWIK8, "seed=0,1,2",
         "task.data.train_batches_per_epoch=40", f"paths.cache_dir={tmp_path / 'c'}",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(sweep.glob("0_*/metrics.csv")):
            time.sleep(0.1)  # job 0 is training
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    line = next(ln for ln in out.splitlines() if "sweep stopped" in ln)
    assert "during job #0" in line and "2 of 3 jobs were not run" in line
    assert "#1: seed=1" in line and "#2: seed=2" in line and f"hydra.sweep.dir={sweep}" in line
    job0 = next(sweep.glob("0_*"))
    assert (job0 / "checkpoints" / "last.ckpt").exists()
    assert json.loads((job0 / "summary.json").read_text())["status"] == "interrupted"


# ----------------------------------------------------------------------------- data sanity
def _shards(d: Path, labels: list[int], texts: list[str] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    texts = texts or [f"review number {i} was good or bad" for i in range(len(labels))]
    for split in ("train", "test"):
        pd.DataFrame({"text": texts, "label": labels}).to_parquet(d / f"{split}.parquet")
    return d


@pytest.mark.parametrize(
    ("labels", "texts", "message"),
    [
        ([1] * 40, None, "single label \\(1, all 36 reviews\\)"),
        ([0, 1] * 20, [""] * 40, "no text: all 36 reviews are empty"),
    ],
)
def test_training_data_a_classifier_cannot_learn_from_is_refused(tmp_path, labels, texts, message):
    d = _shards(tmp_path / "imdb", labels, texts)
    cfg = compose("train", [*TINY_MODEL, *TINY_IMDB, f"task.data.data_dir={d}",
                            f"paths.cache_dir={tmp_path / 'c'}", "task.data.tokenizer=bytes",
                            "task.data.vocab_size=null"], run_dir=str(tmp_path / "run"))  # fmt: skip
    with pytest.raises(ValueError, match=message):
        train(cfg)


def test_data_dir_null_uses_the_hub_not_a_local_copy(monkeypatch, tmp_path):
    import datasets

    from attnlab.data.imdb import IMDbDataModule

    asked = []

    def fake_load(*args, **kwargs):
        asked.append(args)
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    dm = IMDbDataModule(data_dir=None, cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="could not load IMDb from the hub"):
        dm.setup("fit")
    assert asked == [("stanfordnlp/imdb",)]


# ----------------------------------------------------------------------------- one-line errors
@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory) -> dict[str, Path]:
    if default_data_dir() is None:
        pytest.skip("needs ../shared/data")
    tmp = tmp_path_factory.mktemp("ckpts")
    train(tiny_cfg(tmp, TINY_ENWIK8, "task.data.train_batches_per_epoch=2"))
    good = tmp / "run" / "checkpoints" / "last.ckpt"
    data = good.read_bytes()
    out = {"good": good}
    for name, content in (
        ("truncated", data[: len(data) // 2]),
        ("corrupt", data[:100] + bytes(500) + data[600:]),
        ("random", os.urandom(4096)),
    ):
        out[name] = tmp / f"{name}.ckpt"
        out[name].write_bytes(content)
    return out


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "random"])
def test_damaged_checkpoint_is_a_one_line_error(bad_checkpoints, kind):
    from omegaconf import OmegaConf

    from attnlab.errors import user_message
    from attnlab.evaluate import evaluate, generate

    path = bad_checkpoints[kind]
    for fn, cfg in (
        (evaluate, {"ckpt": str(path), "split": "test", "batch_size": None,
                    "paths": {"data_dir": None, "cache_dir": None}, "trainer": {}}),
        (generate, {"ckpt": str(path), "prompt": "", "max_new_tokens": 4, "temperature": 0.0,
                    "top_k": None, "seed": 0, "device": "cpu", "use_cache": True}),
    ):  # fmt: skip
        with pytest.raises(ValueError) as err:
            fn(OmegaConf.create(cfg))
        line = user_message(err.value)
        assert line.startswith(f"cannot read checkpoint {path}") and "truncated or corrupt" in line


@pytest.mark.parametrize("command", ["evaluate", "generate"])
def test_cli_prints_a_damaged_checkpoint_as_one_line(bad_checkpoints, tmp_path, command):
    path = bad_checkpoints["truncated"]
    proc = run_cli(command, f"ckpt={path}", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"attnlab {command}: cannot read checkpoint {path}")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=fast", "optim.lr must be a positive number"),
        ("optim.betas=[0.9]", "optim.betas must be two numbers"),
        ("optim.warmup_steps=-1", "optim.warmup_steps must be an integer >= 0"),
        ("task.data.eval_stride=0", "task.data: eval_stride=0 is out of range"),
        ("task.data.batch_size=0", "task.data: context, batch_size"),
        ("+task.data.bogus=1", "task.data: "),
        ("+attention.max_len=64", "attention.max_len=64 would be ignored"),
        ("model.ffn_hidden=0", "model.ffn_hidden must be a positive integer"),
        ("trainer.precision=16-mixed", "is not supported on the CPU"),
        ("trainer.accelerator=gpu", "sees no CUDA GPU"),
        ("nonfinite_max_skipped=2", "nonfinite_max_skipped=2 must be a fraction"),
    ],
)
def test_config_errors_come_before_any_data_is_read_as_one_line(tmp_path, override, message):
    if "gpu" in override and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from attnlab.errors import user_message

    cfg = tiny_cfg(tmp_path, TINY_ENWIK8, f"task.data.path={tmp_path / 'no_data'}", override)
    with pytest.raises(ValueError) as err:
        train(cfg)  # the data path does not exist: a data error would come out instead
    line = user_message(err.value)
    assert message in line and "\n" not in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate"], "attnlab evaluate: ckpt is required: pass ckpt=..."),
        (["train", "optim.lr=fast"], "attnlab train: optim.lr must be a positive number"),
        (["train", "task.data.bogus=1"], "attnlab train: Could not override 'task.data.bogus'"),
    ],
)
def test_cli_prints_config_errors_as_one_line(tmp_path, args, message):
    extra = [f"paths.data_dir={tmp_path / 'no_data'}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_cli(*args, *(extra if args[0] == "train" else []), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "run" / "wandb").exists()


@needs_data
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"max_new_tokens": -5}, "max_new_tokens must be an integer >= 0, got -5"),
        ({"device": "cuda"}, "sees no CUDA GPU; use device=cpu"),
    ],
)
def test_generation_settings_that_would_be_ignored_are_errors(bad_checkpoints, setting, message):
    from omegaconf import OmegaConf

    from attnlab.evaluate import generate

    if setting.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = {
        "ckpt": str(bad_checkpoints["good"]),
        "prompt": "",
        "max_new_tokens": 4,
        "temperature": 0.0,
        "top_k": None,
        "seed": 0,
        "device": "cpu",
        "use_cache": True,
    }
    with pytest.raises(ValueError, match=message):
        generate(OmegaConf.create({**cfg, **setting}))  # fmt: skip


def test_full_disk_names_the_path_and_no_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from attnlab.checkpointing import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)

    def full(obj, f, *a, **k):
        f.write(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 0")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 100, 0))
    with pytest.raises(DiskFullError, match=f"no space left on device writing checkpoint {path}"):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert _step(path) == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ----------------------------------------------------------------------------- nonfinite=skip
@needs_data
def test_a_run_that_skipped_most_steps_is_not_completed(tmp_path, monkeypatch):
    orig = LanguageModelTask.training_step

    def poisoned(self, batch, batch_idx):
        loss = orig(self, batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= 1 else loss

    monkeypatch.setattr(LanguageModelTask, "training_step", poisoned)
    summary = train(tiny_cfg(tmp_path, TINY_ENWIK8, "nonfinite=skip"))
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["nonfinite_skipped"] == saved["nonfinite_skipped"] == 3  # of 4 steps
    assert saved["status"] == "failed" and "skipped 3 of 4 steps" in saved["error"]
    assert "nonfinite_max_skipped=0.05" in saved["error"]
