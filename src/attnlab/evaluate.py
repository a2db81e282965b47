"""``attnlab evaluate`` and ``attnlab generate``: rebuild a model from a checkpoint.

A checkpoint stores the resolved run config (``attnlab_config``), so the data
pipeline and the model are rebuilt exactly as trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from attnlab.build import build_task, make_datamodule
from attnlab.checkpointing import state_dict_mismatch
from attnlab.hardware import device_type, resolve_precision
from attnlab.resume import read_checkpoint
from attnlab.tasks.base import TaskModule, fill_metric_states


def load_checkpoint(path: str | Path) -> tuple[DictConfig, dict[str, Any]]:
    """Read a checkpoint; return its run config and the raw checkpoint dict.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated, corrupt or not an attnlab checkpoint.
    """
    ckpt = read_checkpoint(path)
    return OmegaConf.create(ckpt["attnlab_config"]), ckpt


def restore_task(run_cfg: DictConfig, ckpt: dict[str, Any]) -> TaskModule:
    """Rebuild the task module from its config and load the checkpoint's weights."""
    task = build_task(run_cfg, int(run_cfg.vocab_size))
    fill_metric_states(task, ckpt["state_dict"])
    try:
        task.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ValueError(state_dict_mismatch(task.state_dict(), ckpt["state_dict"])) from err
    return task.eval()


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score ``cfg.split`` (test | val) of the checkpoint's task; print and return the metrics."""
    if cfg.split not in ("test", "val"):
        raise ValueError(f"split={cfg.split!r} is not one of ['test', 'val'].")
    run_cfg, ckpt = load_checkpoint(cfg.ckpt)
    run_cfg.paths.data_dir = cfg.paths.data_dir
    run_cfg.paths.cache_dir = cfg.paths.cache_dir
    if cfg.get("batch_size"):
        run_cfg.task.data.batch_size = cfg.batch_size
    task = restore_task(run_cfg, ckpt)
    dm = make_datamodule(run_cfg)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    device = device_type(trainer_cfg.get("accelerator", "auto"))
    trainer_cfg["precision"] = resolve_precision(trainer_cfg.get("precision", "auto"), device).value
    trainer = pl.Trainer(**trainer_cfg, logger=False)
    run = trainer.test if cfg.split == "test" else trainer.validate
    metrics = {k: float(v) for k, v in run(task, datamodule=dm)[0].items()}
    print(json.dumps({"ckpt": str(cfg.ckpt), "split": cfg.split, **metrics}, indent=2))
    return metrics


def generate(cfg: DictConfig) -> str:
    """Sample ``cfg.max_new_tokens`` bytes after ``cfg.prompt``; print and return the text.

    Raises:
        ValueError: ``max_new_tokens`` < 0, a CUDA ``device`` that torch cannot see, a
            classification checkpoint, or bad sampling settings.
    """
    n_new = cfg.max_new_tokens
    if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {n_new!r}.")
    device = str(cfg.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device={device} but torch {torch.__version__} sees no CUDA GPU; use device=cpu."
        )
    run_cfg, ckpt = load_checkpoint(cfg.ckpt)
    task = restore_task(run_cfg, ckpt).to(cfg.device)
    if not hasattr(task.model, "generate"):
        raise ValueError(
            f"{cfg.ckpt} is a {run_cfg.task.name} model ({type(task).__name__}) with no "
            f"generate(); generate needs a language model (train one with task=enwik8)."
        )
    context = int(run_cfg.task.max_len)
    prompt = str(cfg.prompt).encode("utf-8")[-context:] or b"\n"
    ids = torch.tensor(list(prompt), dtype=torch.long, device=cfg.device)[None]
    gen = torch.Generator(device=cfg.device).manual_seed(int(cfg.seed))
    out = task.model.generate(
        ids,
        int(cfg.max_new_tokens),
        float(cfg.temperature),
        cfg.top_k,
        use_cache=bool(cfg.use_cache),
        generator=gen,
    )
    text = bytes(out[0, ids.shape[1] :].tolist()).decode("utf-8", errors="replace")
    print(str(cfg.prompt) + text)
    return text
