"""The hardware decides: precision and threads resolved from what torch reports, recorded in the
run's summary. Both answers of each capability check are covered by mocking it, so the suite
checks the bf16 branch on a CPU without bf16 and the CUDA branches on a CPU-only build."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from attnlab import hardware
from attnlab.build import resolve_runtime
from attnlab.config import compose
from attnlab.hardware import (
    available_cores,
    cpu_bf16,
    device_type,
    normalize_precision,
    resolve_precision,
    resolve_threads,
)
from attnlab.paths import default_data_dir
from attnlab.train import train
from tests.test_train import TINY_ENWIK8, TINY_MODEL

needs_data = pytest.mark.skipif(default_data_dir() is None, reason="needs ../shared/data")


@pytest.fixture
def cpu(monkeypatch):
    """Set what the CPU can do: ``cpu(onednn=..., avx512_bf16=..., amx=...)``."""

    def set_(onednn: bool, avx512_bf16: bool = False, amx: bool = False) -> None:
        monkeypatch.setattr(hardware, "_onednn_bf16", lambda: onednn)
        monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)

    return set_


@pytest.fixture
def cuda(monkeypatch):
    """Pretend a CUDA GPU is there: ``cuda(bf16=...)``."""

    def set_(bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Mock GPU")

    return set_


# ----------------------------------------------------------------------------- precision, CPU
@pytest.mark.parametrize(
    ("onednn", "avx512_bf16", "amx", "native"),
    [
        (True, True, False, True),  # Zen 4 / Cooper Lake: AVX512_BF16
        (True, False, True, True),  # Sapphire Rapids: AMX
        (True, False, False, False),  # Skylake-X: AVX-512 but bf16 converted in software
        (False, False, False, False),  # Zen 3 / a laptop: AVX2 only
        (False, True, False, False),  # oneDNN capped (ONEDNN_MAX_CPU_ISA=AVX2)
    ],
)
def test_native_bf16_needs_onednn_and_the_instructions(cpu, onednn, avx512_bf16, amx, native):
    cpu(onednn, avx512_bf16, amx)
    assert cpu_bf16().value is native
    want = "bf16-mixed" if native else "32-true"
    choice = resolve_precision("auto", "cpu")
    assert choice.value == want
    assert ("no native bf16" in choice.reason) is not native


def test_explicit_precision_wins_and_bf16_without_native_support_warns(cpu, caplog):
    cpu(onednn=False)
    with caplog.at_level(logging.WARNING, logger="attnlab"):
        choice = resolve_precision("bf16-mixed", "cpu")
    assert choice.value == "bf16-mixed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "without native bf16" in warnings[0] and "100x slower" in warnings[0]
    assert resolve_precision("32", "cpu").value == "32-true"
    cpu(onednn=True, avx512_bf16=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attnlab"):
        assert resolve_precision("32-true", "cpu").value == "32-true"
        assert resolve_precision("bf16", "cpu").value == "bf16-mixed"
    assert not caplog.records


@pytest.mark.parametrize("fp16", ["16-mixed", "16", 16, "16-true"])
def test_fp16_on_cpu_is_an_error_not_a_silent_bf16_run(fp16):
    with pytest.raises(ValueError, match="fp16.*not supported on the CPU.*32-true or bf16-mixed"):
        resolve_precision(fp16, "cpu")


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="trainer.precision='fast' is not a precision"):
        normalize_precision("fast")


# ----------------------------------------------------------------------------- CUDA (mocked)
@pytest.mark.parametrize(("bf16", "want"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_precision_on_cuda(cuda, bf16, want):
    cuda(bf16)
    assert device_type("gpu") == "cuda" and device_type("auto") == "cuda"
    choice = resolve_precision("auto", "cuda")
    assert choice.value == want and "Mock GPU" in choice.reason
    assert resolve_precision("32-true", "cuda").value == "32-true"


def test_gpu_trainer_without_a_gpu_fails_at_build_time(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_type("auto") == "cpu"
    with pytest.raises(ValueError, match="sees no CUDA GPU.*trainer=cpu"):
        device_type("gpu")
    # through train(): before the data path (which does not exist) is read
    cfg = compose(
        "train",
        [*TINY_MODEL, *TINY_ENWIK8, "trainer=gpu", f"task.data.path={tmp_path / 'nowhere'}"],
        run_dir=str(tmp_path / "run"),
    )
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_cuda_runtime_record_names_the_gpu(cuda, tmp_path):
    cuda(bf16=False)
    cfg = compose("train", ["trainer=gpu", "logger=none"], run_dir=str(tmp_path))
    runtime = resolve_runtime(cfg)
    assert cfg.trainer.precision == runtime["precision"] == "16-mixed"
    assert runtime["device"] == "cuda" and runtime["hardware"]["gpu"] == "Mock GPU"


# ----------------------------------------------------------------------------- threads
def test_threads_follow_what_the_process_may_use(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hardware, "available_cores", lambda: 8)
    monkeypatch.setattr(hardware, "_launcher", lambda: {})
    assert resolve_threads("auto").value == 8
    assert resolve_threads("auto", processes_per_machine=2).value == 4  # CPU DDP, 2 processes
    assert resolve_threads(3).value == 3
    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.JoblibLauncher", "n_jobs": 2}
    monkeypatch.setattr(hardware, "_launcher", lambda: joblib)
    assert resolve_threads("auto").value == 4
    joblib["n_jobs"] = 16
    assert resolve_threads("auto").value == 1
    submitit = {"_target_": "hydra_plugins.hydra_submitit_launcher.X", "cpus_per_task": 3}
    monkeypatch.setattr(hardware, "_launcher", lambda: submitit)
    assert resolve_threads("auto").value == 3
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    choice = resolve_threads("auto")
    assert choice.value == 6 and "SLURM_CPUS_PER_TASK=6" in choice.reason
    for bad in (0, -1, "many", True):
        with pytest.raises(ValueError, match="must be a positive integer or auto"):
            resolve_threads(bad)


def test_available_cores_respects_the_affinity_mask():
    import os

    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


# ----------------------------------------------------------------------------- through a run
@needs_data
@pytest.mark.parametrize("native", [False, True])
def test_summary_records_precision_threads_and_hardware(cpu, tmp_path, native, caplog):
    cpu(onednn=native, avx512_bf16=native)
    overrides = [o for o in TINY_MODEL if not o.startswith("trainer.precision")]
    cfg = compose(
        "train",
        [*overrides, *TINY_ENWIK8, "trainer.precision=auto", "threads=1"],
        run_dir=str(tmp_path / "run"),
    )
    with caplog.at_level(logging.INFO, logger="attnlab"):
        summary = train(cfg)
    want = "bf16-mixed" if native else "32-true"
    saved = json.loads((Path(cfg.paths.run_dir) / "summary.json").read_text())
    assert summary["precision"] == saved["precision"] == want
    assert saved["threads"] == 1 and torch.get_num_threads() == 1
    assert saved["hardware"]["cpu_capability"] == hardware.cpu_capability()
    assert saved["hardware"]["cpu_bf16"] is native and saved["hardware"]["cpu"]
    config = (Path(cfg.paths.run_dir) / "config.yaml").read_text()
    assert f"precision: {want}" in config  # the config records what ran, not "auto"
    start = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attnlab: cpu")]
    assert len(start) == 1 and f"precision {want}" in start[0] and "1 torch thread " in start[0]
    torch.set_num_threads(available_cores())
