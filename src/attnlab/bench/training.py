"""End-to-end training throughput: Lightning against a plain PyTorch loop.

Both sides train the same task module (:func:`attnlab.build.build_task` from the default
``conf/train.yaml`` + ``task=<task>`` config, same seed) on the same synthetic batches of the
task's shape (:meth:`~attnlab.tasks.base.TaskModule.synthetic_batch`, ``batch_size x max_len``),
with the same optimiser (``optim``), gradient clipping and precision. Lightning runs the task in
a ``Trainer`` with ``max_steps`` and no logger, checkpointing, progress bar or validation; the
plain loop is the task's own loss (:meth:`~attnlab.tasks.base.TaskModule.loss`), backward, clip,
step, schedule, zero_grad under ``torch.autocast`` when the precision is ``bf16-mixed``. Tokens/s counts ``b x n`` tokens per step over the steps after ``warmup``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict
from torch import Tensor

from attnlab.build import build_task
from attnlab.config import register_resolvers
from attnlab.paths import CONF_DIR


def compose_cfg(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose ``conf/<config_name>.yaml``, inside a running Hydra app or outside one."""
    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name, overrides=list(overrides))


def train_cfg(task: str, *overrides: str) -> DictConfig:
    """The default ``attnlab train task=<task>`` config (``paths.run_dir`` unused here)."""
    cfg = compose_cfg("train", [f"task={task}", "logger=none", *overrides])
    with open_dict(cfg):
        cfg.paths.run_dir = "."
        cfg.name = "bench"
    return cfg


def synthetic_batches(cfg: DictConfig, vocab: int, steps: int) -> list[dict[str, Tensor]]:
    """``steps`` random batches shaped like the task's (``batch_size x max_len``), made by the
    task class itself (:meth:`~attnlab.tasks.base.TaskModule.synthetic_batch`)."""
    g = torch.Generator().manual_seed(0)
    b, n = int(cfg.task.data.batch_size), int(cfg.task.max_len)
    task = build_task(cfg, vocab)
    return [task.synthetic_batch(b, n, vocab, g) for _ in range(steps)]


class _Clock(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1, self.losses = warmup, None, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.t1 = time.perf_counter()
        self.losses.append(float(outputs["loss"]))


def lightning_run(cfg: DictConfig, vocab: int, batches: list, warmup: int, precision: str) -> dict:
    """Tokens/s of ``Trainer.fit`` on ``batches``; also the step losses."""
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, vocab)
    clock = _Clock(warmup)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=len(batches),
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    t0 = time.perf_counter()
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    tokens = sum(b["input_ids"].numel() for b in batches[warmup:])
    return {
        "tokens_per_s": tokens / (clock.t1 - clock.t0),
        "first_steps_s": clock.t0 - t0,
        "losses": clock.losses,
    }


def plain_run(cfg: DictConfig, vocab: int, batches: list, warmup: int, precision: str) -> dict:
    """Tokens/s of a minimal PyTorch loop on ``batches`` (same model, optimiser, clipping)."""
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, vocab).train()
    model = task.model
    opt, sched = task.optimizer_factory(model, total_steps=len(batches))
    clip = cfg.trainer.get("gradient_clip_val")
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    t0 = None
    for i, batch in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        with autocast:
            loss = task.loss(batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    tokens = sum(b["input_ids"].numel() for b in batches[warmup:])
    return {"tokens_per_s": tokens / (time.perf_counter() - t0)}


def overhead(t: dict, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Lightning vs plain tokens/s per task (rounds alternate which side goes first)."""
    out = {}
    for task in t["tasks"]:
        cfg = train_cfg(task, *t["overrides"])
        vocab = int(t["vocab_size"][task])
        batches = synthetic_batches(cfg, vocab, int(t["steps"]))
        runs: dict[str, list[float]] = {"lightning": [], "plain": []}
        for r in range(int(t["rounds"])):
            order = ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")
            for side in order:
                fn = lightning_run if side == "lightning" else plain_run
                res = fn(cfg, vocab, batches, int(t["warmup"]), t["precision"])
                runs[side].append(res["tokens_per_s"])
        light, plain = statistics.median(runs["lightning"]), statistics.median(runs["plain"])
        out[task] = {
            "lightning_tokens_per_s": light,
            "plain_tokens_per_s": plain,
            "overhead": 1 - light / plain,
            "runs": runs,
            "shape": list(batches[0]["input_ids"].shape),
        }
        log(
            f"  {task:8} lightning {light:10,.0f} tok/s  plain {plain:10,.0f} tok/s  "
            f"overhead {100 * (1 - light / plain):5.1f} %"
        )
    return out


def precision_check(variants: list[str], log: Callable[[str], None] = print) -> dict[str, dict]:
    """A few ``bf16-mixed`` Lightning steps of a tiny model per variant and task: finite loss?"""
    tiny = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "task.max_len=32",
            "task.data.batch_size=4"]  # fmt: skip
    out = {}
    for name in variants:
        for task, vocab in (("imdb", 300), ("enwik8", 256)):
            probe = train_cfg(task, f"attention={name}", *tiny)
            pos = "rope" if _uses_qk(probe) else "learned"
            cfg = train_cfg(task, f"attention={name}", f"model.positions={pos}", *tiny)
            try:
                res = lightning_run(cfg, vocab, synthetic_batches(cfg, vocab, 3), 1, "bf16-mixed")
                ok = all(torch.isfinite(torch.tensor(res["losses"])).tolist())
                out[f"{name}/{task}"] = {"ok": ok, "losses": res["losses"]}
            except Exception as err:  # noqa: BLE001 - recorded as a failure
                out[f"{name}/{task}"] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        log(f"  bf16-mixed {name:24} " + "  ".join(
            f"{k.split('/')[1]}: {'ok' if v['ok'] else 'FAILED'}"
            for k, v in out.items() if k.startswith(f"{name}/")))  # fmt: skip
    return out


def _uses_qk(cfg: DictConfig) -> bool:
    from hydra.utils import instantiate

    return instantiate(cfg.attention)(d_model=32, n_heads=2, max_len=32).uses_qk


def compile_check(t: dict, eager: dict, log: Callable[[str], None] = print) -> dict[str, dict]:
    """``model.compile=true`` on the enwik8 default model: Lightning tokens/s and the time of
    the first ``warmup`` steps (which include compilation), against ``eager`` (the same
    model's uncompiled Lightning run from :func:`overhead`, when it ran)."""
    out = {}
    default_attention = train_cfg("enwik8", *t["overrides"]).attention  # what `eager` ran
    for name in t["compile_variants"]:
        probe = train_cfg("enwik8", f"attention={name}", *t["overrides"])
        pos = "rope" if _uses_qk(probe) else "learned"
        cfg = train_cfg(
            "enwik8", f"attention={name}", f"model.positions={pos}", "model.compile=true",
            *t["overrides"],
        )  # fmt: skip
        batches = synthetic_batches(cfg, 256, int(t["compile_steps"]))
        try:
            r = lightning_run(cfg, 256, batches, int(t["warmup"]), t["precision"])
            res = {"tokens_per_s": r["tokens_per_s"], "first_steps_s": r["first_steps_s"]}
        except Exception as err:  # noqa: BLE001 - recorded as a failure
            res = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
        if probe.attention == default_attention and "enwik8" in eager:
            res["eager_tokens_per_s"] = eager["enwik8"]["lightning_tokens_per_s"]
        out[name] = res
        log(f"  compile {name}: {res}")
    return out
