"""SLURM for real: a private single-node cluster (``tests/slurm/cluster.sh up``: slurmctld, slurmd,
slurmdbd + MariaDB, munge; partitions ``low`` and ``high`` with pre-emption) runs
``attnlab train -m hydra/launcher=slurm`` sweeps through the real CLI and submitit:

- a two-job sweep completes under SLURM and ``attnlab report`` aggregates it;
- a job requeued mid-run (``scontrol requeue``) resumes from its checkpoint in the same run dir;
- a job pre-empted by a whole-node job in the ``high`` partition saves on SIGTERM, is requeued,
  resumes and ends like an uninterrupted run;
- jobs cancelled with ``scancel`` (one pending, one training) are reported as failed and the
  sweep finishes normally.

The cluster tests are skipped (with the reason) when the cluster cannot be brought up: not root,
no SLURM and no apt-get, installation failed, daemons did not start. The tests of the launcher
config (resources follow the trainer) need no cluster. Set ATTNLAB_SLURM_KEEP=1 to
leave a cluster this module started running. See tests/slurm/README.md.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from attnlab.config import compose
from attnlab.paths import default_data_dir
from attnlab.train import train
from tests.test_train import TINY_ENWIK8, TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
SLURM_DIR = Path(os.environ.get("ATTNLAB_SLURM_DIR", "/tmp/attnlab-slurm"))
SLURM_CONF = SLURM_DIR / "etc" / "slurm.conf"

needs_data = pytest.mark.skipif(default_data_dir() is None, reason="needs ../shared/data")

TINY = [*TINY_MODEL, *TINY_ENWIK8]
#: 24 steps (2 epochs of 12), last.ckpt every 2 steps, deterministic: resumes exactly
RESUMABLE = [
    *TINY,
    "task.data.train_batches_per_epoch=12",
    "task.data.limit_val_bytes=100",
    "task.data.limit_test_bytes=100",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "trainer.deterministic=true",
    "checkpoint_every_n_steps=2",
    "model.dropout=0.0",
]
STEPS = 24
#: one CPU each: two jobs share this 2-core node; the whole node is what pre-empts them
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
    "hydra.launcher.timeout_min=10",
]
#: seconds each training step sleeps inside SLURM jobs (sitecustomize below), so that a job is
#: still training when the test requeues, pre-empts or cancels it
STEP_SLEEP = 0.25
SITECUSTOMIZE = """
# attnlab tests/test_slurm.py: slow each training step of SLURM jobs down (numerics unchanged)
import os
if os.environ.get("SLURM_JOB_ID") and os.environ.get("ATTNLAB_TEST_STEP_SLEEP"):
    import time
    from attnlab.tasks import LanguageModelTask as _Task
    _step, _delay = _Task.training_step, float(os.environ["ATTNLAB_TEST_STEP_SLEEP"])
    def _slow_step(self, batch, batch_idx):
        time.sleep(_delay)
        return _step(self, batch, batch_idx)
    _Task.training_step = _slow_step
"""


# ------------------------------------------------------------------------------ no cluster needed
def _launcher(*overrides: str) -> dict[str, Any]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from attnlab.config import register_resolvers
    from attnlab.paths import CONF_DIR

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose("train", ["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.mark.parametrize(
    "overrides, gpus, tasks, nodes, mem",
    [
        ([], None, 1, 1, 4),  # CPU: no GPU request (a CPU partition refuses the gres)
        (["trainer=gpu"], 1, 1, 1, 4),
        (["trainer=ddp"], 1, 1, 1, 4),  # devices=auto: one task, the GPU SLURM gives it
        (["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], 4, 4, 2, 16),
        (["trainer=ddp", "trainer.devices=[0,1]"], 2, 2, 1, 8),
        (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], None, 2, 1, 8),
    ],
)
def test_slurm_resources_follow_the_trainer(overrides, gpus, tasks, nodes, mem):
    launcher = _launcher(*overrides, "task=enwik8", "study=s")
    assert launcher["_target_"] == "hydra_plugins.attnlab_submitit.SlurmLauncher"
    got = [launcher[k] for k in ("gpus_per_node", "tasks_per_node", "nodes", "mem_gb")]
    assert got == [gpus, tasks, nodes, mem]
    assert launcher["name"] == "attnlab_s_enwik8"  # not "cli"
    assert launcher["additional_parameters"] == {"requeue": True}
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] > 0
    assert launcher["cpus_per_task"] == 2 and launcher["partition"] is None


def test_slurm_resources_refuse_every_device():
    with pytest.raises(Exception, match="trainer.devices=N"):
        _launcher("trainer=gpu", "trainer.devices=-1")


# ------------------------------------------------------------------------------ the cluster
def _sh(*cmd: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLURM_CONF": str(SLURM_CONF)}
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=check, env=env
    )


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Bring the cluster up (or skip the module saying why); the environment for sweeps."""
    if os.geteuid() != 0:
        pytest.skip("needs root: tests/slurm/cluster.sh installs packages and starts slurmd")
    have_slurm = any(Path(d, "slurmctld").exists() for d in ("/usr/sbin", "/usr/bin"))
    if not have_slurm and shutil.which("apt-get") is None:
        pytest.skip("no SLURM installed and no apt-get to install it (Debian/Ubuntu only)")
    was_up = _sh(str(CLUSTER_SH), "status").returncode == 0
    start = time.perf_counter()
    try:
        up = _sh(str(CLUSTER_SH), "up", timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("tests/slurm/cluster.sh up did not finish within 900 s")
    if up.returncode != 0:
        said = (up.stdout + up.stderr).strip().splitlines()[-8:]
        pytest.skip("tests/slurm/cluster.sh up failed: " + " | ".join(said))
    print(f"cluster up in {time.perf_counter() - start:.0f} s: {up.stdout.strip()}")
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        SLURM_CONF=str(SLURM_CONF),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])),
    )
    yield env
    if not was_up and os.environ.get("ATTNLAB_SLURM_KEEP") != "1":
        _sh(str(CLUSTER_SH), "down", timeout=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Any]:
    """The uninterrupted run of RESUMABLE, in this process with one thread (as a SLURM job with
    cpus_per_task=1 runs): its summary and per-step training losses."""
    run = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    try:
        cfg = compose("train", [*RESUMABLE, "threads=1", f"paths.cache_dir={run / 'cache'}"],
                      run_dir=str(run / "run"))  # fmt: skip
        summary = train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert summary["global_step"] == STEPS
    return {"summary": summary, "losses": _losses(run / "run")}


# ------------------------------------------------------------------------------ sweeps
class Sweep:
    """``attnlab train -m hydra/launcher=slurm ...`` running in the background."""

    def __init__(self, tmp_path: Path, env: dict[str, str], study: str, *overrides: str,
                 slow: bool = False) -> None:  # fmt: skip
        self.dir = tmp_path / study
        self.log = tmp_path / f"{study}.log"
        self.study = study
        args = [*LAUNCHER, f"study={study}", f"hydra.sweep.dir={self.dir}",
                f"paths.cache_dir={tmp_path / 'cache'}", *overrides]  # fmt: skip
        env = {**env, "ATTNLAB_TEST_STEP_SLEEP": str(STEP_SLEEP) if slow else ""}
        self.started = time.perf_counter()
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "attnlab.cli", "train", "-m", *args],
                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def job_ids(self, count: int, timeout: float = 60) -> dict[int, str]:
        """{job num: SLURM job id} from <sweep dir>/slurm_jobs.tsv (the launcher writes it)."""
        table = self.dir / "slurm_jobs.tsv"

        def read() -> dict[int, str] | None:
            if not table.exists():
                return None
            rows = list(csv.DictReader(table.open(), delimiter="\t"))
            return {int(r["job_num"]): r["job_id"] for r in rows} if len(rows) >= count else None

        return wait_for(read, timeout, f"{count} submitted jobs in {table}", self)

    def run_dir(self, num: int) -> Path:
        return next(p for p in self.dir.glob(f"{num}_*") if p.is_dir())

    def summary(self, num: int) -> dict[str, Any]:
        return json.loads((self.run_dir(num) / "summary.json").read_text())

    def wait(self, timeout: float = 240) -> str:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the sweep did not finish within {timeout} s") from None
        out = self.output()
        assert self.proc.returncode == 0, f"sweep exited with {self.proc.returncode}"
        print(f"sweep {self.study}: {time.perf_counter() - self.started:.0f} s")
        return out

    def job_logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted((self.dir / ".submitit").rglob("*_log.*"))
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _sh("scancel", f"--name=attnlab_{self.study}_enwik8")

    def diagnostics(self) -> str:
        parts = [f"=== sweep command output ({self.log})", self.output()[-6000:]]
        for p in sorted((self.dir / ".submitit").rglob("*_log.*")) if self.dir.exists() else []:
            parts += [f"=== {p}", p.read_text(errors="replace")[-4000:]]
        parts += ["=== squeue", _sh("squeue").stdout]
        parts += ["=== sacct", _sh("sacct", "--duplicates", "-o",
                                   "JobID,JobName%28,Partition,State,ExitCode,Start,End").stdout]  # fmt: skip
        log = SLURM_DIR / "log" / "slurmctld.log"
        tail = log.read_text(errors="replace").splitlines()[-60:] if log.exists() else []
        parts += [f"=== {log} (tail)", "\n".join(tail)]
        return "\n".join(parts)


@contextmanager
def explained(sweep: Sweep) -> Iterator[Sweep]:
    """On failure print the sweep's output, submitit's job logs, squeue/sacct, slurmctld.log;
    always stop the sweep and cancel its jobs."""
    try:
        yield sweep
    except BaseException:
        print(sweep.diagnostics())
        raise
    finally:
        sweep.stop()


def wait_for(
    probe: Callable[[], Any], timeout: float, what: str, sweep: Sweep | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        if sweep is not None and sweep.proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({sweep.proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _ckpt_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except (OSError, EOFError, RuntimeError, KeyError):
        return None


def training_at(sweep: Sweep, num: int, step: int, timeout: float = 120) -> int:
    """Wait until job ``num`` saved last.ckpt at ``step`` or later; returns that step."""

    def probe() -> int | None:
        runs = list(sweep.dir.glob(f"{num}_*/checkpoints/last.ckpt"))
        got = _ckpt_step(runs[0]) if runs else None
        return got if got is not None and got >= step else None

    return wait_for(probe, timeout, f"job #{num} to save a checkpoint at step >= {step}", sweep)


def job_state(job: str) -> str:
    return _sh("squeue", "-h", "-j", job, "-o", "%T").stdout.strip()


def release(job: str, sweep: Sweep, timeout: float = 90) -> None:
    """Once ``job`` is back in the queue, let it start now (skip the requeue hold, BeginTime)."""
    wait_for(lambda: job_state(job) == "PENDING", timeout, f"job {job} to be requeued", sweep)
    _sh("scontrol", "update", f"JobId={job}", "StartTime=now", check=True)


def sacct_records(job: str) -> list[dict[str, str]]:
    """Every record of ``job`` (one per start: requeues included), oldest first."""
    fields = "JobID,State,ExitCode,Partition,Start,End"
    out = _sh("sacct", "--duplicates", "-X", "-n", "-P", "-j", job, "-o", fields).stdout
    return [dict(zip(fields.split(","), line.split("|"))) for line in out.splitlines() if line]


def finished_records(job: str, timeout: float = 60) -> list[dict[str, str]]:
    """``job``'s records once its last one is final (the sweep returns as soon as the result
    file appears, while the job's process may still be exiting)."""
    live = ("RUNNING", "PENDING", "REQUEUED", "COMPLETING", "PREEMPTED", "")

    def probe() -> list[dict[str, str]] | None:
        records = sacct_records(job)
        return records if records and records[-1]["State"] not in live else None

    return wait_for(probe, timeout, f"sacct to show job {job} finished")


def _losses(run: Path) -> dict[int, float]:
    rows = csv.DictReader((run / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def assert_same_as_reference(run: Path, summary: dict[str, Any], reference: dict[str, Any]) -> None:
    ref = reference["summary"]
    assert summary["status"] == "completed", summary.get("error")
    assert summary["run_dir"] == str(run)
    assert summary["global_step"] == ref["global_step"] == STEPS
    assert summary["best_val"] == pytest.approx(ref["best_val"], rel=1e-5)
    assert summary["test"]["test/bpb"] == pytest.approx(ref["test"]["test/bpb"], rel=1e-5)
    got, want = _losses(run), reference["losses"]
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, (
        f"metrics.csv lacks the train/loss of steps {missing} (the batch the stop signal ended?)"
        f" or has steps {extra} an uninterrupted run does not log"
    )
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), f"step {step}"


# ------------------------------------------------------------------------------ tests
@needs_data
def test_sweep_runs_under_slurm_and_report_aggregates_it(tmp_path, slurm_env):
    with explained(Sweep(tmp_path, slurm_env, "slurm_sweep", *TINY, "seed=0,1")) as sweep:
        ids = sweep.job_ids(2)
        out = sweep.wait(180)
        assert "all 2 sweep jobs completed" in out
        for num in (0, 1):
            s = sweep.summary(num)
            assert s["status"] == "completed" and s["seed"] == num and s["global_step"] == 4
            slurm = s["slurm"]  # recorded by the job itself: it ran under SLURM
            assert slurm and slurm["job_id"] == ids[num] == f"{slurm['array_job_id']}_{num}"
            assert slurm["array_task_id"] == str(num) and slurm["partition"] == "low"
            assert slurm["job_name"] == "attnlab_slurm_sweep_enwik8"
            assert s["threads"] == 1  # SLURM_CPUS_PER_TASK
            state = finished_records(ids[num])[-1]
            assert state["State"] == "COMPLETED" and state["ExitCode"] == "0:0", state
        report = subprocess.run(
            [sys.executable, "-m", "attnlab.cli", "report", str(sweep.dir), "--out",
             str(tmp_path / "report")], env=slurm_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert report.returncode == 0, report.stderr[-3000:]
        lines = report.stdout.splitlines()
        header = next(ln for ln in lines if ln.startswith("|") and "| seeds |" in ln)
        rows = [ln for ln in lines[lines.index(header) + 2 :] if ln.startswith("|")]
        seeds = [c.strip() for c in header.split("|")].index("seeds")
        assert len(rows) == 1, report.stdout  # one configuration ...
        assert rows[0].split("|")[seeds].strip() == "2", report.stdout  # ... of 2 seeds


@needs_data
def test_requeued_job_resumes_from_its_checkpoint(tmp_path, slurm_env, reference):
    sweep = Sweep(tmp_path, slurm_env, "slurm_requeue", *RESUMABLE, "seed=0", slow=True)
    with explained(sweep):
        job = sweep.job_ids(1)[0]
        at = training_at(sweep, 0, 4)
        _sh("scontrol", "requeue", job, check=True)
        release(job, sweep)
        sweep.wait(240)
        run = sweep.run_dir(0)
        summary = sweep.summary(0)
        assert summary["slurm"]["restart_count"] == 1  # the same job, started a second time
        logs = sweep.job_logs()
        assert "attnlab train: SIGTERM: saved" in logs  # the first start saved and stopped
        assert f"resume=auto: continuing the run in {run}" in logs
        assert [r["State"] for r in finished_records(job)] == ["REQUEUED", "COMPLETED"]
        assert_same_as_reference(run, summary, reference)
        print(f"requeued at step >= {at}")


@needs_data
def test_preempted_job_saves_is_requeued_and_ends_like_an_uninterrupted_run(
    tmp_path, slurm_env, reference
):
    sweep = Sweep(tmp_path, slurm_env, "slurm_preempt", *RESUMABLE, "seed=0", slow=True)
    with explained(sweep):
        job = sweep.job_ids(1)[0]
        at = training_at(sweep, 0, 4)
        # a job in the high partition that needs the whole node pre-empts the low one
        big = _sh("sbatch", "--parsable", "-p", "high", "--exclusive", "-J", "attnlab_preemptor",
                  "-o", "/dev/null", "--wrap", "sleep 2", check=True).stdout.strip()  # fmt: skip
        try:
            release(job, sweep)
            sweep.wait(240)
        finally:
            _sh("scancel", big)
        run = sweep.run_dir(0)
        summary = sweep.summary(0)
        logs = sweep.job_logs()
        line = [ln for ln in logs.splitlines() if "attnlab train: SIGTERM: saved" in ln]
        assert line and f"requeued SLURM job {job}" in line[0], line
        assert summary["slurm"]["restart_count"] >= 1
        records = finished_records(job)
        assert (
            records[0]["State"] in ("REQUEUED", "PREEMPTED") and records[-1]["State"] == "COMPLETED"
        )
        preemptor = finished_records(big)[-1]
        assert preemptor["State"] == "COMPLETED" and preemptor["Partition"] == "high"
        assert preemptor["Start"] <= records[-1]["Start"]  # it ran while ours waited
        assert_same_as_reference(run, summary, reference)
        print(f"pre-empted at step >= {at}; sacct: {records}")


@needs_data
def test_cancelled_jobs_are_reported_failed_and_the_sweep_finishes(tmp_path, slurm_env):
    """Job 2 is cancelled while it waits for a CPU, job 1 while it trains: both are reported
    failed with their SLURM state, job 0 completes, and the sweep command exits normally."""
    sweep = Sweep(tmp_path, slurm_env, "slurm_cancel", *RESUMABLE, "seed=0,1,2",
                  "hydra.launcher.array_parallelism=2", slow=True)  # fmt: skip
    with explained(sweep):
        ids = sweep.job_ids(3)
        training_at(sweep, 1, 2)
        assert job_state(ids[2]) == "PENDING"  # --array=0-2%2: two tasks at a time
        _sh("scancel", ids[2], check=True)
        _sh("scancel", ids[1], check=True)
        out = sweep.wait(240)
        assert sweep.summary(0)["status"] == "completed"
        for num in (2, 1):  # 2: the launcher alone; 1: also the job's own SIGTERM handling
            failed = sweep.summary(num)
            assert failed["status"] == "failed" and failed["seed"] == num, failed.get("error")
            assert f"SLURM job {ids[num]} ended CANCELLED" in failed["error"], failed["error"]
            assert failed["slurm"]["job_id"] == ids[num]
            assert failed["slurm"]["state"].startswith("CANCELLED")
            assert failed["run_dir"] == str(sweep.run_dir(num))
            assert f"#{num}: SchedulerJobError: SLURM job {ids[num]} ended CANCELLED" in out
        # the running job's own record (a never-started array task's sacct row can lag; its
        # state is checked above through the launcher, which read it from the scheduler)
        assert finished_records(ids[1], timeout=120)[-1]["State"].startswith("CANCELLED")
        assert "2 of 3 sweep jobs failed" in out
        report = subprocess.run(
            [sys.executable, "-m", "attnlab.cli", "report", str(sweep.dir), "--out",
             str(tmp_path / "report")], env=slurm_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert report.returncode == 0, report.stderr[-3000:]
        assert report.stdout.count("ended CANCELLED") == 2, report.stdout[-3000:]
