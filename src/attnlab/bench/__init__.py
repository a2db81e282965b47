"""``attnlab bench``: speed and memory of the attention variants, decoding and training.

``run_bench(cfg)`` (cfg = ``conf/bench.yaml``) runs, in order:

1. :mod:`.kernels` -- one attention layer's forward+backward time and peak memory against
   sequence length for every ``conf/attention/*.yaml`` variant and the references
   (``nn.MultiheadAttention``, naive materialised softmax, naive masked causal linear);
   plus a ``chunk_size`` sweep of causal linear attention;
2. :mod:`.generation` -- time per generated token against position;
3. :mod:`.training` -- Lightning vs plain-loop tokens/s on the default models, bf16-mixed
   on every variant, ``model.compile=true`` on ``compile_variants``;
4. :mod:`.blocks` -- training tokens/s of attnlab's modern block and of a nanoGPT-like attnlab
   block against a nanoGPT-equivalent reference, interleaved rounds, at ``bench.blocks.shapes``.

``bench.parts`` picks which run (all by default); ``bench.parts=[blocks] bench.device=cuda``
runs only the block comparison on a GPU (bf16 autocast, flash SDPA). CPU memory is measured in a
process of its own (:class:`.kernels.MemoryProbe`), never in the one that times.

It writes ``bench.json`` and PNG plots into ``bench.out_dir``, prints the table of
targets (:func:`.report.format_targets`) and returns the results dict.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from attnlab.bench import blocks, generation, kernels, report, training
from attnlab.config import available
from attnlab.hardware import machine_info, resolve_precision

PARTS = ("attention", "generation", "training", "blocks")


def settings(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.bench`` as a plain dict, with ``cfg.quick`` merged in when ``bench.quick``."""
    b = OmegaConf.to_container(cfg.bench, resolve=True)
    if b.get("quick"):
        for section, over in OmegaConf.to_container(cfg.quick, resolve=True).items():
            b[section].update(over)
    if b["device"] == "cuda" and b.get("blocks", {}).get("cuda"):
        b["blocks"].update(b["blocks"]["cuda"])
    return b


def machine(device: torch.device, dtype: torch.dtype, precision: str) -> dict[str, Any]:
    """What the numbers were measured on: CPU model, torch CPU capability, cores, torch threads,
    precision (and GPU name), for ``bench.json``."""
    return {
        **machine_info(device.type),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "training_precision": precision,
    }


def attention_partials(names: list[str]) -> dict[str, Any]:
    """``{variant: partial}`` instantiated from ``conf/attention/<variant>.yaml``."""
    return {n: instantiate(training.compose_cfg(f"attention/{n}", []).attention) for n in names}


def roles(partials: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What each variant can do, read from a small instance's capability flags and attributes:
    ``supports_causal``, ``supports_step``, ``recurrent`` (a fixed-size decoding state) and
    ``chunk_size`` (None when it has none). The bench picks every role from these, never from
    a variant's name."""
    out = {}
    for name, part in partials.items():
        m = part(d_model=16, n_heads=2, causal=False, max_len=8)
        out[name] = {
            "supports_causal": bool(m.supports_causal),
            "supports_step": bool(m.supports_step and m.supports_causal),
            "recurrent": bool(getattr(m, "recurrent", False)),
            "chunk_size": getattr(m, "chunk_size", None),
        }
    return out


def run_bench(cfg: DictConfig) -> dict[str, Any]:
    """Run the benchmark described by ``cfg.bench``; returns (and writes) the results.

    Raises:
        ValueError: ``bench.device`` is not cpu/cuda, or cuda is asked for but absent,
            a listed variant has no ``conf/attention`` file, or a ``bench.blocks.rows`` entry
            is not one of :data:`attnlab.bench.blocks.ROWS`.
    """
    b = settings(cfg)
    parts = list(b.get("parts") or PARTS)
    if set(parts) - set(PARTS):
        raise ValueError(f"bench.parts: {sorted(set(parts) - set(PARTS))} not in {list(PARTS)}.")
    if b["device"] not in ("cpu", "cuda"):
        raise ValueError(f"bench.device must be cpu or cuda, got {b['device']!r}.")
    if b["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench.device=cuda but torch sees no GPU; use bench.device=cpu.")
    device = torch.device(b["device"])
    dtype = getattr(torch, b["dtype"] or ("bfloat16" if device.type == "cuda" else "float32"))
    if "blocks" in parts:
        bad_rows = sorted(set(b["blocks"]["rows"]) - set(blocks.ROWS))
        if bad_rows:
            raise ValueError(f"bench.blocks.rows: {bad_rows} not in {list(blocks.ROWS)}.")
    names = b["attention"]["variants"] or available("attention")
    unknown = sorted(set(names) - set(available("attention")))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; available: {available('attention')}.")
    out_dir = Path(b["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(b["seed"])
    if b["threads"]:
        torch.set_num_threads(int(b["threads"]))
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    start = time.perf_counter()
    t = b["training"]
    precision = resolve_precision(t["precision"], "cpu")  # the training part runs on the CPU
    t["precision"] = precision.value
    print(f"== training precision {precision.value} ({precision.reason})")
    res: dict[str, Any] = {
        "machine": machine(device, dtype, precision.value),
        "precision": {"training": precision.value, "reason": precision.reason},
        "settings": b,
        "memory_measured_in": "a spawned process (kernels.MemoryProbe), not the timing process",
        "dtype": str(dtype),
        "parts": parts,
    }
    print(f"== machine: {res['machine']}")
    partials = attention_partials(names)
    caps = roles(partials)
    res["roles"] = caps
    a = b["attention"]
    if "attention" in parts:
        print(f"== attention fwd+bwd: batch {a['batch']}, d_model {a['d_model']}, "
              f"{a['n_heads']} heads, {dtype}, {device}")  # fmt: skip
        res["attention"] = kernels.sweep(partials, a, device, dtype)
        chunked = [n for n, r in caps.items() if r["chunk_size"] is not None]
        if a["linear_chunks"] and chunked:
            res["chunk_sweeps"] = {}
            for name in chunked:  # every variant with a chunk_size
                sweep = kernels.chunk_sweep(partial(partials[name], rope=False), a, device, dtype)
                res["chunk_sweeps"][name] = sweep
                print(f"  {name} chunk sweep at n={a['chunk_len']}: {sweep}")
    g = b["generation"]
    if "generation" in parts and g["positions"]:
        step = [n for n, r in caps.items() if r["supports_step"]]
        chosen = g.get("variants") or step  # null: every variant with a decoding step
        print(f"== generation: time per token ({', '.join(chosen)})")
        res["generation"] = generation.generation({n: partials[n] for n in chosen}, g)
    if "training" in parts:
        if device.type == "cpu" and t["tasks"]:
            print(f"== training tokens/s, Lightning vs plain loop ({t['precision']})")
            res["training"] = training.overhead(t)
        if t["bf16_variants"] is not False:
            res["bf16_mixed"] = training.precision_check(t["bf16_variants"] or names)
        if t["compile_variants"]:
            print("== model.compile=true")
            res["compile"] = training.compile_check(t, res.get("training", {}))
    if "blocks" in parts and b["blocks"]["shapes"]:
        k = b["blocks"]
        print(f"== blocks: training tokens/s against the nanoGPT-equivalent reference ({dtype}, "
              f"{device}, {k['threads'] if device.type == 'cpu' else ''} threads, "
              f"{k['rounds']} rounds x {k['steps']} steps)")  # fmt: skip
        res["blocks"] = blocks.run(k, device, dtype)
        res["blocks_machine"] = {**machine(device, dtype, str(dtype)), "threads": k["threads"]}
        print(blocks.format_table(res["blocks"]))
    res["targets"] = report.targets(res, b["targets"], caps)
    res["wall_time_s"] = time.perf_counter() - start
    (out_dir / "bench.json").write_text(json.dumps(res, indent=1, default=str))
    if res.get("attention"):
        report.plot_attention(res["attention"], out_dir)
    if res.get("generation"):
        report.plot_generation(res["generation"], out_dir)
    print(f"\n== targets ({res['machine']['cpu']}, {res['wall_time_s']:.0f} s)")
    print(report.format_targets(res["targets"]))
    print(f"results: {out_dir / 'bench.json'}")
    return res
