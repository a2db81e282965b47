"""Forward+backward time and peak memory of one attention layer against sequence length.

Every variant in ``conf/attention`` is built from its YAML partial (as the backbone
does) and timed beside three references on the same input ``x: (b, n, D)``:

- ``mha``: PyTorch ``nn.MultiheadAttention`` (``batch_first``, causal via ``attn_mask``);
- ``naive_softmax``: ``softmax(Q Kᵀ / sqrt(d)) V`` with the ``(b, h, n, n)`` weights
  materialised, as in Bloem's "Transformers from scratch";
- ``naive_linear`` (causal only): the masked quadratic form of causal linear attention,
  ``out_i = sum_{j<=i} (phi(q_i)·phi(k_j)) v_j / (sum_{j<=i} phi(q_i)·phi(k_j) + eps)``
  (Katharopoulos et al. 2020, eq. 9), on the same features as ``linear``.

Memory (MiB) is the *additional* peak of one forward+backward: on CPU the growth of
the peak resident set size (``ru_maxrss``) of a child forked by :class:`MemoryProbe` -- a
process of its own, spawned once, with glibc's mmap threshold fixed, so the process that
times never changes its allocator -- over the child's RSS at the fork (activations, temporaries, gradients; inputs and parameters live in the
parent and are not counted; allocator/library workspaces are), minus the growth of
a child that runs a trivial 8x8 linear fwd+bwd (library/autograd start-up); on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import resource
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from attnlab.attention.base import split_heads
from attnlab.attention.linear import LinearAttention, causal_linear_attention


class NaiveSoftmax(nn.Module):
    """Materialised ``softmax(Q Kᵀ/sqrt(d)) V`` with q/k/v/out projections (reference)."""

    def __init__(self, d_model: int, n_heads: int, causal: bool) -> None:
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (split_heads(t, self.n_heads) for t in self.qkv(x).chunk(3, -1))  # (b, h, n, d)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (b, h, n, n)
        if self.causal:
            n = x.shape[1]
            future = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, -math.inf)
        out = torch.softmax(scores, -1) @ v  # (b, h, n, d)
        return self.out(out.transpose(1, 2).reshape(x.shape))


def naive_causal_linear(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """Masked quadratic form of causal linear attention on features ``(b, h, n, d)``."""
    scores = (q @ k.transpose(-2, -1)).tril()  # (b, h, n, n)
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


class NaiveLinear(LinearAttention):
    """``LinearAttention`` whose causal sums use the naive ``(n, n)`` masked form."""

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        q, k, v = self.features(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = naive_causal_linear(q, k, v, self.eps)
        return self.out(self.merge(out).to(x.dtype))


class MHA(nn.Module):
    """``nn.MultiheadAttention`` behind the ``x -> y`` interface (causal via a float mask)."""

    def __init__(self, d_model: int, n_heads: int, causal: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.causal = causal

    def forward(self, x: Tensor) -> Tensor:
        if not self.causal:
            return self.mha(x, x, x, need_weights=False)[0]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.mha(x, x, x, attn_mask=mask.to(x.dtype), is_causal=True, need_weights=False)[0]


def build_modules(
    partials: dict[str, Callable[..., nn.Module]],
    references: list[str],
    d_model: int,
    n_heads: int,
    n: int,
    causal: bool,
    rope: bool,
) -> dict[str, nn.Module]:
    """Variants (from their partials) and references, for one length and causal setting."""
    mods: dict[str, nn.Module] = {}
    for name, part in partials.items():
        mods[name] = part(d_model=d_model, n_heads=n_heads, causal=causal, max_len=n, rope=rope)
    if "mha" in references:
        mods["mha"] = MHA(d_model, n_heads, causal)
    if "naive_softmax" in references:
        mods["naive_softmax"] = NaiveSoftmax(d_model, n_heads, causal)
    if "naive_linear" in references and causal:
        mods["naive_linear"] = NaiveLinear(d_model, n_heads, causal=True)
    return mods


def fwd_bwd(mod: nn.Module, x: Tensor, grad: Tensor) -> None:
    """One forward and backward pass; gradients are dropped afterwards."""
    mod(x).backward(grad)
    x.grad = None
    mod.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds taken by ``fn()`` (CUDA synchronised)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(fn: Callable[[], None], conn) -> None:  # runs in the forked process
    try:
        torch.set_num_threads(1)  # OpenMP pools are not fork-safe; memory is thread-independent
        start = _rss_mb()
        fn()
        conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start)
    except BaseException as err:  # report, never hang the parent
        conn.send(f"{type(err).__name__}: {err}")
    finally:
        conn.close()


def peak_memory_mb(
    fn: Callable[[], None], device: torch.device, timeout: float = 300
) -> float | str:
    """Additional peak memory (MiB) of ``fn()``, or a string saying why it was not measured.

    CUDA: the allocator's peak in this process. CPU: a child forked from *this* process; call it
    from a :class:`MemoryProbe` (which has fixed glibc's mmap threshold), not from a process that
    times, or the child may reuse pages already resident at the fork and undercount.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, send))
    proc.start()
    send.close()
    result: float | str = f"child exited with code {proc.exitcode}"
    if recv.poll(timeout):
        try:
            result = recv.recv()
        except EOFError:
            pass
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
        result = f"timed out after {timeout} s"
    elif isinstance(result, str) and proc.exitcode:
        result = f"child exited with code {proc.exitcode}"
    return result


def _memory_server(conn) -> None:  # runs in the spawned MemoryProbe process
    fixed = fixed_mmap_threshold()
    torch.set_num_threads(1)
    conn.send(fixed)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        fn, timeout = job
        try:
            conn.send(peak_memory_mb(fn, torch.device("cpu"), timeout))
        except BaseException as err:  # noqa: BLE001 - reported, the server goes on
            conn.send(f"{type(err).__name__}: {err}")


class MemoryProbe:
    """CPU peak-memory measurements in a process of their own (DESIGN: a benchmark never
    measures memory in the process that times).

    A ``spawn``-ed server process fixes glibc's mmap threshold (:func:`fixed_mmap_threshold`) and,
    for each ``probe(fn)``, receives the pickled ``fn`` (a module, its input and gradient) and
    forks a child that runs it (:func:`peak_memory_mb`). The timing process keeps glibc's default
    allocator behaviour. Use as a context manager; ``fixed_mmap_threshold`` says whether the
    server could set it.
    """

    def __init__(self, timeout: float = 300) -> None:
        ctx = mp.get_context("spawn")
        self.timeout = timeout
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_memory_server, args=(child,))  # forks: not a daemon
        self._proc.start()
        child.close()
        self.fixed_mmap_threshold = bool(self._conn.recv()) if self._conn.poll(120) else False

    def __call__(self, fn: Callable[[], None]) -> float | str:
        """Additional peak MiB of ``fn()`` (picklable), or why it was not measured."""
        if not self._proc.is_alive():
            return "memory probe process is not running"
        try:
            self._conn.send((fn, self.timeout))
        except Exception as err:  # noqa: BLE001 - e.g. an unpicklable module
            return f"not measured: {type(err).__name__}: {err}"
        if self._conn.poll(self.timeout + 30):
            try:
                return self._conn.recv()
            except EOFError:
                pass
        return "memory probe process did not answer"

    def close(self) -> None:
        """Stop the server process."""
        with contextlib.suppress(Exception):
            self._conn.send(None)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()

    def __enter__(self) -> MemoryProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fixed_mmap_threshold(nbytes: int = 1 << 16) -> bool:
    """Make glibc serve allocations >= ``nbytes`` with mmap and return them on free.

    Otherwise glibc raises its mmap threshold after large frees and keeps freed memory
    on its free lists, where a forked child reuses pages already resident at the fork
    and its RSS growth undercounts. Returns False where glibc's ``mallopt`` is missing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, nbytes)) and bool(libc.mallopt(-1, nbytes))  # MMAP, TRIM
    except (OSError, AttributeError):
        return False


def _trivial_fwd_bwd() -> None:
    x = torch.randn(1, 8, requires_grad=True)
    nn.Linear(8, 8)(x).sum().backward()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def sweep(
    partials: dict[str, Callable[..., nn.Module]],
    a: dict,
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None] = print,
    probe: MemoryProbe | None = None,
) -> list[dict]:
    """Time (s, median of ``repeats``) and memory of every module at every length.

    CPU memory is measured by ``probe`` (a :class:`MemoryProbe`; one is started for the sweep
    when None), never in this process.

    Modules whose warm-up call exceeds ``max_call_s`` are timed once, not ``repeats`` times.
    Returns rows ``{name, causal, n, time_s | None, mem_mb, status}``; ``status`` is
    ``ok``, ``oom``, ``skipped: ...`` (slower than ``max_call_s`` at a shorter length)
    or an error message.
    """
    if a["memory"] and device.type == "cpu" and probe is None:
        with MemoryProbe() as own:
            return sweep(partials, a, device, dtype, log, own)
    measure = (
        probe
        if device.type == "cpu" and probe is not None
        else partial(peak_memory_mb, device=device)
    )
    rows: list[dict] = []
    # what a child grows by for a trivial fwd+bwd (autograd engine, BLAS workspaces): subtracted
    baseline = measure(_trivial_fwd_bwd) if a["memory"] else 0.0
    baseline = baseline if isinstance(baseline, float) else 0.0
    log(f"  memory baseline (child running a trivial fwd+bwd): {baseline:.1f} MiB, subtracted")
    for causal in a["causal"]:
        stopped: dict[str, str] = {}
        for n in a["lengths"]:
            torch.manual_seed(0)
            mods = build_modules(
                partials, a["references"], a["d_model"], a["n_heads"], n, causal, a["rope"]
            )
            x = torch.randn(a["batch"], n, a["d_model"], device=device, dtype=dtype)
            x.requires_grad_(True)
            grad = torch.randn_like(x)
            live: dict[str, Callable[[], None]] = {}
            slow: set[str] = set()
            result: dict[str, dict] = {}
            for name, mod in mods.items():
                row = {"name": name, "causal": causal, "n": n, "time_s": None, "mem_mb": None}
                result[name] = row
                if name in stopped:
                    row["status"] = stopped[name]
                    continue
                mod.to(device=device, dtype=dtype).train()
                call = partial(fwd_bwd, mod, x, grad)
                try:
                    for _ in range(a["warmup"]):
                        warm = time_call(call, device)
                    live[name] = call
                    if a["warmup"] and warm > a["max_call_s"]:  # slow: one timed repeat only
                        slow.add(name)
                    row["status"], row["times"] = "ok", []
                except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
                    row["status"] = "oom" if _is_oom(err) else f"{type(err).__name__}: {err}"
                    stopped[name] = f"skipped: {row['status']} at n={n}"
            for r in range(a["repeats"]):  # interleaved: each repeat runs every module once
                for name, call in live.items():
                    if r == 0 or name not in slow:
                        result[name]["times"].append(time_call(call, device))
            for name, call in live.items():
                row = result[name]
                row["time_s"] = statistics.median(row.pop("times"))
                if a["memory"]:
                    mem = measure(call)
                    row["mem_mb"] = mem - baseline if isinstance(mem, float) else mem
                if row["time_s"] > a["max_call_s"]:
                    stopped[name] = f"skipped: {row['time_s']:.2f} s > max_call_s at n={n}"
            for row in result.values():
                rows.append(row)
                t = "-" if row["time_s"] is None else f"{row['time_s'] * 1e3:9.2f} ms"
                m = row["mem_mb"]
                m = f"{m:8.1f} MiB" if isinstance(m, float) else "-"
                log(
                    f"  causal={causal!s:5} n={n:6} {row['name']:24} {t:>12} {m:>12}  {row['status']}"
                )
            del mods, live  # free the modules before the next length
    return rows


def chunk_sweep(
    factory: Callable[..., nn.Module], a: dict, device: torch.device, dtype: torch.dtype
) -> dict:
    """Causal linear attention at ``chunk_len``: fwd+bwd seconds per ``chunk_size`` and the
    fp32 agreement of the chunked sums with the naive masked quadratic form."""
    n, out = a["chunk_len"], {"n": a["chunk_len"], "time_s": {}}
    torch.manual_seed(0)
    x = torch.randn(a["batch"], n, a["d_model"], device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    mods = {}
    for c in a["linear_chunks"]:
        torch.manual_seed(0)
        mods[c] = factory(
            d_model=a["d_model"], n_heads=a["n_heads"], causal=True, max_len=n, chunk_size=c
        )
        mods[c].to(device=device, dtype=dtype)
        fwd_bwd(mods[c], x, grad)
    times: dict[int, list[float]] = {c: [] for c in mods}
    for _ in range(a["repeats"]):
        for c, mod in mods.items():
            times[c].append(time_call(partial(fwd_bwd, mod, x, grad), device))
    out["time_s"] = {int(c): statistics.median(t) for c, t in times.items()}
    if not hasattr(next(iter(mods.values())), "features"):  # not a feature-map linear variant
        return out
    with torch.no_grad():
        mod = next(iter(mods.values())).float()
        q, k, v = mod.features(x.detach().float())
        ref = naive_causal_linear(q, k, v, mod.eps)
        err = {}
        for c in mods:
            chunked = causal_linear_attention(q, k, v, c, mod.eps)
            err[int(c)] = {
                "max_abs": float((chunked - ref).abs().max()),
                "allclose_1e-5": bool(torch.allclose(chunked, ref, atol=1e-5, rtol=1e-5)),
            }
    out["error_vs_naive"] = err
    return out
