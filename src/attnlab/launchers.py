"""Hydra launchers for SLURM and local submitit jobs whose sweeps finish whatever happens to a job.

``hydra/launcher=slurm`` (``conf/hydra/launcher/slurm.yaml``) and ``hydra/launcher=submitit``
(``conf/hydra/launcher/submitit.yaml``) use hydra-submitit-launcher's classes with
:class:`FinishingLauncher`'s ``launch``. Hydra instantiates launchers only from the
``hydra_plugins`` package, so the classes the configs name are
``hydra_plugins.attnlab_submitit.SlurmLauncher`` and ``...LocalLauncher``
(``src/hydra_plugins/attnlab_submitit/``); the code is here.

Upstream ``launch`` collects ``job.results()`` job after job, so the first job that ended without a
result (cancelled with ``scancel``, killed at its time limit or for memory, lost with its node,
crashed outside Python) raises submitit's ``UncompletedJobError`` in ``attnlab train -m``, which
dies with a traceback while the other jobs keep running. Here the sweep waits for every job; one
that ended without a result is reported like any failed attnlab job: its run dir gets
``summary.json`` with ``status: failed``, an ``error`` naming the scheduler's state and job id and
``slurm`` (job ids, state, exit code), unless the job wrote a final summary (completed or
failed) itself; a summary the job left as ``interrupted`` (saved, asked to be requeued, and was
not) is kept under ``previous_summary``. The sweep returns normally and logs which jobs failed. A job that returned (completed, or failed inside ``attnlab
train``, which writes its own failed summary) is collected as upstream does.

Each submission also logs ``#<job num> -> <scheduler job id> -> <run dir>`` and appends the same to
``<sweep dir>/slurm_jobs.tsv`` (``submitit_jobs.tsv`` locally): SLURM array index ``i`` of a batch
is sweep job ``initial_job_idx + i``, whose run dir starts with that number.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("attnlab")

#: at most this many seconds between two sacct polls (submitit's own cap is 600 s)
STATE_POLL_S = 30
#: characters of the job's stderr kept in a failed summary
LOG_TAIL_CHARS = 4000


class SchedulerJobError(RuntimeError):
    """A sweep job ended without a result: cancelled, killed or failed by the scheduler."""


class FinishingLauncher(BaseSubmititLauncher):
    """``launch`` that waits for every job and turns jobs without a result into failed summaries."""

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        # in the job: the attnlab_* resolvers of conf/ (the driver registered them in its process)
        from attnlab.config import register_resolvers

        register_resolvers()
        return super().__call__(*args, **kwargs)

    # -- submission -------------------------------------------------------------------------

    def _executor(self) -> Any:
        import submitit

        params = dict(self.params)
        folder = params.pop("submitit_folder")
        init = {}
        if "max_num_timeout" in params:  # an executor setting, not a job parameter
            init[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        delay, limit = params.get("signal_delay_s"), params.get("timeout_min")
        if delay is not None and limit and delay + 60 >= 60 * limit:
            log.warning(
                "signal_delay_s=%s with timeout_min=%s: SLURM times signals to within a minute, "
                "so SIGUSR2 may come as the job starts, before anything handles it, and kill it; "
                "keep signal_delay_s + 60 below the time limit",
                delay,
                limit,
            )
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=folder, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())  # keys all executors know
        executor.update_parameters(
            **{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()}
        )
        return executor

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        assert len(job_overrides) > 0
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, int(str(self.config.hydra.sweep.mode), 8))
        log.info("submitit '%s' sweep output dir: %s", self._EXECUTOR, sweep_dir)

        nums = [initial_job_idx + i for i in range(len(job_overrides))]
        args = [
            (list(ov), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state())
            for num, ov in zip(nums, job_overrides, strict=True)
        ]
        jobs = executor.map_array(self, *zip(*args, strict=True))
        run_dirs = [self._run_dir(ov, num) for ov, num in zip(job_overrides, nums, strict=True)]
        self._record(sweep_dir, jobs, nums, run_dirs, job_overrides)
        return self._collect(jobs, nums, run_dirs, job_overrides)

    def _record(self, sweep_dir, jobs, nums, run_dirs, job_overrides) -> None:  # noqa: ANN001
        table = sweep_dir / f"{'slurm' if self._EXECUTOR == 'slurm' else 'submitit'}_jobs.tsv"
        new = not table.exists()
        with table.open("a") as f:
            if new:
                f.write("job_num\tjob_id\trun_dir\toverrides\n")
            for job, num, run_dir, ov in zip(jobs, nums, run_dirs, job_overrides, strict=True):
                overrides = " ".join(filter_overrides(ov))
                log.info(
                    "\t#%d -> %s job %s -> %s : %s",
                    num,
                    self._EXECUTOR,
                    job.job_id,
                    run_dir,
                    overrides,
                )
                f.write(f"{num}\t{job.job_id}\t{run_dir}\t{overrides}\n")

    # -- collection -------------------------------------------------------------------------

    def _collect(self, jobs, nums, run_dirs, job_overrides) -> list[JobReturn]:  # noqa: ANN001
        watcher = getattr(type(jobs[0]), "watcher", None)
        if watcher is not None and getattr(watcher, "_delay_s", 0) > STATE_POLL_S:
            watcher._delay_s = STATE_POLL_S  # notice dead jobs within STATE_POLL_S, not 10 min
        results: dict[int, JobReturn] = {}
        failed: list[tuple[int, str, Path | None]] = []
        pending = list(range(len(jobs)))
        while pending:
            for i in list(pending):
                if not jobs[i].done():
                    continue
                pending.remove(i)
                results[i], error = self._result(jobs[i], nums[i], run_dirs[i], job_overrides[i])
                if error:
                    failed.append((nums[i], error, run_dirs[i]))
            if pending:
                time.sleep(1)
        n = len(jobs)
        if failed:
            lines = [
                f"  #{num}: {err}" + (f"\n      {rd}" if rd else "")
                for num, err, rd in sorted(failed)
            ]
            log.warning("%d of %d sweep jobs failed:\n%s", len(failed), n, "\n".join(lines))
        else:
            log.info("all %d sweep jobs completed", n)
        return [results[i] for i in range(n)]

    def _result(self, job, num, run_dir, overrides) -> tuple[JobReturn, str | None]:  # noqa: ANN001
        """The job's JobReturn, and its error when it failed (None when it completed)."""
        import submitit

        try:
            ret: JobReturn = job.results()[0]
        except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as exc:
            summary = self._failed_summary(job, num, run_dir, overrides, exc)
            ret = JobReturn(
                overrides=list(overrides),
                status=JobStatus.COMPLETED,  # a failed summary, as attnlab train returns one
                _return_value=summary,
                task_name=str(self.config.hydra.job.name),
                working_dir=str(run_dir) if run_dir else None,
            )
            return ret, summary.get("error", str(exc).splitlines()[0])
        if ret.status == JobStatus.COMPLETED and isinstance(ret._return_value, dict):
            value = ret._return_value
            if value.get("status") == "failed":
                return ret, str(value.get("error"))
        elif ret.status == JobStatus.FAILED:
            return ret, f"{type(ret._return_value).__name__}: {ret._return_value}"
        return ret, None

    def _scheduler_info(self, job) -> dict[str, Any]:  # noqa: ANN001
        """What the scheduler says about ``job``: ids, state and exit code."""
        info: dict[str, Any] = {"job_id": job.job_id, "state": str(job.state)}
        if self._EXECUTOR != "slurm":
            process = getattr(job, "_process", None)  # submitit's local job: its controller
            if process is not None and process.poll() is not None:
                info["exit_code"] = str(process.returncode)
            return info
        array_id, _, task_id = str(job.job_id).partition("_")
        if task_id:
            info.update(array_job_id=array_id, array_task_id=task_id)
        cmd = ["sacct", "-n", "-P", "-X", "-j", str(job.job_id), "-o", "JobIDRaw,State,ExitCode"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
            out = proc.stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            out = []
        if out:  # the fields of attnlab.interrupts.slurm_info, plus the state and exit code
            raw, state, exit_code = (out[-1].split("|") + ["", "", ""])[:3]
            info.update(raw_job_id=raw or None, state=state or info["state"], exit_code=exit_code)
        return info

    def _failed_summary(self, job, num, run_dir, overrides, exc) -> dict[str, Any]:  # noqa: ANN001
        """Write (unless the job wrote one) and return the summary of a job without a result."""
        previous = _read_summary(run_dir / "summary.json") if run_dir else None
        if previous and previous.get("status") in ("completed", "failed"):
            return previous  # the job's own word (it ended after writing it)
        info = self._scheduler_info(job)
        where = "SLURM" if self._EXECUTOR == "slurm" else "submitit local"
        err = SchedulerJobError(
            f"{where} job {info['job_id']} ended {info['state']}"
            + (f" (exit code {info['exit_code']})" if info.get("exit_code") else "")
            + f" without a result; logs: {job.paths.stderr}"
        )
        summary: dict[str, Any] = {
            "status": "failed",
            "error": f"{type(err).__name__}: {err}",
            "error_type": type(err).__name__,
        }
        with contextlib.suppress(Exception), self._job_config(overrides, num) as cfg:
            from attnlab.commands import failed_summary

            summary = failed_summary(cfg, err)
        summary["job_num"] = num
        if previous:  # e.g. "interrupted": saved and asked to be requeued, which did not happen
            summary["previous_summary"] = previous
        summary["slurm" if self._EXECUTOR == "slurm" else "submitit"] = info
        summary["log_tail"] = (
            _tail(job.paths.stderr) or _tail(job.paths.stdout) or str(exc)[-LOG_TAIL_CHARS:]
        )
        if run_dir is not None:
            summary["run_dir"] = str(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # -- the job's config and run dir, composed here as the job composes them -------------------

    @contextlib.contextmanager
    def _job_config(self, overrides: Sequence[str], num: int) -> Iterator[DictConfig]:
        """The job's composed config, with Hydra's runtime config set to it (for ``${hydra:}``)."""
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        instance = HydraConfig.instance()
        saved = instance.cfg
        try:
            instance.set_config(cfg)
            sub = OmegaConf.select(cfg, "hydra.sweep.subdir")
            run_dir = Path(str(OmegaConf.select(cfg, "hydra.sweep.dir")), str(sub)).absolute()
            with open_dict(cfg.hydra.runtime):
                OmegaConf.set_readonly(cfg.hydra, False)
                cfg.hydra.runtime.output_dir = str(run_dir)
            instance.set_config(cfg)
            yield cfg
        finally:
            instance.cfg = saved

    def _run_dir(self, overrides: Sequence[str], num: int) -> Path | None:
        try:
            with self._job_config(overrides, num) as cfg:
                return Path(cfg.hydra.runtime.output_dir)
        except Exception as err:  # a subdir naming the job id, say: unknown before it runs
            log.debug("cannot tell the run dir of job #%d: %s", num, err)
            return None


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    except OSError:
        return ""
