"""IMDb tokenisation in chunks (bounded memory) gives the ids of one whole-list encode_batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

import attnlab.data.imdb as imdb
from attnlab.data.tokenization import CLS_ID


def _shards(d):
    d.mkdir()
    words = "good bad plot actor film great awful boring fine movie".split()
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        texts = [" ".join(rng.choice(words, rng.integers(1, 40))) + "<br />x" for _ in range(50)]
        pd.DataFrame({"text": texts, "label": [i % 2 for i in range(50)]}).to_parquet(
            d / f"{split}-00000-of-00001.parquet"
        )
    return d


def test_chunked_encoding_matches_one_batch(tmp_path, monkeypatch):
    dm = imdb.IMDbDataModule(
        data_dir=str(_shards(tmp_path / "imdb")), cache_dir=str(tmp_path / "c"),
        tokenizer="word", max_len=16, batch_size=4,
    )  # fmt: skip
    dm.setup("fit")
    texts = dm._load_raw()["test"][0]
    monkeypatch.setattr(imdb, "ENCODE_CHUNK", 7)  # several chunks, a partial last one
    chunked = dm._encode_ids(texts)
    whole = [
        np.array([CLS_ID, *e.ids[:15]], dtype=np.int32)
        for e in dm.tokenizer.encode_batch(
            [imdb.clean_text(t) for t in texts], add_special_tokens=False
        )
    ]
    assert len(chunked) == len(whole) == 50
    for a, b in zip(chunked, whole):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.int32 and len(a) <= 16


def test_batches_padded_to_a_multiple_capped_at_max_len():
    items = [(np.arange(1, 6), 0), (np.arange(1, 3), 1)]
    b = imdb.collate_padded(items, multiple=4, max_len=16)
    assert b["input_ids"].shape == (2, 8) and b["padding_mask"].dtype == torch.bool
    assert b["padding_mask"].sum(1).tolist() == [5, 2]
    assert (b["input_ids"][~b["padding_mask"]] == 0).all()
    assert imdb.collate_padded(items, multiple=32, max_len=7)["input_ids"].shape == (2, 7)
    assert imdb.collate_padded(items, multiple=1, max_len=16)["input_ids"].shape == (2, 5)


def test_padding_does_not_change_model_outputs():
    from functools import partial

    from attnlab.attention import SoftmaxAttention
    from attnlab.models import Backbone, SequenceClassifier

    torch.manual_seed(0)
    bb = Backbone(50, partial(SoftmaxAttention), d_model=16, n_layers=1, n_heads=2, max_len=32)
    model = SequenceClassifier(bb).eval()
    items = [(np.arange(1, 10), 0), (np.arange(3, 7), 1)]
    a, b = (imdb.collate_padded(items, m, 32) for m in (1, 16))
    torch.testing.assert_close(
        model(a["input_ids"], a["padding_mask"]), model(b["input_ids"], b["padding_mask"])
    )
