"""``attnlab analyze ckpt=PATH``: which heads matter, and where they look.

Head importance by ablation (Michel, Levy and Neubig 2019, "Are Sixteen Heads Really Better
than One?", section 3): each head is removed in turn by zeroing its entry of the attention
module's ``head_mask`` buffer, and the validation metric is recomputed. The *drop* is the loss
of quality: ``acc(all heads) - acc(head removed)`` for IMDb (accuracy points),
``bpb(head removed) - bpb(all heads)`` for enwik8 (bits per byte); positive = the head helps.

Attention maps: the input of every attention module is captured with a forward pre-hook on
one text, and ``attention_weights(x, padding_mask) -> (b, h, n, n)`` is plotted per layer as
a grid of heads (query rows × key columns).

Writes into ``out`` (default ``<run dir>/analysis``): ``head_importance.md``,
``head_importance.png`` (layers × heads heatmap) and ``attention_layer<i>.png``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from attnlab.attention.base import AttentionWeightsUnavailable
from attnlab.build import make_datamodule
from attnlab.evaluate import load_checkpoint, restore_task
from attnlab.tasks.base import TaskModule


@torch.no_grad()
def score(task: TaskModule, loader: Any, device: str) -> float:
    """The task's metric (:attr:`TaskModule.metric`, e.g. accuracy or bits per byte) over
    ``loader``, from the task's own per-batch scoring (:meth:`TaskModule.score`)."""
    total = count = 0.0
    for batch in loader:
        s, n = task.score({k: v.to(device) for k, v in batch.items()})
        total, count = total + s, count + n
    if count == 0:
        raise ValueError("analyze: the evaluation split is empty; raise `limit`.")
    return total / count


def head_importance(task: TaskModule, loader: Any, device: str, higher_is_better: bool) -> tuple:
    """``(base metric, drops (layers, heads))``: the metric drop when each head is masked
    (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"); positive = the head helps."""
    attns = task.model.backbone.attentions
    base = score(task, loader, device)
    sign = 1.0 if higher_is_better else -1.0  # drop = loss of quality
    drops = np.zeros((len(attns), max(a.n_heads for a in attns)))
    for layer, attn in enumerate(attns):
        for head in range(attn.n_heads):
            attn.head_mask[head] = 0.0
            try:
                drops[layer, head] = sign * (base - score(task, loader, device))
            finally:
                attn.head_mask[head] = 1.0
    return base, drops


@torch.no_grad()
def attention_maps(model: torch.nn.Module, ids: Tensor) -> list[Tensor]:
    """Per layer, the weights ``(h, n, n)`` of each attention module on ``ids: (1, n)``."""
    attns = model.backbone.attentions
    no_weights = [type(a).__name__ for a in attns if not a.has_weights]
    if no_weights:
        raise AttentionWeightsUnavailable(
            f"{no_weights[0]} reports no attention weights (has_weights=False): no maps to draw."
        )
    inputs: list[tuple] = []
    hooks = [a.register_forward_pre_hook(lambda m, args: inputs.append(args)) for a in attns]
    try:
        model(ids, torch.ones_like(ids, dtype=torch.bool))
    finally:
        for h in hooks:
            h.remove()
    return [a.attention_weights(*args)[0].float().cpu() for a, args in zip(attns, inputs)]


def _plot_importance(drops: np.ndarray, unit: str, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * drops.shape[1], 1.2 + 0.6 * drops.shape[0]))
    lim = float(np.abs(drops).max()) or 1.0
    im = ax.imshow(drops, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for (i, j), v in np.ndenumerate(drops):
        ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(drops.shape[1]))
    ax.set_yticks(range(drops.shape[0]))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label=f"metric drop when masked ({unit})")
    ax.set_title("head importance by ablation")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _plot_maps(w: Tensor, tokens: list[str], layer: int, out: Path) -> Path:
    import matplotlib.pyplot as plt

    h = w.shape[0]
    cols = min(h, 4)
    rows = math.ceil(h / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= h:
            continue
        ax.imshow(w[i].numpy(), cmap="viridis", vmin=0.0)
        ax.set_title(f"head {i}", fontsize=9)
        if len(tokens) <= 32:
            ax.axis("on")
            ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=5)
            ax.set_yticks(range(len(tokens)), tokens, fontsize=5)
    fig.suptitle(f"layer {layer}: attention weights (rows = queries, columns = keys)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """Run both analyses for ``cfg.ckpt``; print the table, write the files, return a summary."""
    import matplotlib

    matplotlib.use("Agg")
    run_cfg, ckpt = load_checkpoint(cfg.ckpt)
    run_cfg.paths.data_dir, run_cfg.paths.cache_dir = cfg.paths.data_dir, cfg.paths.cache_dir
    if cfg.split not in ("val", "test"):
        raise ValueError(f"split={cfg.split!r} is not one of ['val', 'test'].")
    if cfg.get("batch_size"):
        run_cfg.task.data.batch_size = cfg.batch_size
    task = restore_task(run_cfg, ckpt).to(cfg.device).eval()
    dm = make_datamodule(run_cfg)
    dm.limits[cfg.split] = cfg.limit  # the data module's own unit (examples, bytes)
    dm.prepare_data()
    dm.setup("fit" if cfg.split == "val" else "test")
    loader = dm.val_dataloader() if cfg.split == "val" else dm.test_dataloader()
    higher = str(run_cfg.task.monitor_mode) == "max"
    base, drops = head_importance(task, loader, cfg.device, higher)

    out = Path(cfg.out) if cfg.get("out") else Path(cfg.ckpt).resolve().parent.parent / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    metric, unit = task.metric, task.metric_unit
    header = "| layer | " + " | ".join(f"head {j}" for j in range(drops.shape[1])) + " |"
    lines = [
        f"# head importance: {cfg.ckpt}",
        "",
        f"{cfg.split}/{metric} with all heads: {base:.4f} (limit={cfg.limit}); "
        f"cells: drop in {unit} when that head is masked (positive = the head helps).",
        "",
        header,
        "|" + " --- |" * (drops.shape[1] + 1),
        *(f"| {i} | " + " | ".join(f"{v:+.4f}" for v in row) + " |" for i, row in enumerate(drops)),
    ]
    table = "\n".join(lines)
    (out / "head_importance.md").write_text(table + "\n")
    files = [_plot_importance(drops, unit, out / "head_importance.png")]

    ids, tokens = dm.example_for_maps(str(cfg.text))
    try:
        maps = attention_maps(task.model, torch.tensor([ids], device=cfg.device))
    except AttentionWeightsUnavailable as err:  # head importance stands; say why no maps
        maps = []
        print(f"attention maps: none ({err})")
    for layer, w in enumerate(maps):
        files.append(_plot_maps(w, tokens, layer, out / f"attention_layer{layer}.png"))
    print(table)
    print("wrote: " + ", ".join(str(f) for f in files))
    return {"base": base, "drops": drops, "files": files}
