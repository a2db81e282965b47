"""Training tokens/s of attnlab's blocks against a nanoGPT-equivalent reference block.

Three causal language models of the same size (``L`` layers, ``H`` heads, width ``C``, context
``T``, vocabulary ``V``) train side by side on the same random batches ``(B, T)``:

- ``reference``: :class:`NanoGPT`, written here after Karpathy's nanoGPT ``model.py``
  (github.com/karpathy/nanoGPT): pre-norm ``LayerNorm`` without bias, causal
  ``F.scaled_dot_product_attention`` with one ``c_attn`` ``C -> 3C`` projection, a GELU MLP
  ``C -> 4C -> C``, learned positions, no biases anywhere, LM head tied to the token embedding;
- ``modern``: attnlab's default block, with the block options of ``conf/model/modern.yaml``
  (pre-norm RMSNorm, SwiGLU, RoPE, no biases) around ``conf/attention/softmax.yaml``, built by
  :class:`attnlab.models.Backbone`;
- ``nanogpt_like``: attnlab's ``Backbone`` with pre-norm LayerNorm, ReLU MLP 4x and learned
  positions (attnlab's defaults otherwise: biases on the attention and MLP projections);
- ``reference_control`` (optional, add it to ``bench.blocks.rows``): a second, identical
  reference model, an A/A control whose ratio to ``reference`` shows what the run resolves.

One training step = forward, cross-entropy, backward, ``clip_grad_norm_(1.0)``, ``AdamW.step``,
``zero_grad`` (dropout 0). FLOPs per token = ``6 N + 12 L H d T`` (Kaplan et al. 2020, as in
nanoGPT's ``estimate_mfu``; ``d = C / H``, ``N`` = parameters without position embeddings, tied
weights once). Rounds interleave the models, in every order in turn (``itertools.permutations``,
so each model follows each other one equally often: a model that leaves the caches or the
allocator in a state that slows the next one slows every row alike); in each round a model runs
``settle`` untimed steps and then ``steps`` timed ones (``warmup`` untimed steps per model come
first); the ratios are medians of per-round ratios, so a machine that slows down during a round
slows every model of it. Two identical reference models measured this way on a shared 2-core
CPU differ by about 2 % (the resolution of one run). Each ratio comes with a 95 % percentile
bootstrap interval of that median over the rounds (:func:`median_interval`).

CPU: fp32, ``threads`` torch threads. CUDA: ``torch.autocast`` bf16 (parameters fp32, as
Lightning's ``bf16-mixed``), SDPA restricted to the flash backend, ``torch.cuda.synchronize``
around each timed window.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attnlab.attention import SoftmaxAttention
from attnlab.models import Backbone, LanguageModel

#: ``Backbone`` settings of the attnlab rows; ``None``: the block options of
#: ``conf/model/<row>.yaml`` (:func:`block_options`), so the row is the default model's block.
ATTNLAB_BLOCKS: dict[str, dict[str, Any] | None] = {
    "modern": None,
    "nanogpt_like": {"norm": "layernorm", "ffn": "relu", "positions": "learned", "prenorm": True},
}
#: rows built as nanoGPT's model: the reference and its A/A control
REFERENCE_ROWS = ("reference", "reference_control")
ROWS = (*REFERENCE_ROWS, *ATTNLAB_BLOCKS)
#: keys of a model config that are not block options: sizes, dropout, builder keys
_NOT_BLOCK_KEYS = {"_target_", "_partial_", "compile", "d_model", "n_layers", "n_heads", "dropout"}


def block_options(row: str) -> dict[str, Any]:
    """``Backbone`` keyword arguments (norm, FFN, positions, biases, ...) of an attnlab row."""
    options = ATTNLAB_BLOCKS[row]
    if options is not None:
        return dict(options)
    from omegaconf import OmegaConf

    from attnlab.paths import CONF_DIR

    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / f"{row}.yaml"))
    return {k: v for k, v in cfg.items() if k not in _NOT_BLOCK_KEYS}


# --------------------------------------------------------------------------- the reference
class NanoGPTAttention(nn.Module):
    """nanoGPT ``CausalSelfAttention`` (bias=False, dropout 0): ``(B, T, C) -> (B, T, C)``."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=False)
        self.c_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class NanoGPTBlock(nn.Module):
    """nanoGPT ``Block``: ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``, MLP ``C -> 4C -> C`` GELU."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=False)
        self.attn = NanoGPTAttention(d_model, n_heads)
        self.ln_2 = nn.LayerNorm(d_model, bias=False)
        self.c_fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.c_proj = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT ``GPT`` (bias=False, dropout 0): ``idx: (B, T)`` -> logits ``(B, T, V)``."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_len: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.h = nn.ModuleList(NanoGPTBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model, bias=False)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        for name, p in self.named_parameters():  # nanoGPT's init
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --------------------------------------------------------------------------- the models
def build(row: str, shape: dict[str, int], vocab_size: int) -> nn.Module:
    """The model of ``row`` (one of :data:`ROWS`) at ``shape`` (``{layers, heads, d_model,
    context, batch}``), dropout 0."""
    c, h, n_layers, t = shape["d_model"], shape["heads"], shape["layers"], shape["context"]
    if row in REFERENCE_ROWS:
        return NanoGPT(vocab_size, c, n_layers, h, t)
    if row not in ATTNLAB_BLOCKS:
        raise ValueError(f"bench.blocks.rows: {row!r} is not one of {list(ROWS)}.")
    attention = partial(SoftmaxAttention, head_dim=None, dropout=0.0)  # conf/attention/softmax
    backbone = Backbone(
        vocab_size, attention, d_model=c, n_layers=n_layers, n_heads=h, max_len=t, causal=True,
        dropout=0.0, **block_options(row),
    )  # fmt: skip
    return LanguageModel(backbone, vocab_size, tie_embeddings=True)


def count_params(model: nn.Module) -> int:
    """``N``: parameters without position embeddings (``wpe``/``pos``), shared ones once."""
    seen: dict[int, int] = {}
    for name, p in model.named_parameters():
        if name.startswith("wpe.") or ".pos." in f".{name}":
            continue
        seen[id(p)] = p.numel()
    return sum(seen.values())


def flops_per_token(n_params: int, shape: dict[str, int]) -> int:
    """``6 N + 12 L H d T`` with ``H d = C`` (training: forward + backward)."""
    return 6 * n_params + 12 * shape["layers"] * shape["d_model"] * shape["context"]


# --------------------------------------------------------------------------- timing
def median_interval(
    values: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values`` (Efron & Tibshirani 1993,
    "An Introduction to the Bootstrap", ch. 13): the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of the medians of ``resamples`` resamples with replacement (seeded, so a
    ``bench.json`` can be recomputed). One value gives ``(v, v)``.

    Raises ``ValueError`` on an empty list or a ``level`` outside (0, 1).
    """
    if not values:
        raise ValueError("median_interval needs at least one value (bench.blocks.rounds >= 1).")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}.")
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    lo = meds[int((1 - level) / 2 * (resamples - 1))]
    hi = meds[int(math.ceil((1 + level) / 2 * (resamples - 1)))]
    return lo, hi


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _contexts(device: torch.device, dtype: torch.dtype) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.FLASH_ATTENTION))
    if dtype != torch.float32:
        stack.enter_context(torch.autocast(device.type, dtype=dtype))
    return stack


def make_step(model: nn.Module, device: torch.device, dtype: torch.dtype) -> Callable:
    """``step(x, y)``: one training step of ``model`` (AdamW, clipping at 1.0)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))

    def step(x: Tensor, y: Tensor) -> float:
        with _contexts(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def compare(
    shape: dict[str, int],
    s: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Interleaved rounds of ``s["steps"]`` training steps per row at ``shape``.

    Returns ``{shape, tokens_per_step, rows: {row: {params, flops_per_token, tokens_per_s,
    tflops, rounds_tokens_per_s, loss}}, ratios: {row: {tokens, flops, tokens_ci}}}`` where the
    ratios are medians over rounds of ``row / reference`` (tokens/s; FLOP/s) and ``tokens_ci``
    is the 95 % bootstrap interval of the tokens/s one (:func:`median_interval`).
    """
    vocab, rows = int(s["vocab_size"]), list(s["rows"])
    if "reference" not in rows:
        rows.insert(0, "reference")
    b, t = shape["batch"], shape["context"]
    g = torch.Generator().manual_seed(0)
    n_batches = max(1, int(s["steps"]))
    batches = [
        (torch.randint(0, vocab, (b, t), generator=g).to(device),
         torch.randint(0, vocab, (b, t), generator=g).to(device))
        for _ in range(n_batches)
    ]  # fmt: skip
    models, steps, info = {}, {}, {}
    for row in rows:
        torch.manual_seed(0)
        models[row] = build(row, shape, vocab).to(device).train()
        steps[row] = make_step(models[row], device, dtype)
        n = count_params(models[row])
        info[row] = {"params": n, "flops_per_token": flops_per_token(n, shape)}
    compile_s = {}
    for row in rows:  # warm-up (and compilation when bench.blocks.compile)
        if s.get("compile"):
            t0 = time.perf_counter()
            models[row].compile()
            compile_s[row] = None
        t0 = time.perf_counter()
        for i in range(int(s["warmup"])):
            steps[row](*batches[i % n_batches])
        _sync(device)
        if s.get("compile"):
            compile_s[row] = time.perf_counter() - t0
    per_round: dict[str, list[float]] = {row: [] for row in rows}
    losses: dict[str, float] = {}
    orders = list(itertools.permutations(rows))  # every row follows every other equally often
    settle = int(s.get("settle", 0))
    for r in range(int(s["rounds"])):
        for row in orders[r % len(orders)]:
            for i in range(settle):  # untimed: the row's caches and allocator in steady state
                steps[row](*batches[i % n_batches])
            _sync(device)
            t0 = time.perf_counter()
            for i in range(int(s["steps"])):
                loss = steps[row](*batches[i % n_batches])
            _sync(device)
            per_round[row].append(b * t * int(s["steps"]) / (time.perf_counter() - t0))
            losses[row] = float(loss.detach())
    out_rows = {}
    for row in rows:
        tok = statistics.median(per_round[row])
        out_rows[row] = {
            **info[row],
            "tokens_per_s": tok,
            "tflops": tok * info[row]["flops_per_token"] / 1e12,
            "rounds_tokens_per_s": per_round[row],
            "loss": losses[row],
            **({"compile_and_warmup_s": compile_s[row]} if compile_s else {}),
        }
    ratios = {}
    ref, ref_f = per_round["reference"], info["reference"]["flops_per_token"]
    for row in rows:
        tok = [a / c for a, c in zip(per_round[row], ref)]
        f = info[row]["flops_per_token"] / ref_f
        ratios[row] = {
            "tokens": statistics.median(tok),
            "flops": statistics.median(tok) * f,
            "tokens_ci": list(median_interval(tok)),
        }
    res = {"shape": shape, "tokens_per_step": b * t, "rows": out_rows, "ratios": ratios}
    log(format_table([res]))
    return res


def run(s: dict[str, Any], device: torch.device, dtype: torch.dtype, log=print) -> list[dict]:
    """:func:`compare` at every ``s["shapes"]``, under ``s["threads"]`` torch threads (CPU)."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and s.get("threads"):
        torch.set_num_threads(int(s["threads"]))
    try:
        return [compare(shape, s, device, dtype, log) for shape in s["shapes"]]
    finally:
        torch.set_num_threads(threads)


def shape_name(shape: dict[str, int]) -> str:
    """``L4 H4 C256 T256 B32``."""
    return (
        f"L{shape['layers']} H{shape['heads']} C{shape['d_model']} T{shape['context']} "
        f"B{shape['batch']}"
    )


def format_table(results: list[dict]) -> str:
    """Markdown table: one line per shape and row; ratios are medians of per-round ratios,
    with the tokens/s ratio's 95 % bootstrap interval."""
    lines = [
        "| shape | block | N (params) | FLOPs/token | tokens/s | TFLOP/s | tokens/s ratio "
        "| 95 % interval | FLOP/s ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for row, r in res["rows"].items():
            q = res["ratios"][row]
            lines.append(
                f"| {shape_name(res['shape'])} | {row} | {r['params']:,} | "
                f"{r['flops_per_token'] / 1e6:.2f} M | {r['tokens_per_s']:,.0f} | "
                f"{r['tflops']:.3f} | {q['tokens']:.3f} | {_interval(q)} | {q['flops']:.3f} |"
            )
    return "\n".join(lines)


def _interval(ratio: dict[str, Any]) -> str:
    ci = ratio.get("tokens_ci")  # absent in a bench.json written before it was recorded
    return "" if ci is None else f"{ci[0]:.3f} – {ci[1]:.3f}"
