"""MQAR (Arora et al. 2023): the generator, the data module, the task, end to end."""

from __future__ import annotations

import json

import pytest
import torch

from attnlab.config import compose
from attnlab.tasks.mqar import IGNORE, MQARDataModule, mqar_batch
from attnlab.train import train
from tests.test_train import TINY_MODEL

TINY_MQAR = [
    "task=mqar",
    "task.max_len=16",
    "task.data.vocab_size=16",
    "task.data.num_kv_pairs=2",
    "task.data.batch_size=16",
    "task.data.train_batches_per_epoch=4",
    "task.data.num_val=32",
    "task.data.num_test=32",
    *TINY_MODEL,  # the tiny model and quiet trainer of the other end-to-end tests
    "trainer.log_every_n_steps=1",
    "trainer.max_epochs=1",
    "optim.warmup_steps=2",
]


def _cfg(tmp_path, *extra):
    return compose("train", [*TINY_MQAR, *extra], run_dir=str(tmp_path / "run"))


@pytest.mark.parametrize("kv, n", [(1, 8), (4, 32), (8, 64)])
def test_sequences_follow_the_paper(kv, n):
    g = torch.Generator().manual_seed(0)
    vocab = 64
    inputs, targets = mqar_batch(50, vocab, n, kv, 0.01, g)
    assert inputs.shape == targets.shape == (50, n)
    assert inputs.min() >= 0 and inputs.max() < vocab
    half = vocab // 2
    for x, t in zip(inputs, targets, strict=True):
        keys, values = x[0 : 2 * kv : 2], x[1 : 2 * kv : 2]
        assert len(set(keys.tolist())) == kv and keys.min() >= 1 and keys.max() < half
        assert len(set(values.tolist())) == kv and values.min() >= half
        where = (t != IGNORE).nonzero().flatten()
        assert len(where) == kv  # every key queried exactly once, after the pairs
        assert where.min() >= 2 * kv and ((where - 2 * kv) % 2 == 0).all()
        answer = dict(zip(keys.tolist(), values.tolist(), strict=True))
        for pos in where.tolist():
            assert answer[int(x[pos])] == int(t[pos])  # the query is the key; target its value


def test_power_law_puts_queries_close_and_uniform_does_not():
    def mean_gap(power_a: float) -> float:
        g = torch.Generator().manual_seed(1)
        _, targets = mqar_batch(400, 512, 256, 4, power_a, g)
        return float(((targets != IGNORE).nonzero()[:, 1] - 8).float().mean())

    close, uniform = mean_gap(0.01), mean_gap(1.0)
    assert close < 0.6 * uniform  # power_a=0.01 favours short gaps (paper, Fig. 2 setup)


def test_data_is_a_function_of_the_seed_and_the_step():
    dm = MQARDataModule(vocab_size=32, seq_len=16, num_kv_pairs=2, batch_size=4, num_val=8,
                        num_test=8, seed=3)  # fmt: skip
    again = MQARDataModule(vocab_size=32, seq_len=16, num_kv_pairs=2, batch_size=4, num_val=8,
                           num_test=8, seed=3)  # fmt: skip
    other = MQARDataModule(vocab_size=32, seq_len=16, num_kv_pairs=2, batch_size=4, num_val=8,
                           num_test=8, seed=4)  # fmt: skip
    assert torch.equal(dm.eval_set("test")[0], again.eval_set("test")[0])  # fixed per seed
    assert not torch.equal(dm.eval_set("test")[0], other.eval_set("test")[0])
    assert not torch.equal(dm.eval_set("test")[0], dm.eval_set("val")[0])
    first = [b["input_ids"] for _, b in zip(range(3), dm.train_dataloader(), strict=False)]
    second = [b["input_ids"] for _, b in zip(range(3), again.train_dataloader(), strict=False)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])  # every batch is new data
    dm.load_state_dict({"global_step": 2})  # a resume at step 2 continues with batch 2
    assert torch.equal(next(iter(dm.train_dataloader()))["input_ids"], first[2])


@pytest.mark.parametrize(
    "override, says",
    [
        ("task.data.num_kv_pairs=5", "seq_len >= 4 x num_kv_pairs"),
        ("task.data.vocab_size=5", "too small for 2 distinct keys"),
        ("task.data.power_a=0", "power_a=0"),
    ],
)
def test_impossible_shapes_fail_before_training(tmp_path, override, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):
        train(_cfg(tmp_path, override))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_accuracy_counts_query_positions_only(tmp_path):
    from attnlab.build import build_task

    task = build_task(_cfg(tmp_path), vocab_size=16).eval()
    g = torch.Generator().manual_seed(0)
    batch = task.synthetic_batch(5, 16, 16, g)
    logits, targets = task._queries(batch)
    assert logits.shape == (int((batch["targets"] != IGNORE).sum()), 16)
    hits, count = task.score(batch)
    assert count == targets.numel() and 0 <= hits <= count


def test_mqar_trains_end_to_end_and_the_loss_falls(tmp_path):
    cfg = _cfg(tmp_path, "task.data.train_batches_per_epoch=60", "optim.lr=3e-3")
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["task"] == "mqar"
    assert summary["global_step"] == 60 and 0.0 <= summary["test"]["test/acc"] <= 1.0
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    head = rows[0].split(",")
    i = head.index("train/loss")
    losses = [float(r.split(",")[i]) for r in rows[1:] if r.split(",")[i]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2  # it learns something
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["monitor"] == "val/acc"
