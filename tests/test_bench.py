"""``attnlab bench`` at tiny sizes: the command runs and writes its JSON and plots."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from attnlab.attention.linear import causal_linear_attention
from attnlab.bench.kernels import NaiveLinear, NaiveSoftmax, naive_causal_linear

TINY = [
    "bench.attention.variants=[softmax,linear]",
    "bench.attention.d_model=32",
    "bench.attention.n_heads=2",
    "bench.attention.lengths=[16,32]",
    "bench.attention.repeats=1",
    "bench.attention.linear_chunks=[8,16]",
    "bench.attention.chunk_len=32",
    "bench.generation.positions=[1,8,16]",
    "bench.generation.window=2",
    "bench.generation.recompute_repeats=1",
    "bench.generation.d_model=32",
    "bench.generation.n_layers=1",
    "bench.training.tasks=[enwik8]",
    'bench.training.overrides=["model.d_model=32","model.n_layers=1","task.max_len=16",'
    '"task.data.batch_size=2"]',
    "bench.training.steps=3",
    "bench.training.warmup=1",
    "bench.training.rounds=1",
    "bench.training.bf16_variants=[linear]",
    "bench.training.compile_variants=[]",
    "bench.blocks.shapes=[{layers:1,heads:2,d_model:32,context:16,batch:2}]",
    "bench.blocks.steps=1",
    "bench.blocks.warmup=1",
    "bench.blocks.rounds=2",
]


def test_bench_command_writes_json_and_plots(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "attnlab.cli", "bench", f"bench.out_dir={out}", *TINY],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| target | value | threshold | met |" in proc.stdout
    res = json.loads((out / "bench.json").read_text())
    names = {(r["name"], r["causal"]) for r in res["attention"]}
    assert {
        ("softmax", False),
        ("mha", True),
        ("naive_softmax", True),
        ("naive_linear", True),
    } <= names
    assert ("naive_linear", False) not in names  # the masked quadratic reference is causal only
    ok = [r for r in res["attention"] if r["status"] == "ok"]
    assert ok and all(r["time_s"] > 0 and isinstance(r["mem_mb"], float) for r in ok)
    assert set(res["generation"]) == {
        "softmax_step",
        "softmax_recompute",
        "linear_step",
        "linear_recompute",
    }
    assert res["training"]["enwik8"]["plain_tokens_per_s"] > 0
    # the precision actually used and the machine are recorded; bf16 only where it is native
    from attnlab.hardware import cpu_bf16, cpu_capability

    want = "bf16-mixed" if cpu_bf16().value else "32-true"
    assert res["precision"]["training"] == want == res["settings"]["training"]["precision"]
    assert res["machine"]["cpu_capability"] == cpu_capability() and res["machine"]["cpu"]
    assert res["bf16_mixed"]["linear/enwik8"]["ok"] and res["bf16_mixed"]["linear/imdb"]["ok"]
    sweeps = res["chunk_sweeps"]
    assert set(sweeps) == {"linear"}  # the variants with a chunk_size (roles, not names)
    assert all(e["allclose_1e-5"] for e in sweeps["linear"]["error_vs_naive"].values())
    assert res["roles"]["linear"]["recurrent"] and not res["roles"]["softmax"]["recurrent"]
    assert {"reference", "modern", "nanogpt_like"} == set(res["blocks"][0]["rows"])
    assert res["blocks_machine"]["cpu"] and res["blocks_machine"]["dtype"] == "float32"
    assert "spawned process" in res["memory_measured_in"]
    for png in ("attention_causal.png", "attention_noncausal.png", "generation.png"):
        assert (out / png).stat().st_size > 1000


def test_naive_references_agree_with_the_variants():
    torch.manual_seed(0)
    lin = NaiveLinear(32, 2, causal=True)
    q, k, v = lin.features(torch.randn(1, 40, 32))
    torch.testing.assert_close(naive_causal_linear(q, k, v), causal_linear_attention(q, k, v, 16))
    ref = NaiveSoftmax(32, 2, causal=True)
    mha = torch.nn.MultiheadAttention(32, 2, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(ref.qkv.weight)
        mha.in_proj_bias.copy_(ref.qkv.bias)
        mha.out_proj.weight.copy_(ref.out.weight)
        mha.out_proj.bias.copy_(ref.out.bias)
    x = torch.randn(2, 12, 32)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(12)
    expected = mha(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(ref(x), expected, atol=1e-5, rtol=1e-5)


def test_roles_come_from_flags_so_a_new_variant_is_measured():
    from functools import partial

    from attnlab.attention import LinearAttention, SoftmaxAttention
    from attnlab.bench import roles
    from attnlab.bench.report import targets
    from attnlab.config import compose

    class MyRecurrent(LinearAttention):  # a new variant nobody named in the bench
        pass

    caps = roles({"mine": partial(MyRecurrent), "sdpa": partial(SoftmaxAttention)})
    assert caps["mine"] == {"supports_causal": True, "supports_step": True, "recurrent": True,
                            "chunk_size": 64}  # fmt: skip
    assert caps["sdpa"]["supports_step"] and not caps["sdpa"]["recurrent"]
    assert caps["sdpa"]["chunk_size"] is None
    limits = compose("bench", []).bench.targets
    res = {"generation": {"mine_step": {256: 1.0, 4096: 1.2}, "sdpa_step": {1024: 1.0},
                          "sdpa_recompute": {1024: 9.0}}}  # fmt: skip
    rows = {r["target"]: r for r in targets(res, limits, caps)}
    mine = rows["generation: mine (recurrent) time/token at 4096 / at 256"]
    assert mine["met"] and abs(mine["value"] - 1.2) < 1e-9
    assert rows["generation: sdpa recompute / KV cache at 1024"]["value"] == 9.0
    assert "causal mine time 8192 / 1024" in rows  # chunked: scaling targets enrolled


def test_blocks_modern_row_is_the_default_model_block():
    """The bench's ``modern`` row is built from conf/model/modern.yaml, so it cannot drift from
    the block users train by default."""
    from omegaconf import OmegaConf

    from attnlab.bench.blocks import block_options, build
    from attnlab.paths import CONF_DIR

    cfg = OmegaConf.load(CONF_DIR / "model" / "modern.yaml")
    opts = block_options("modern")
    for key in ("norm", "ffn", "positions", "prenorm", "bias"):
        assert opts[key] == cfg[key]
    assert not {"d_model", "n_layers", "n_heads", "dropout", "_target_"} & set(opts)
    shape = {"layers": 1, "heads": 2, "d_model": 16, "context": 8, "batch": 1}
    attn = build("modern", shape, 32).backbone.blocks[0].attention
    assert (attn.qkv.bias is None) == (cfg.bias is False)


def test_blocks_rounds_visit_every_order(monkeypatch):
    """Each row follows each other row equally often (orders cycle through the permutations)."""
    import attnlab.bench.blocks as blocks

    calls: list[str] = []

    def fake_make_step(model, device, dtype):
        name = model.row

        def step(x, y):
            calls.append(name)
            return torch.tensor(1.0)

        return step

    real_build = blocks.build

    def tagged_build(row, shape, vocab):
        m = real_build(row, shape, vocab)
        m.row = row
        return m

    monkeypatch.setattr(blocks, "make_step", fake_make_step)
    monkeypatch.setattr(blocks, "build", tagged_build)
    shape = {"layers": 1, "heads": 2, "d_model": 16, "context": 8, "batch": 1}
    s = {"vocab_size": 32, "rows": ["reference", "modern", "nanogpt_like"], "steps": 1,
         "settle": 0, "warmup": 0, "rounds": 6}  # fmt: skip
    blocks.compare(shape, s, torch.device("cpu"), torch.float32, log=lambda *a: None)
    rounds = [tuple(calls[i : i + 3]) for i in range(0, len(calls), 3)]
    assert len(set(rounds)) == 6  # all 3! orders
    follows = [(a, b) for r in rounds for a, b in zip(r, r[1:])]
    assert len({follows.count(p) for p in set(follows)}) == 1  # every ordered pair alike


def test_bench_rejects_an_unknown_blocks_row_before_measuring(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "attnlab.cli", "bench", f"bench.out_dir={tmp_path}",
         "bench.parts=[blocks]", "bench.blocks.rows=[reference,gpt5]"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "bench.blocks.rows" in proc.stderr + proc.stdout and "gpt5" in proc.stderr + proc.stdout
    assert not (tmp_path / "bench.json").exists()
