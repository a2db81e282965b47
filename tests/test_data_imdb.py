"""IMDb data module: on the real parquet shards (skipped if absent) and small synthetic ones."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from attnlab.data.batching import EpochSequentialSampler, LengthBucketBatchSampler
from attnlab.data.imdb import IMDbDataModule, clean_text
from attnlab.data.splits import stratified_split, stratified_subset
from attnlab.paths import default_data_dir

_BASE = default_data_dir()
IMDB_DIR = Path(_BASE) / "imdb" if _BASE else None
needs_imdb = pytest.mark.skipif(
    IMDB_DIR is None or not (IMDB_DIR / "train-00000-of-00001.parquet").is_file(),
    reason="no IMDb parquet shards: set ATTNLAB_DATA_DIR to a directory holding imdb/",
)
SMALL = dict(limit_train=300, limit_val=60, limit_test=40, max_len=64, batch_size=8)


def make_dm(cache: Path, **kw) -> IMDbDataModule:
    args = {**SMALL, "data_dir": str(IMDB_DIR), "cache_dir": str(cache), **kw}
    return IMDbDataModule(**args)


@pytest.fixture(scope="module")
def bpe_dm(tmp_path_factory) -> IMDbDataModule:
    if IMDB_DIR is None:
        pytest.skip("no IMDb data directory")
    dm = make_dm(tmp_path_factory.mktemp("cache"), tokenizer="bpe", vocab_size=600)
    dm.setup("fit")
    return dm


def class_counts(labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.bincount(labels[idx], minlength=2)


@needs_imdb
def test_split_stratified_seeded_disjoint():
    labels = pd.read_parquet(IMDB_DIR / "train-00000-of-00001.parquet", columns=["label"])
    labels = labels["label"].to_numpy()
    tr, va = stratified_split(labels, 0.1, np.random.default_rng(0))
    assert len(va) == 2500 and len(tr) == 22500
    assert not set(tr) & set(va) and len(set(tr) | set(va)) == len(labels)
    assert abs(np.diff(class_counts(labels, va))[0]) <= 1
    assert abs(np.diff(class_counts(labels, tr))[0]) <= 1
    tr2, va2 = stratified_split(labels, 0.1, np.random.default_rng(0))
    _, va3 = stratified_split(labels, 0.1, np.random.default_rng(1))
    assert np.array_equal(va, va2) and not np.array_equal(va, va3)
    sub = stratified_subset(tr, labels, 101, np.random.default_rng(0))
    assert len(sub) == 101 and set(sub) <= set(tr)
    assert abs(np.diff(class_counts(labels, sub))[0]) <= 1


@needs_imdb
def test_module_split_and_attributes(bpe_dm):
    dm = bpe_dm
    labels = dm._load_raw()["train"][1]
    assert len(dm.train_idx) == 300 and len(dm.val_idx) == 60
    assert not set(dm.train_idx.tolist()) & set(dm.val_idx.tolist())
    assert class_counts(labels, dm.train_idx).tolist() == [150, 150]
    assert class_counts(labels, dm.val_idx).tolist() == [30, 30]
    assert dm.vocab_size == 600 and dm.tokenizer.get_vocab_size() == 600
    assert (dm.pad_id, dm.cls_id, dm.num_classes) == (0, 2, 2)
    assert [dm.tokenizer.token_to_id(t) for t in ("<pad>", "<unk>", "<cls>")] == [0, 1, 2]
    assert "test" not in dm._datasets  # the test split is tokenised lazily


@needs_imdb
def test_same_seed_same_split_other_seed_differs(bpe_dm, tmp_path):
    other = make_dm(tmp_path, tokenizer="bytes", seed=0)
    other.setup("fit")
    assert np.array_equal(other.val_idx, bpe_dm.val_idx)
    assert np.array_equal(other.train_idx, bpe_dm.train_idx)
    third = make_dm(tmp_path, tokenizer="bytes", seed=1)
    third.setup("fit")
    assert not np.array_equal(third.val_idx, bpe_dm.val_idx)


def check_batch(batch: dict[str, torch.Tensor], max_len: int) -> None:
    ids, mask, labels = batch["input_ids"], batch["padding_mask"], batch["labels"]
    assert ids.dtype == torch.long and mask.dtype == torch.bool and labels.dtype == torch.long
    assert ids.ndim == 2 and mask.shape == ids.shape and labels.shape == (ids.shape[0],)
    assert ids.shape[1] <= max_len
    assert (ids[:, 0] == 2).all()
    assert torch.equal(mask, ids != 0)  # ids never contain <pad>, so padding == zeros
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(ids.shape[1])[None] < lengths[:, None])  # right pad
    assert lengths.max() == ids.shape[1]
    assert set(labels.tolist()) <= {0, 1}


@needs_imdb
def test_batches(bpe_dm):
    n = 0
    for batch in bpe_dm.train_dataloader():
        check_batch(batch, 64)
        n += len(batch["labels"])
    assert n == 300
    val = list(bpe_dm.val_dataloader())
    assert sum(len(b["labels"]) for b in val) == 60 and val[0]["input_ids"].shape[0] == 16
    for batch in val:
        check_batch(batch, 64)
    again = list(bpe_dm.val_dataloader())
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(val, again))
    test = list(bpe_dm.test_dataloader())
    assert sum(len(b["labels"]) for b in test) == 40


@needs_imdb
def test_train_order_depends_on_epoch(bpe_dm):
    loader = bpe_dm.train_dataloader()

    def order(epoch: int) -> list[list[int]]:
        loader.batch_sampler.sampler.set_epoch(epoch)  # what Lightning calls
        return list(loader.batch_sampler)

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(i for b in order(1) for i in b) == list(range(300))


def test_length_bucket_sampler():
    lengths = np.random.default_rng(0).integers(1, 500, size=1000)
    sampler = LengthBucketBatchSampler(
        EpochSequentialSampler(1000), 10, lengths=lengths, bucket_size=5, seed=3
    )
    batches = list(sampler)
    assert len(batches) == len(sampler) == 100
    assert sorted(i for b in batches for i in b) == list(range(1000))
    # batches are cut from length-sorted groups of 50: spread within a batch is small
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.25 * np.ptp(lengths)
    sampler.set_epoch(1)
    assert list(sampler) != batches
    sampler.set_epoch(0)
    assert list(sampler) == batches


@needs_imdb
@pytest.mark.parametrize("kind, vocab, expected", [("bytes", None, 259), ("word", 800, 800)])
def test_other_tokenizers(tmp_path, kind, vocab, expected):
    dm = make_dm(tmp_path, tokenizer=kind, vocab_size=vocab, limit_train=100, limit_val=20)
    dm.setup("fit")
    assert dm.vocab_size == expected
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, 64)
    assert batch["input_ids"].max() < expected
    assert not {0, 2} & set(dm.encode(["<pad> <cls> <unk>"])[0][1:])  # literal text
    if kind == "bytes":
        assert dm.encode(["hé"]) == [[2, ord("h") + 3, 0xC3 + 3, 0xA9 + 3]]
    else:
        assert dm.encode(["The THE the"])[0][1:] == [dm.tokenizer.token_to_id("the")] * 3
        assert dm.encode(["zzqqxxunseenword"])[0] == [2, 1]


@needs_imdb
def test_br_tags_removed(tmp_path):
    assert clean_text("a<br />b<br/>c<BR>d") == "a b c d"
    dm = make_dm(tmp_path, tokenizer="bytes", max_len=20000, limit_train=200, limit_val=20)
    dm.setup("fit")
    raw = dm._load_raw()["train"][0]
    assert any("<br />" in raw[i] for i in dm.train_idx)
    for ids, _ in dm._datasets["train"]:
        assert b"<br" not in bytes(int(i) - 3 for i in ids[1:])


@needs_imdb
def test_tokenizer_cache_reused(tmp_path, caplog):
    dm = make_dm(tmp_path, tokenizer="bpe", vocab_size=400, limit_train=100, limit_val=20)
    dm.setup("fit")
    files = list((tmp_path / "tokenizers").glob("bpe-400-*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="attnlab.data.tokenization"):
        again = make_dm(tmp_path, tokenizer="bpe", vocab_size=400, limit_train=100, limit_val=20)
        again.setup("fit")
    assert f"reusing tokenizer at {files[0]}" in caplog.text
    assert files[0].stat().st_mtime_ns == mtime
    assert again.encode(["A fine film."]) == dm.encode(["A fine film."])
    # other training data -> another cache entry
    make_dm(tmp_path, tokenizer="bpe", vocab_size=400, limit_train=120, limit_val=20).setup("fit")
    assert len(list((tmp_path / "tokenizers").glob("bpe-400-*.json"))) == 2


@needs_imdb
def test_setup_idempotent(bpe_dm):
    train, tok = bpe_dm._datasets["train"], bpe_dm.tokenizer
    bpe_dm.setup("fit")
    bpe_dm.setup("fit")
    assert bpe_dm._datasets["train"] is train and bpe_dm.tokenizer is tok


def test_bad_tokenizer_name():
    with pytest.raises(ValueError, match="valid tokenizers are bpe, bytes, word"):
        IMDbDataModule(tokenizer="sentencepiece")


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    dm = IMDbDataModule(data_dir=str(missing), cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert str(missing) in msg and "ATTNLAB_DATA_DIR" in msg and "paths.data_dir" in msg


def write_shards(d: Path, train_labels: list[int], n_test: int = 10) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    texts = [
        f"review {i} is {'good' if i % 2 else 'bad'}<br />end" for i in range(len(train_labels))
    ]
    pd.DataFrame(
        {"text": pd.Series(texts, dtype=str), "label": pd.Series(train_labels, dtype="int64")}
    ).to_parquet(d / "train-00000-of-00001.parquet")
    pd.DataFrame({"text": ["Good"] * n_test, "label": [0, 1] * (n_test // 2)}).to_parquet(
        d / "test-00000-of-00001.parquet"
    )
    return d


def test_synthetic_shards_work(tmp_path):
    d = write_shards(tmp_path / "data", [0, 1] * 20)
    dm = IMDbDataModule(
        data_dir=str(d), cache_dir=str(tmp_path), tokenizer="word", val_fraction=0.25, batch_size=4
    )
    dm.setup()
    assert len(dm.train_idx) == 30 and len(dm.val_idx) == 10
    batch = next(iter(dm.test_dataloader()))
    real = batch["input_ids"][0][batch["padding_mask"][0]].tolist()  # batches are padded to 32
    assert real == [2, dm.tokenizer.token_to_id("good")]


def test_labels_outside_0_1(tmp_path):
    d = write_shards(tmp_path / "data", [0, 1, 2, 1] * 10)
    dm = IMDbDataModule(data_dir=str(d), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"labels must be 0 or 1, found \[2\].*train-00000"):
        dm.setup("fit")


def test_empty_split(tmp_path):
    d = write_shards(tmp_path / "data", [])
    dm = IMDbDataModule(data_dir=str(d), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="train split is empty.*train-00000-of-00001.parquet"):
        dm.setup("fit")
