"""IMDb tokenisation in chunks (bounded memory) gives the ids of one whole-list encode_batch."""

from __future__ import annotations

import numpy as np
import pandas as pd

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
