"""Clear errors: bad config, bad data, checkpoint mismatch and generation input, each with a
message naming what was wrong and how to fix it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from attnlab.attention import SoftmaxAttention
from attnlab.config import compose
from attnlab.data.enwik8 import read_bytes
from attnlab.data.imdb import IMDbDataModule
from attnlab.evaluate import generate, load_checkpoint, restore_task
from attnlab.paths import default_data_dir
from attnlab.train import train
from tests.test_train import TINY_ENWIK8, TINY_MODEL, tiny_cfg

needs_data = pytest.mark.skipif(default_data_dir() is None, reason="needs ../shared/data")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``attnlab <args>`` in a subprocess; returns whatever happened."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "attnlab.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


class NonCausalSoftmax(SoftmaxAttention):
    """Test-only variant that declares it cannot be causal."""

    supports_causal = False


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_heads=3", "n_heads"),
        ("model.dropout=1.5", "model.dropout must be in [0, 1), got 1.5"),
        ("model.d_model=0", "model.d_model must be a positive integer, got 0"),
        ("nonfinite=maybe", "nonfinite='maybe' is not one of ['stop', 'skip']"),
        ("checkpoint_every_n_steps=0", "checkpoint_every_n_steps=0 must be a positive integer"),
        (f"attention._target_={__name__}.NonCausalSoftmax", "cannot be causal"),
    ],
)
def test_bad_config_rejected_before_data_is_read(tmp_path, override, message):
    # the data path does not exist: a config error must come first, before any data loading
    cfg = tiny_cfg(tmp_path, TINY_ENWIK8, f"task.data.path={tmp_path / 'nowhere'}", override)
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert message in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_causal_variant_error_names_the_variant_and_the_fix(tmp_path):
    cfg = tiny_cfg(tmp_path, TINY_ENWIK8, f"attention._target_={__name__}.NonCausalSoftmax")
    with pytest.raises(ValueError, match="NonCausalSoftmax cannot be causal.*choose another"):
        train(cfg)


@pytest.mark.parametrize(
    ("group", "bad", "good"), [("task", "imbd", "imdb"), ("model", "x", "classic")]
)
def test_unknown_task_or_model_lists_the_available_ones(group, bad, good):
    with pytest.raises(ValueError, match=f"unknown {group} '{bad}'; available: .*{good}"):
        compose("train", [f"{group}={bad}"])


# ----------------------------------------------------------------------------- data
@needs_data
def test_missing_data_path_is_one_line_naming_path_and_fix(tmp_path):
    proc = run_cli(
        "train",
        *TINY_MODEL,
        *TINY_ENWIK8,
        f"paths.data_dir={tmp_path / 'no_data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("attnlab train: enwik8 not found; tried: ")
    assert str(tmp_path / "no_data" / "enwik8") in err
    assert "paths.data_dir" in err and "ATTNLAB_DATA_DIR" in err
    assert "Traceback" not in proc.stderr


def test_corrupt_zip_names_the_file(tmp_path):
    bad = tmp_path / "enwik8.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=f"{bad} is not a valid zip file"):
        read_bytes(bad)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(ValueError, match="has no member 'enwik8'"):
        read_bytes(tmp_path / "other.zip")


def _shards(d: Path, train_text: list, test_text: list | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    test_text = test_text or ["fine"] * 4
    pd.DataFrame({"text": train_text, "label": [i % 2 for i in range(len(train_text))]}).to_parquet(
        d / "train-00000-of-00001.parquet"
    )
    pd.DataFrame({"text": test_text, "label": [i % 2 for i in range(len(test_text))]}).to_parquet(
        d / "test-00000-of-00001.parquet"
    )
    return d


def test_corrupt_parquet_names_the_file(tmp_path):
    d = _shards(tmp_path / "imdb", ["a", "b"] * 10)
    (d / "test-00000-of-00001.parquet").write_bytes(b"garbage, not parquet")
    dm = IMDbDataModule(data_dir=str(d), tokenizer="bytes", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="cannot read IMDb parquet file .*test-00000-of-00001"):
        dm.setup("fit")


def test_empty_none_non_utf8_and_overlong_reviews_are_handled(tmp_path):
    texts = ["", None, b"caf\xe9 \xff bytes", "x" * 5000, "ok review", "fine"] * 4
    d = tmp_path / "imdb"
    d.mkdir()
    pd.DataFrame(
        {"text": pd.Series(texts, dtype=object).map(_to_bytes), "label": [0, 1] * 12}
    ).to_parquet(d / "train.parquet")
    pd.DataFrame({"text": [b"", b"\xfe\xfe"] * 2, "label": [0, 1] * 2}).to_parquet(
        d / "test.parquet"
    )
    dm = IMDbDataModule(
        data_dir=str(d), tokenizer="bytes", max_len=16, batch_size=4, cache_dir=str(tmp_path)
    )
    dm.setup(None)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for batch in loader:
            assert batch["input_ids"].shape[1] <= 16
            assert batch["padding_mask"][:, 0].all()  # <cls> is always there
    assert dm.encode([""]) == [[dm.cls_id]]


def _to_bytes(t):
    """A binary text column: str -> UTF-8 bytes, None stays None."""
    return t.encode() if isinstance(t, str) else t


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def lm_ckpt(tmp_path_factory) -> Path:
    if default_data_dir() is None:
        pytest.skip("needs ../shared/data")
    tmp = tmp_path_factory.mktemp("lm")
    train(tiny_cfg(tmp, TINY_ENWIK8, "task.data.train_batches_per_epoch=2"))
    return tmp / "run" / "checkpoints" / "last.ckpt"


def test_checkpoint_that_does_not_match_the_config_names_parameters_and_shapes(lm_ckpt):
    run_cfg, ckpt = load_checkpoint(lm_ckpt)
    run_cfg.model.d_model = 64
    with pytest.raises(ValueError) as err:
        restore_task(run_cfg, ckpt)
    msg = str(err.value)
    assert "does not match the model built from its config" in msg
    assert "model.backbone.embed.weight (256, 32) in the checkpoint vs (256, 64)" in msg
    assert "do not override model.*" in msg


def _gen_cfg(ckpt: Path, **kw):
    base = dict(ckpt=str(ckpt), prompt="", max_new_tokens=8, temperature=0.0, top_k=None)
    return OmegaConf.create({**base, "seed": 0, "device": "cpu", "use_cache": True, **kw})


def test_generation_inputs(lm_ckpt, capsys):
    context = int(load_checkpoint(lm_ckpt)[0].task.max_len)
    tail = "<page><title>Anarchism</title>" * 2
    long_prompt = "x" * 500 + tail[-context:]
    # a prompt longer than the context uses its last `context` bytes
    assert generate(_gen_cfg(lm_ckpt, prompt=long_prompt)) == generate(
        _gen_cfg(lm_ckpt, prompt=tail[-context:])
    )
    # empty prompt is allowed; temperature 0 is greedy (the seed does not matter)
    a = generate(_gen_cfg(lm_ckpt, prompt="", seed=1))
    assert a == generate(_gen_cfg(lm_ckpt, prompt="", seed=2)) and len(a.encode()) >= 1
    with pytest.raises(ValueError, match="temperature must be >= 0 .*got -1"):
        generate(_gen_cfg(lm_ckpt, temperature=-1.0))
    with pytest.raises(ValueError, match="top_k must be >= 1 or None, got 0"):
        generate(_gen_cfg(lm_ckpt, temperature=1.0, top_k=0))
    sampled = generate(_gen_cfg(lm_ckpt, temperature=1.0, top_k=5, max_new_tokens=16))
    assert isinstance(sampled, str) and sampled != a
