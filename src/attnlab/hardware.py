"""Ask the hardware, not the author's machine: precision, threads, and a record of the machine.

DESIGN.md, convention 14. Every run resolves two settings once, at build time, from what torch
reports about the device it will run on, and records the answer in ``summary.json`` and the W&B
config:

- ``trainer.precision: auto`` -> on CPU, ``bf16-mixed`` only where the CPU computes bf16 natively
  (oneDNN bf16 support *and* AVX512_BF16 or AMX on x86), else ``32-true``: without native bf16 a
  bf16 matmul is emulated and runs ~100x slower than fp32 (measured on an AMD Zen 3: ~1 against
  ~190 GFLOP/s). On CUDA, ``bf16-mixed`` where ``torch.cuda.is_bf16_supported()``, else
  ``16-mixed`` (loss-scaled fp16). An explicit precision always wins; bf16 on a CPU without it
  gets a one-line warning.
- ``threads: auto`` -> torch intra-op threads = the cores this process may use: all of them when
  alone, ``cores // n_jobs`` under the joblib launcher, ``cpus_per_task`` under submitit/SLURM,
  ``cores // devices`` for CPU DDP (one process per device).

To see what a CPU without bf16 does on a machine that has it, run with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``: torch then vectorises with AVX2 only and
oneDNN reports no bf16 support, as on an AVX2 laptop.
"""

from __future__ import annotations

import logging
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("attnlab")

#: Lightning's precision names (``lightning.fabric.connector._PRECISION_INPUT_STR``) and aliases.
PRECISION_ALIASES = {
    "64": "64-true",
    "32": "32-true",
    "16": "16-mixed",
    "bf16": "bf16-mixed",
    "half": "16-true",
}
PRECISIONS = (
    "64-true",
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "transformer-engine",
    "transformer-engine-float16",
)


@dataclass(frozen=True)
class Choice:
    """A resolved setting and why: ``value`` (what runs) and ``reason`` (one line)."""

    value: Any
    reason: str


# --------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    """The CPU model name (what ``lscpu`` prints as "Model name"), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_capability() -> str:
    """The SIMD level ATen dispatches to (``torch.backends.cpu.get_cpu_capability()``), e.g.
    ``AVX2`` or ``AVX512``; ``ATEN_CPU_CAPABILITY`` lowers it."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # very old torch or an unusual build
        return "unknown"


def _onednn_bf16() -> bool:
    """oneDNN's answer: can it run bf16 kernels on this CPU (``ONEDNN_MAX_CPU_ISA`` lowers it)?"""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def _flag(fn_name: str) -> bool:
    fn = getattr(torch.cpu, fn_name, None)
    try:
        return bool(fn()) if callable(fn) else False
    except Exception:
        return False


def cpu_bf16() -> Choice:
    """Whether this CPU computes bf16 natively: ``Choice(bool, reason)``.

    Native means oneDNN reports bf16 support (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``)
    and, on x86, the CPU has AVX512_BF16 or AMX tiles (AVX-512 without them converts in
    software). On other architectures oneDNN's answer is taken as is.
    """
    onednn = _onednn_bf16()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    isa = _flag("_is_avx512_bf16_supported") or _flag("_is_amx_tile_supported")
    cap = cpu_capability()
    if onednn and (isa or not x86):
        return Choice(True, f"CPU has native bf16 (ATen {cap}, oneDNN bf16)")
    missing = "oneDNN reports no bf16 support" if not onednn else "no AVX512_BF16 or AMX"
    return Choice(False, f"CPU has no native bf16 (ATen {cap}, {missing})")


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def cuda_name() -> str | None:
    """Name of the current CUDA device, or ``None`` without one."""
    if not torch.cuda.is_available():
        return None
    try:
        return str(torch.cuda.get_device_name())
    except Exception:
        return "CUDA device"


def fla_version() -> str | None:
    """flash-linear-attention's version (``fla-core``) when installed, else None: whether
    ``attention.kernel=auto`` can run causal linear attention on its kernel."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("fla-core", "flash-linear-attention"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def machine_info(device_type: str = "cpu") -> dict[str, Any]:
    """What a result was measured on: CPU model, ATen CPU capability, native bf16, cores, torch
    version; on CUDA runs also the GPU name and the installed flash-linear-attention version
    (``fla``, None when absent). Recorded in ``summary.json``, W&B and bench JSON."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
        "cpu_bf16": cpu_bf16().value,
        "cores": available_cores(),
        "torch": torch.__version__,
    }
    if device_type == "cuda":
        info["gpu"] = cuda_name()
        info["gpu_bf16"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        info["fla"] = fla_version()
    return info


# --------------------------------------------------------------------------- accelerator
def device_type(accelerator: Any) -> str:
    """``"cpu"`` or ``"cuda"`` for a Lightning ``accelerator`` (``cpu``, ``gpu``, ``cuda``,
    ``auto``).

    Raises:
        ValueError: a GPU is asked for but torch sees none (e.g. a CPU-only torch build), or the
            accelerator is one attnlab does not support; the message says what to do.
    """
    acc = str(accelerator or "auto").lower()
    if acc == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if acc == "cpu":
        return "cpu"
    if acc in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "built for CUDA"
            raise ValueError(
                f"trainer.accelerator={acc} but torch {torch.__version__} ({build}) sees no CUDA "
                "GPU; run on the CPU (trainer=cpu), or on a GPU machine install a CUDA build of "
                'torch (make install TORCH_SPEC="torch==<version>" PIP_EXTRA="--index-url ...").'
            )
        return "cuda"
    raise ValueError(
        f"trainer.accelerator={accelerator!r} is not supported; use cpu, gpu (CUDA) or auto."
    )


# --------------------------------------------------------------------------- precision
def normalize_precision(value: Any) -> str:
    """Lightning's canonical name for ``value`` (``bf16`` -> ``bf16-mixed``, ``32`` ->
    ``32-true``); ``"auto"`` and ``None`` give ``"auto"``.

    Raises:
        ValueError: not a precision Lightning knows.
    """
    if value is None:
        return "auto"
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    text = PRECISION_ALIASES.get(text, text)
    if text not in PRECISIONS:
        raise ValueError(
            f"trainer.precision={value!r} is not a precision; use auto, 32-true, bf16-mixed, "
            f"16-mixed (CUDA only) or another of {list(PRECISIONS)}."
        )
    return text


def resolve_precision(requested: Any, device: str) -> Choice:
    """The precision to run with on ``device`` (``"cpu"``/``"cuda"``) and why.

    ``auto``: CPU -> ``bf16-mixed`` with native bf16 (:func:`cpu_bf16`) else ``32-true``; CUDA ->
    ``bf16-mixed`` where ``torch.cuda.is_bf16_supported()`` else ``16-mixed``. An explicit value
    is kept; bf16 on a CPU without native bf16 logs a one-line warning (it runs, ~100x slower).

    Raises:
        ValueError: an unknown precision, or fp16 (``16-mixed``/``16-true``) on the CPU, which
            Lightning would silently replace by bf16.
    """
    value = normalize_precision(requested)
    if device == "cuda":
        if value != "auto":
            return Choice(value, "as configured: trainer.precision")
        if torch.cuda.is_bf16_supported():
            return Choice("bf16-mixed", f"auto: {cuda_name()} supports bf16")
        return Choice("16-mixed", f"auto: {cuda_name()} has no bf16; fp16 with loss scaling")
    bf16 = cpu_bf16()
    if value == "auto":
        if bf16.value:
            return Choice("bf16-mixed", f"auto: {bf16.reason}")
        return Choice("32-true", f"auto: {bf16.reason}; bf16 would run ~100x slower")
    if value.startswith("16"):
        raise ValueError(
            f"trainer.precision={requested} (fp16) is not supported on the CPU (Lightning would "
            "silently run bf16 instead); use trainer.precision=auto, 32-true or bf16-mixed."
        )
    if value.startswith("bf16") and not bf16.value:
        log.warning(
            "trainer.precision=%s on a CPU without native bf16 (%s, %s): bf16 matmuls are "
            "emulated and run ~100x slower than fp32; use trainer.precision=auto or 32-true.",
            value,
            cpu_model(),
            bf16.reason,
        )
        return Choice(value, f"as configured; {bf16.reason}: expect it to be slow")
    return Choice(value, "as configured: trainer.precision")


# --------------------------------------------------------------------------- threads
def _launcher() -> dict[str, Any]:
    """The Hydra launcher config of the current job (``{}`` outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            from omegaconf import OmegaConf

            launcher = HydraConfig.get().launcher
            return OmegaConf.to_container(launcher, resolve=True) if launcher else {}
    except Exception:
        pass
    return {}


def resolve_threads(setting: Any = "auto", processes_per_machine: int = 1) -> Choice:
    """Torch intra-op threads for this process and why.

    ``setting``: a positive int, or ``"auto"``/``None``: ``SLURM_CPUS_PER_TASK`` under SLURM;
    the launcher's ``cpus_per_task`` (submitit); ``cores // n_jobs`` under the joblib launcher;
    else the cores this process may use (:func:`available_cores`) divided among
    ``processes_per_machine`` (CPU DDP processes on this machine).

    Raises:
        ValueError: ``setting`` is neither ``auto`` nor a positive integer.
    """
    if setting not in (None, "auto"):
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise ValueError(f"threads={setting!r} must be a positive integer or auto.")
        return Choice(int(setting), "as configured: threads")
    cores = available_cores()
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if os.environ.get("SLURM_JOB_ID") and slurm and slurm.isdigit():
        return Choice(max(1, int(slurm)), f"SLURM_CPUS_PER_TASK={slurm}")
    launcher = _launcher()
    target = str(launcher.get("_target_", ""))
    if launcher.get("cpus_per_task") and "submitit" in target.lower():
        n = min(cores, int(launcher["cpus_per_task"]))
        return Choice(max(1, n), f"hydra.launcher.cpus_per_task={launcher['cpus_per_task']}")
    if "joblib" in target.lower():
        n_jobs = launcher.get("n_jobs")
        jobs = cores if n_jobs in (None, -1) or int(n_jobs) <= 0 else int(n_jobs)
        return Choice(max(1, cores // jobs), f"{cores} cores / {jobs} joblib jobs")
    if processes_per_machine > 1:
        n = max(1, cores // processes_per_machine)
        return Choice(n, f"{cores} cores / {processes_per_machine} processes")
    return Choice(cores, f"all {cores} available cores")


def apply_threads(n: int) -> None:
    """Set torch's intra-op threads (and inter-op, where torch still allows it) to ``n``."""
    torch.set_num_threads(int(n))
    try:
        torch.set_num_interop_threads(int(n))
    except RuntimeError:  # only settable before the first inter-op parallel work
        pass
