"""IMDb movie-review sentiment classification (Maas et al., 2011) as a Lightning data module.

25,000 labelled training reviews (a seeded, stratified ``val_fraction`` of which is held out for
validation) and 25,000 test reviews; labels 0 = negative, 1 = positive. Reviews are cleaned of
``<br />`` tags, tokenised (see :mod:`attnlab.data.tokenization`), prefixed with ``<cls>`` and
truncated to ``max_len`` tokens.
"""

from __future__ import annotations

import logging
import re
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch.nn import functional as F
from torch.utils.data import DataLoader

from attnlab.data.batching import (
    EpochSequentialSampler,
    LengthBucketBatchSampler,
    TokenizedDataset,
    collate_classification,
    eval_sampler,
    loader_generator,
)
from attnlab.data.splits import stratified_split, stratified_subset
from attnlab.data.tokenization import CLS_ID, PAD_ID, check_kind, get_tokenizer
from attnlab.paths import default_cache_dir

log = logging.getLogger(__name__)

_BR_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPLITS = ("train", "test")
#: Texts per ``encode_batch`` call (bounds the tokeniser's transient ``Encoding`` objects).
ENCODE_CHUNK = 512


def clean_text(text: str) -> str:
    """Replace HTML line breaks (``<br />``, ``<br/>``, ``<br>``) with a space."""
    return _BR_TAG.sub(" ", text)


def _as_text(value: Any) -> str:
    """A review as ``str``: missing -> ``""``, bytes decoded as UTF-8 (bad bytes -> U+FFFD)."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def find_parquet_shards(directory: str | Path) -> dict[str, list[str]] | None:
    """``{"train": [...], "test": [...]}`` parquet shards in ``directory`` (or its ``imdb/`` or
    ``plain_text/`` subdirectory), or ``None`` if no directory there holds both splits."""
    base = Path(directory).expanduser()
    for d in (base, base / "imdb", base / "plain_text"):
        shards = {
            s: sorted(str(p) for pat in (f"{s}-*.parquet", f"{s}.parquet") for p in d.glob(pat))
            for s in _SPLITS
        }
        if all(shards.values()):
            return shards
    return None


def _check_not_empty(shards: dict[str, list[str]]) -> None:
    """Raise ``ValueError`` naming the files if a split's shards hold no rows."""
    import pyarrow.parquet as pq

    for split, files in shards.items():
        rows = 0
        for f in files:
            try:
                rows += pq.ParquetFile(f).metadata.num_rows
            except Exception as err:
                raise ValueError(
                    f"cannot read IMDb parquet file {f} ({err}): it is corrupt or not parquet; "
                    "re-download it or point paths.data_dir / ATTNLAB_DATA_DIR elsewhere"
                ) from err
        if rows == 0:
            raise ValueError(f"IMDb {split} split is empty: no rows in {', '.join(files)}")


def check_training_split(labels: np.ndarray, texts: list[str], source: str) -> None:
    """Refuse training data a classifier cannot learn from, and say how much is empty.

    Raises:
        ValueError: every training example has the same label, or every text is empty.
    """
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(
            f"IMDb training split has a single label ({int(classes[0])}, all {len(labels)} "
            f"reviews) in {source}: a classifier cannot learn from one class; check the label "
            "column and that the data files are not a filtered subset"
        )
    empty = sum(1 for t in texts if not t.strip())
    if empty == len(texts):
        raise ValueError(
            f"IMDb training split has no text: all {len(texts)} reviews are empty in {source}; "
            "check the text column"
        )
    if empty:
        log.warning(
            "IMDb training split: %d of %d reviews are empty (they train on <cls> alone)",
            empty,
            len(texts),
        )


def collate_padded(items: list, multiple: int, max_len: int) -> dict[str, Any]:
    """:func:`collate_classification`, then right-padded (``PAD_ID``, mask False) to a multiple
    of ``multiple`` tokens, at most ``max_len``: ``input_ids``/``padding_mask`` ``(batch, seq)``."""
    batch = collate_classification(items)
    width = batch["input_ids"].shape[1]
    target = min(-(-width // multiple) * multiple, max_len)
    if target > width:
        extra = target - width
        batch["input_ids"] = F.pad(batch["input_ids"], (0, extra), value=PAD_ID)
        batch["padding_mask"] = F.pad(batch["padding_mask"], (0, extra), value=False)
    return batch


class IMDbDataModule(pl.LightningDataModule):
    """IMDb reviews as ``(batch, seq)`` token ids with binary labels.

    Args:
        data_dir: directory with ``train-*.parquet`` and ``test-*.parquet`` (HF ``stanfordnlp/imdb``
            layout). ``None``: download ``hub_id`` from the Hugging Face hub (the configs pass
            ``paths.data_dir``/imdb, which is ``None`` only when there is no local data).
        hub_id: Hugging Face dataset id used when no local directory is found.
        tokenizer: ``"bpe"``, ``"bytes"`` or ``"word"``.
        vocab_size: vocabulary size including the 3 special tokens; ``None`` = the tokenizer's
            default (bpe 16000, word 50000; bytes always 256 byte values + 3 specials).
        max_len: tokens per example including the leading ``<cls>``.
        batch_size: training batch size; ``eval_batch_size`` (default ``2 * batch_size``) for
            validation and test.
        val_fraction: stratified fraction of the training reviews held out for validation.
        seed: seeds the split, the ``limit_*`` subsets and the batch order.
        num_workers: DataLoader worker processes.
        limit_train, limit_val, limit_test: use a seeded stratified subset of that many examples.
        cache_dir: where trained tokenisers are cached (``None`` = ``default_cache_dir()``).
        bucket_size: training batches per length-sorted bucket.
        pad_to_multiple: right-pad every batch to a multiple of this many tokens (capped at
            ``max_len``); 1 = to the longest review of the batch. Fewer distinct batch shapes
            keep memory flat: under CPU bf16 autocast each new ``(batch, seq)`` shape left memory
            behind (60 shapes: +970 MiB; padded to multiples of 32: +470 MiB). Padding is masked,
            so results do not change.

    After :meth:`setup`: ``vocab_size`` (int, actual vocabulary size), ``pad_id`` = 0,
    ``cls_id`` = 2, ``num_classes`` = 2, ``tokenizer`` (a ``tokenizers.Tokenizer``),
    ``train_idx`` / ``val_idx`` (indices into the original training split).

    Batches: ``{"input_ids": LongTensor (batch, seq), "padding_mask": BoolTensor (batch, seq)``
    (True = real token), ``"labels": LongTensor (batch,)}``, right-padded with 0.

    Resuming (``resume=true``) from a mid-epoch checkpoint is batch-exact with the default
    ``num_workers=0``: the batch sampler reads, when iteration starts (after Lightning restored
    the checkpoint), how many batches of the epoch were already trained and skips them in the
    epoch's fixed (seed, epoch) order. With ``num_workers > 0`` the DataLoader draws indices
    before the restore, so the interrupted epoch restarts from its first batches.

    Raises:
        ValueError: unknown ``tokenizer`` or bad numeric arguments (at construction); labels
            outside {0, 1}, an empty split, a training split of one class or of empty texts only
            (at setup; some empty texts are a warning with the count).
        FileNotFoundError: ``data_dir`` given but without the parquet shards, or ``None`` and
            the hub cannot be reached.
    """

    num_classes = 2
    pad_id = PAD_ID
    cls_id = CLS_ID

    def __init__(
        self,
        data_dir: str | None = None,
        hub_id: str = "stanfordnlp/imdb",
        tokenizer: str = "bpe",
        vocab_size: int | None = None,
        max_len: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        cache_dir: str | None = None,
        bucket_size: int = 50,
        pad_to_multiple: int = 32,
    ) -> None:
        super().__init__()
        self.tokenizer_kind = check_kind(tokenizer)
        if max_len < 2:
            raise ValueError(f"max_len={max_len} must be >= 2 (<cls> plus at least one token)")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        self.data_dir, self.hub_id = data_dir, hub_id
        self.requested_vocab_size = vocab_size
        self.max_len, self.batch_size = int(max_len), int(batch_size)
        self.eval_batch_size = int(eval_batch_size or 2 * batch_size)
        self.val_fraction, self.seed, self.num_workers = val_fraction, int(seed), num_workers
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        for name, value in self.limits.items():
            if value is not None and value < 1:
                raise ValueError(f"limit_{name}={value} must be >= 1 (or None for no limit)")
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self.bucket_size = bucket_size
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple={pad_to_multiple} must be >= 1")
        self.pad_to_multiple = int(pad_to_multiple)
        self.tokenizer: Any = None
        self.vocab_size: int | None = None
        self.train_idx: np.ndarray | None = None
        self.val_idx: np.ndarray | None = None
        self.test_idx: np.ndarray | None = None
        self._raw: dict[str, tuple[list[str], np.ndarray]] | None = None
        self._sources: dict[str, str] = {}
        self._datasets: dict[str, TokenizedDataset] = {}

    # ------------------------------------------------------------------ loading
    def _load_raw(self) -> dict[str, tuple[list[str], np.ndarray]]:
        """Load both splits as (texts, labels) and validate them."""
        if self._raw is not None:
            return self._raw
        import datasets

        shards = self._local_shards()
        if shards is not None:
            log.info("loading IMDb from local parquet shards %s", shards)
            _check_not_empty(shards)
            try:
                dsd = datasets.load_dataset("parquet", data_files=shards)
            except Exception as err:
                raise ValueError(f"cannot read IMDb parquet shards {shards}: {err}") from err
            self._sources = {s: ", ".join(shards[s]) for s in _SPLITS}
        else:
            log.info("no local IMDb data found: loading %r from the Hugging Face hub", self.hub_id)
            try:
                dsd = datasets.load_dataset(self.hub_id)
            except Exception as err:
                raise FileNotFoundError(
                    f"could not load IMDb from the hub ({self.hub_id!r}): {err}. Point to local "
                    "parquet shards: set paths.data_dir=... or ATTNLAB_DATA_DIR (a directory "
                    "with imdb/train-*.parquet and imdb/test-*.parquet), or run online to "
                    "download from the hub"
                ) from err
            self._sources = {s: f"{self.hub_id} [{s}]" for s in _SPLITS}
        raw = {}
        for split in _SPLITS:
            src = self._sources[split]
            if split not in dsd or not {"text", "label"} <= set(dsd[split].column_names):
                raise ValueError(
                    f"IMDb source {src} must have a {split!r} split with columns 'text' and 'label'"
                )
            table = dsd[split].data.table
            labels = np.asarray(table.column("label").to_numpy(zero_copy_only=False))
            if len(labels) == 0:
                raise ValueError(f"IMDb {split} split is empty in {src}")
            bad = sorted(set(np.unique(labels).tolist()) - {0, 1})
            if bad:
                raise ValueError(f"IMDb {split} labels must be 0 or 1, found {bad[:5]} in {src}")
            texts = [_as_text(t) for t in table.column("text").to_pylist()]
            raw[split] = (texts, labels.astype(np.int64))
        self._raw = raw
        return raw

    def _local_shards(self) -> dict[str, list[str]] | None:
        if self.data_dir is not None:
            shards = find_parquet_shards(self.data_dir)
            if shards is None:
                raise FileNotFoundError(
                    f"IMDb data_dir {str(Path(self.data_dir).expanduser())!r} does not exist or "
                    "has no train-*.parquet and test-*.parquet shards (also looked in its imdb/ "
                    "and plain_text/ subdirectories). Set paths.data_dir=... or "
                    "ATTNLAB_DATA_DIR to the directory holding imdb/, or set data_dir=null to "
                    "run online and download from the hub"
                )
            return shards
        return None  # data_dir=null: the hub, as documented (never a local copy behind its back)

    # ------------------------------------------------------------------ setup
    def _prepare_tokenizer(self) -> None:
        """Split the training reviews and train (or load) the tokeniser on the training part."""
        if self.tokenizer is not None:
            return
        texts, labels = self._load_raw()["train"]
        train_idx, val_idx = stratified_split(labels, self.val_fraction, self._rng(0))
        self.train_idx = stratified_subset(train_idx, labels, self.limits["train"], self._rng(1))
        self.val_idx = stratified_subset(val_idx, labels, self.limits["val"], self._rng(2))
        if len(self.train_idx) == 0 or len(self.val_idx) == 0:
            raise ValueError(
                f"IMDb split is degenerate: {len(self.train_idx)} train and "
                f"{len(self.val_idx)} val examples (val_fraction="
                f"{self.val_fraction}, {len(labels)} training reviews)"
            )
        train_texts = [clean_text(texts[i]) for i in self.train_idx]
        check_training_split(labels[self.train_idx], train_texts, self._sources.get("train", ""))
        self.tokenizer = get_tokenizer(
            self.tokenizer_kind, train_texts, self.requested_vocab_size, self.cache_dir
        )
        self.vocab_size = int(self.tokenizer.get_vocab_size())

    def _rng(self, stream: int) -> np.random.Generator:
        """Independent generator ``stream`` of ``seed``: 0 split, 1-3 train/val/test subsets."""
        return np.random.default_rng(np.random.SeedSequence(self.seed).spawn(stream + 1)[stream])

    def _dataset(self, split: str) -> TokenizedDataset:
        if split in self._datasets:
            return self._datasets[split]
        self._prepare_tokenizer()
        raw_split = "test" if split == "test" else "train"
        texts, labels = self._load_raw()[raw_split]
        if split == "test":
            self.test_idx = stratified_subset(
                np.arange(len(labels)), labels, self.limits["test"], self._rng(3)
            )
        idx = {"train": self.train_idx, "val": self.val_idx, "test": self.test_idx}[split]
        ids = self._encode_ids([texts[i] for i in idx])
        order = None
        if split != "train":  # evaluation: longest first, deterministic
            lengths = np.array([len(x) for x in ids])
            order = np.argsort(-lengths, kind="stable")
        self._datasets[split] = TokenizedDataset(ids, labels[idx], order)
        log.info("IMDb %s: %d examples", split, len(idx))
        return self._datasets[split]

    def _encode_ids(self, texts: list[str]) -> list[np.ndarray]:
        """``<cls>`` + the first ``max_len - 1`` token ids of each text, as int32 arrays.

        Encodes ``ENCODE_CHUNK`` texts at a time: ``encode_batch`` returns an ``Encoding`` per
        text that holds its token strings, offsets and masks besides the ids (~100 bytes per
        token); for all 22,500 training reviews at once that was ~850 MB, freed into glibc's
        arenas but not returned to the OS, so it stayed in the process's RSS for the whole run.
        """
        n_tok = self.max_len - 1
        out = []
        for start in range(0, len(texts), ENCODE_CHUNK):
            cleaned = [clean_text(t) for t in texts[start : start + ENCODE_CHUNK]]
            if self.tokenizer_kind == "bytes":  # exact: every character is >= 1 byte
                cleaned = [t[:n_tok] for t in cleaned]
            for enc in self.tokenizer.encode_batch(cleaned, add_special_tokens=False):
                ids = enc.ids[:n_tok]
                arr = np.empty(len(ids) + 1, dtype=np.int32)
                arr[0] = CLS_ID
                arr[1:] = ids
                out.append(arr)
        return out

    def prepare_data(self) -> None:
        """Load (download) the data and train + cache the tokeniser, once per node."""
        self._prepare_tokenizer()

    def setup(self, stage: str | None = None) -> None:
        """Split, tokenise and index. Idempotent; the test split is tokenised only for
        ``stage`` in (``"test"``, ``None``) or on the first :meth:`test_dataloader` call."""
        self._prepare_tokenizer()
        if stage in (None, "fit"):
            self._dataset("train")
        if stage in (None, "fit", "validate"):
            self._dataset("val")
        if stage in (None, "test"):
            self._dataset("test")

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of raw reviews: cleaned, ``<cls>``-prefixed, at most ``max_len`` ids."""
        self._prepare_tokenizer()
        return [a.tolist() for a in self._encode_ids(list(texts))]

    def example_for_maps(self, text: str) -> tuple[list[int], list[str]]:
        """``attnlab analyze``'s attention-map input: ``(token ids, a label per token)``."""
        self._prepare_tokenizer()
        ids = self.encode([text])[0]
        return ids, [self.tokenizer.id_to_token(i) or str(i) for i in ids]

    # ------------------------------------------------------------------ loaders
    @property
    def collate(self) -> Any:
        """The loaders' ``collate_fn``: :func:`collate_padded` at this module's settings."""
        return partial(collate_padded, multiple=self.pad_to_multiple, max_len=self.max_len)

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        sampler = LengthBucketBatchSampler(
            EpochSequentialSampler(len(ds)),
            self.batch_size,
            False,
            lengths=ds.lengths,
            bucket_size=self.bucket_size,
            seed=self.seed,
            batches_done=self._batches_done_in_epoch,
        )
        trainer = getattr(self, "trainer", None)
        sampler.set_epoch(trainer.current_epoch if trainer is not None else 0)
        return DataLoader(
            ds,
            batch_sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=loader_generator(self.seed),
            persistent_workers=self.num_workers > 0,
        )

    def _batches_done_in_epoch(self) -> int:
        """Training batches of the current epoch already done: ``global_step x
        accumulate_grad_batches - current_epoch x num_training_batches``, non-zero only when a
        run resumes mid-epoch (0 without a trainer)."""
        trainer = getattr(self, "trainer", None)
        per_epoch = getattr(trainer, "num_training_batches", None)
        if trainer is None or not isinstance(per_epoch, int) or per_epoch <= 0:
            return 0
        done = trainer.global_step * trainer.accumulate_grad_batches
        return max(0, done - trainer.current_epoch * per_epoch)

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self._dataset(split)
        return DataLoader(
            ds,
            batch_size=self.eval_batch_size,
            sampler=eval_sampler(ds, getattr(self, "trainer", None)),  # DDP: each item once
            collate_fn=self.collate,
            num_workers=self.num_workers,
            generator=loader_generator(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
