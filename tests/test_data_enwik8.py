"""enwik8 data module: the real prefix (skipped if absent) and small synthetic byte files."""

from __future__ import annotations

import hashlib
import logging
import math
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import attnlab.data.enwik8 as enwik8_mod
from attnlab.data.enwik8 import (
    ENWIK8_URL,
    Enwik8DataModule,
    SlidingWindowDataset,
    split_offsets,
    verify_sha256,
)
from attnlab.metrics import bits_per_byte
from attnlab.paths import default_data_dir

_BASE = default_data_dir()
PREFIX = Path(_BASE) / "enwik8" / "enwik8-prefix" if _BASE else None
needs_prefix = pytest.mark.skipif(
    PREFIX is None or not PREFIX.is_file(),
    reason="no enwik8-prefix: set ATTNLAB_DATA_DIR to a directory holding enwik8/",
)


def write_bytes(path: Path, n: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    payload = bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())
    path.write_bytes(payload)
    return payload


def test_split_offsets():
    assert split_offsets(100_000_000) == {
        "train": (0, 90_000_000),
        "val": (90_000_000, 95_000_000),
        "test": (95_000_000, 100_000_000),
    }
    n = 4_154_064
    s = split_offsets(n)
    assert s["train"] == (0, int(0.9 * n)) and s["val"][1] - s["val"][0] == int(0.05 * n)
    assert s["test"][1] == n


@needs_prefix
def test_real_prefix(caplog):
    with caplog.at_level(logging.WARNING, logger="attnlab.data.enwik8"):
        enwik8_mod._warned_partial.clear()
        dm = Enwik8DataModule(context=32, batch_size=4, train_batches_per_epoch=5)
        dm.setup("fit")
    assert "not the full enwik8 (4154064 bytes)" in caplog.text
    assert dm.path == PREFIX and len(dm.data) == 4_154_064 and dm.vocab_size == 256
    assert dm.splits == split_offsets(4_154_064)
    assert bytes(dm.data[:5].tolist()) == PREFIX.read_bytes()[:5]
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    for b in batches:
        assert b["input_ids"].shape == b["targets"].shape == (4, 32)
        assert b["input_ids"].dtype == b["targets"].dtype == torch.long
        assert torch.equal(b["input_ids"][:, 1:], b["targets"][:, :-1])
    ds = dm.train_dataloader().dataset
    starts = [ds.batch_starts(g) for g in range(5)]
    assert max(int(x.max()) for x in starts) + 33 <= dm.splits["train"][1]
    s = int(starts[0][0])
    assert torch.equal(ds[0]["targets"], dm.data[s + 1 : s + 33].long())


def test_train_batches_are_a_function_of_seed_and_global_step(tmp_path):
    write_bytes(tmp_path / "bytes.bin", 5000)

    def batches(seed: int, step: int, world: int = 1, rank: int = 0) -> list[torch.Tensor]:
        dm = Enwik8DataModule(
            path=str(tmp_path / "bytes.bin"),
            context=16,
            batch_size=4,
            train_batches_per_epoch=3,
            seed=seed,
        )
        dm.trainer = SimpleNamespace(
            global_step=step, world_size=world, global_rank=rank, accumulate_grad_batches=1
        )
        return [b["input_ids"] for b in dm.train_dataloader()]

    a = batches(0, 0)
    assert len(a) == 3 and all(x.shape == (4, 16) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, batches(0, 0)))  # same seed: same batches
    assert not torch.equal(torch.stack(a), torch.stack(batches(1, 0)))  # other seed: others
    later = batches(0, 2)  # resuming at step 2 (epoch 0 or not) gives steps 2, 3, 4
    assert torch.equal(later[0], a[2]) and not torch.equal(later[1], a[2])
    assert torch.equal(batches(0, 3)[0], later[1])
    # DDP: the ranks split each global batch; a restored step counts before the trainer's
    r0, r1 = batches(0, 0, world=2, rank=0), batches(0, 0, world=2, rank=1)
    assert len(r0) == len(r1) == 3 and not torch.equal(r0[0], r1[0])
    dm = Enwik8DataModule(path=str(tmp_path / "bytes.bin"), context=16, batch_size=4)
    dm.load_state_dict({"global_step": 7})
    assert dm._train_start_step() == 7
    dm.teardown("fit")
    assert dm._train_start_step() == 0


def test_gradient_accumulation_is_refused(tmp_path):
    write_bytes(tmp_path / "bytes.bin", 5000)
    dm = Enwik8DataModule(path=str(tmp_path / "bytes.bin"), context=16, batch_size=4)
    dm.trainer = SimpleNamespace(
        global_step=0, world_size=1, global_rank=0, accumulate_grad_batches=2
    )
    with pytest.raises(ValueError, match="accumulate_grad_batches=2.*batch_size"):
        dm.train_dataloader()


def check_exactly_once(
    data: torch.Tensor, ds: SlidingWindowDataset, start: int, end: int, context: int
) -> None:
    scored: list[int] = []
    total = 0
    for i in range(len(ds)):
        item = ds[i]
        x, y, m = item["input_ids"], item["targets"], item["loss_mask"]
        assert x.shape == y.shape == m.shape == (context,) and m.dtype == torch.bool
        b = int(ds.windows[i][1])
        t0 = max(1, b - context)
        n = b - t0
        assert torch.equal(y[:n], data[t0:b].long()) and torch.equal(
            x[:n], data[t0 - 1 : b - 1].long()
        )
        assert not m[n:].any() and (x[n:] == 0).all() and (y[n:] == 0).all()
        scored.extend(torch.arange(t0, b)[m[:n]].tolist())
        total += int(m.sum())
    p0 = max(start, 1)
    assert total == end - p0 == len(scored)
    assert sorted(scored) == list(range(p0, end)) and len(set(scored)) == len(scored)


@pytest.mark.parametrize(
    "context, stride, start, length",
    [
        (8, 4, 100, 37),  # length not divisible by stride
        (8, 3, 100, 5),  # split shorter than the context
        (16, 16, 64, 64),  # stride == context
        (7, 1, 30, 20),  # stride 1
        (8, 3, 0, 29),  # split at file offset 0: the first byte cannot be scored
        (32, 5, 3, 50),  # context reaches back before the file start: padded windows
    ],
)
def test_sliding_windows_score_every_byte_once(context, stride, start, length):
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (start + length + 10,), generator=g, dtype=torch.uint8)
    ds = SlidingWindowDataset(data, start, start + length, context, stride)
    check_exactly_once(data, ds, start, start + length, context)


@pytest.mark.parametrize("context, stride, n", [(16, 5, 3001), (64, None, 2000)])
def test_module_eval_loaders_exactly_once(tmp_path, context, stride, n):
    write_bytes(tmp_path / "bytes.bin", n)
    dm = Enwik8DataModule(
        path=str(tmp_path / "bytes.bin"), context=context, eval_stride=stride, batch_size=3
    )
    dm.setup()
    for split in ("val", "test"):
        start, end = dm.splits[split]
        assert dm.num_scored_bytes(split) == end - start
        loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
        check_exactly_once(dm.data, loader.dataset, start, end, context)
        assert sum(int(b["loss_mask"].sum()) for b in loader) == end - start


@needs_prefix
def test_limit_val_bytes():
    dm = Enwik8DataModule(context=64, limit_val_bytes=1000, limit_test_bytes=333)
    assert dm.num_scored_bytes("val") == 1000 and dm.num_scored_bytes("test") == 333
    assert sum(int(b["loss_mask"].sum()) for b in dm.val_dataloader()) == 1000
    assert sum(int(b["loss_mask"].sum()) for b in dm.test_dataloader()) == 333


def test_zip_and_directory(tmp_path):
    payload = write_bytes(tmp_path / "raw", 3000)
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as zf:
        zf.writestr("enwik8", payload)
    for path in (tmp_path / "enwik8.zip", tmp_path):  # the directory resolves to the zip
        dm = Enwik8DataModule(path=str(path), context=16)
        dm.setup()
        assert dm.path == tmp_path / "enwik8.zip" and bytes(dm.data.tolist()) == payload
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("something", payload)
    with pytest.raises(ValueError, match="no member 'enwik8'"):
        Enwik8DataModule(path=str(tmp_path / "other.zip")).setup()


def test_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        Enwik8DataModule(path=str(tmp_path)).setup()
    assert str(tmp_path / "enwik8.zip") in str(err.value) and ENWIK8_URL in str(err.value)
    (tmp_path / "enwik8").write_bytes(b"")
    with pytest.raises(ValueError, match=f"{tmp_path / 'enwik8'} is empty"):
        Enwik8DataModule(path=str(tmp_path)).setup()


def test_verify_sha256():
    payload = b"enwik8 stand-in payload"
    good = hashlib.sha256(payload).hexdigest()
    assert verify_sha256(payload, good)
    assert verify_sha256(torch.tensor(list(payload), dtype=torch.uint8), good)
    with pytest.raises(ValueError, match="verify=False"):
        verify_sha256(payload, "0" * 64, source="x")
    with pytest.warns(UserWarning, match="SHA-256 of x"):
        assert not verify_sha256(payload, "0" * 64, source="x", strict=False)


def test_full_size_file_is_verified(tmp_path, monkeypatch):
    """A file of ENWIK8_SIZE bytes is hash-checked (size patched down to keep the test small)."""
    payload = write_bytes(tmp_path / "enwik8", 4000)
    monkeypatch.setattr(enwik8_mod, "ENWIK8_SIZE", 4000)
    monkeypatch.setattr(enwik8_mod, "ENWIK8_SHA256", hashlib.sha256(payload).hexdigest())
    Enwik8DataModule(path=str(tmp_path), context=16).setup()
    monkeypatch.setattr(enwik8_mod, "ENWIK8_SHA256", "f" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        Enwik8DataModule(path=str(tmp_path), context=16).setup()
    with pytest.warns(UserWarning, match="SHA-256"):
        dm = Enwik8DataModule(path=str(tmp_path), context=16, verify=False)
        dm.setup()
    assert dm.splits["val"] == (3600, 3800)


@pytest.mark.parametrize("stride", [0, -1, 17])
def test_bad_eval_stride(stride):
    with pytest.raises(ValueError, match=r"eval_stride=.*0 < eval_stride <= context \(16\)"):
        Enwik8DataModule(context=16, eval_stride=stride)


def test_too_small_file(tmp_path):
    write_bytes(tmp_path / "tiny", 50)
    with pytest.raises(ValueError, match="too small"):
        Enwik8DataModule(path=str(tmp_path / "tiny"), context=64).setup()


def test_bits_per_byte():
    assert bits_per_byte(10 * math.log(2), 10) == pytest.approx(1.0)
    assert bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)
