"""enwik8 byte-level language modelling (Hutter Prize data) as a Lightning data module.

enwik8 is the first 10^8 bytes of an English Wikipedia XML dump; the standard split is the first
90M bytes for training, the next 5M for validation and the last 5M for testing. Models predict
each byte from the preceding ``context`` bytes and are scored in bits per byte.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from attnlab.data.batching import eval_sampler, loader_generator
from attnlab.data.windows import (
    SlidingWindowDataset,
    StepResumable,
    StepSampler,
    StepWindowDataset,
)
from attnlab.paths import default_data_dir

log = logging.getLogger(__name__)

ENWIK8_SIZE = 100_000_000
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
#: File names looked for inside a data directory, in order.
CANDIDATE_NAMES = ("enwik8", "enwik8.zip", "enwik8-prefix")
_warned_partial: set[tuple[str, int]] = set()


def resolve_enwik8_path(path: str | Path | None) -> Path:
    """The byte file to read: ``path`` itself, or ``enwik8``/``enwik8.zip``/``enwik8-prefix``
    inside directory ``path`` (``None``: ``default_data_dir()/enwik8``).

    Raises:
        FileNotFoundError: nothing found; the message lists what was tried and how to fix it.
    """
    if path is None:
        base = default_data_dir()
        dirs = [Path(base) / "enwik8", Path(base)] if base else []
    else:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        dirs = [p]
    tried = [d / name for d in dirs for name in CANDIDATE_NAMES]
    for cand in tried:
        if cand.is_file():
            return cand
    where = (
        ", ".join(str(t) for t in tried)
        if tried
        else (f"{path} (no data directory: ATTNLAB_DATA_DIR is unset and no ../shared/data exists)")
    )
    raise FileNotFoundError(
        f"enwik8 not found; tried: {where}. Download {ENWIK8_URL} and pass path=/.../enwik8.zip "
        "(or a directory holding enwik8 or enwik8.zip), or set paths.data_dir=... or "
        "ATTNLAB_DATA_DIR to a directory with enwik8/ inside"
    )


def read_bytes(path: str | Path) -> torch.Tensor:
    """Read a byte file (or member ``enwik8`` of a ``.zip``) into a 1-D ``torch.uint8`` tensor.

    Raises:
        ValueError: the file is empty, or a zip without an ``enwik8`` member.
    """
    path = Path(path)
    if path.suffix == ".zip":
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not a valid zip file (corrupt or truncated download?)")
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if "enwik8" not in names:
                raise ValueError(f"{path} has no member 'enwik8' (members: {names[:10]})")
            buf = bytearray(zf.read("enwik8"))
    else:
        buf = bytearray(path.stat().st_size)
        with open(path, "rb") as f:
            n = f.readinto(buf)
        del buf[n:]
    if len(buf) == 0:
        raise ValueError(f"{path} is empty: expected enwik8 bytes")
    return torch.frombuffer(buf, dtype=torch.uint8)


def verify_sha256(
    data: bytes | bytearray | memoryview | torch.Tensor | np.ndarray,
    expected: str,
    *,
    source: str = "data",
    strict: bool = True,
) -> bool:
    """Check the SHA-256 of ``data`` against ``expected`` (hex).

    Returns ``True`` on a match. On a mismatch raises ``ValueError`` if ``strict``, else warns
    (``UserWarning`` and a log message) and returns ``False``.
    """
    if isinstance(data, torch.Tensor):
        data = data.contiguous().numpy()
    actual = hashlib.sha256(memoryview(data).cast("B")).hexdigest()
    if actual == expected.lower():
        return True
    msg = (
        f"SHA-256 of {source} is {actual}, expected {expected}: the file is corrupt or not "
        f"enwik8 (re-download {ENWIK8_URL})"
    )
    if strict:
        raise ValueError(msg + "; pass verify=False to use it anyway")
    warnings.warn(msg, UserWarning, stacklevel=2)
    log.warning(msg)
    return False


def split_offsets(n: int) -> dict[str, tuple[int, int]]:
    """``{"train": (0, a), "val": (a, b), "test": (b, n)}`` with ``a = int(0.9 n)`` and
    ``b = a + int(0.05 n)``: 90M/5M/5M for the full enwik8."""
    a = int(0.9 * n)
    b = a + int(0.05 * n)
    return {"train": (0, a), "val": (a, b), "test": (b, n)}


class Enwik8DataModule(StepResumable, pl.LightningDataModule):
    """enwik8 (or any byte file) as windows of ``context`` bytes; vocabulary = 256 byte values.

    Args:
        path: a byte file, ``enwik8.zip``, or a directory holding ``enwik8``, ``enwik8.zip`` or
            ``enwik8-prefix``; ``None``: ``default_data_dir()/enwik8``.
        context: bytes of input per window (model sequence length).
        batch_size: training windows per batch; ``eval_batch_size`` (default ``2 * batch_size``)
            for validation and test.
        train_batches_per_epoch: training batches per epoch (per device under DDP).
        eval_stride: newly scored bytes per evaluation window (default
            ``context // 2``); must satisfy ``0 < eval_stride <= context``.
        seed: seeds the training windows (with the global step: see ``train_dataloader``).
        verify: check the SHA-256 of a 100,000,000-byte file; ``False`` turns a mismatch into a
            warning.
        limit_val_bytes, limit_test_bytes: score only the first N bytes of that split.
        num_workers: DataLoader worker processes.

    After :meth:`setup`: ``data`` (1-D ``torch.uint8``), ``splits`` (``{"train"|"val"|"test":
    (start, end)}`` byte offsets into the file), ``path`` (resolved file), ``vocab_size`` = 256.

    Batches: train ``{"input_ids", "targets"}`` LongTensors (batch, context); val/test add
    ``"loss_mask"`` BoolTensor (batch, context), True where the target byte is scored.

    Raises:
        ValueError: bad arguments (at construction); empty file, too small a file or a SHA-256
            mismatch with ``verify=True`` (at setup).
        FileNotFoundError: no data file found (at setup).
    """

    vocab_size = 256

    def __init__(
        self,
        path: str | None = None,
        context: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        train_batches_per_epoch: int = 1000,
        eval_stride: int | None = None,
        seed: int = 0,
        verify: bool = True,
        limit_val_bytes: int | None = None,
        limit_test_bytes: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if context < 1 or batch_size < 1 or train_batches_per_epoch < 1:
            raise ValueError("context, batch_size and train_batches_per_epoch must be >= 1")
        stride = max(1, context // 2) if eval_stride is None else int(eval_stride)
        if not 0 < stride <= context:
            raise ValueError(
                f"eval_stride={eval_stride} is out of range: it must satisfy "
                f"0 < eval_stride <= context ({context})"
            )
        for name, v in (
            ("limit_val_bytes", limit_val_bytes),
            ("limit_test_bytes", limit_test_bytes),
        ):
            if v is not None and v < 1:
                raise ValueError(f"{name}={v} must be >= 1 (or None to score the whole split)")
        self.requested_path, self.context, self.batch_size = path, int(context), int(batch_size)
        self.eval_batch_size = int(eval_batch_size or 2 * batch_size)
        self.train_batches_per_epoch, self.eval_stride = int(train_batches_per_epoch), stride
        self.seed, self.verify, self.num_workers = int(seed), verify, num_workers
        self.limits = {"val": limit_val_bytes, "test": limit_test_bytes}
        self.path: Path | None = None
        self.data: torch.Tensor | None = None
        self.splits: dict[str, tuple[int, int]] = {}
        self._resume_step = 0

    def setup(self, stage: str | None = None) -> None:
        """Read, verify and split the file (idempotent: later calls do nothing)."""
        if self.data is not None:
            return
        path = resolve_enwik8_path(self.requested_path)
        data = read_bytes(path)
        n = len(data)
        if n == ENWIK8_SIZE:
            verify_sha256(data, ENWIK8_SHA256, source=str(path), strict=self.verify)
        elif (str(path), n) not in _warned_partial:
            _warned_partial.add((str(path), n))
            log.warning(
                "%s is not the full enwik8 (%d bytes): splitting 90/5/5 by proportion; "
                "bpb is not comparable with published enwik8 results",
                path,
                n,
            )
        splits = split_offsets(n)
        for name, (a, b) in splits.items():
            if b - a < 1 or (name == "train" and b - a < self.context + 1):
                raise ValueError(
                    f"{path} ({n} bytes) is too small: its {name} split has "
                    f"{b - a} bytes (train needs > context = {self.context})"
                )
        self.path, self.data, self.splits = path, data, splits
        for split in ("val", "test"):
            if self.limits[split] is not None:
                log.info(
                    "%s: scoring only the first %d of %d bytes",
                    split,
                    self.num_scored_bytes(split),
                    splits[split][1] - splits[split][0],
                )

    def scored_range(self, split: str) -> tuple[int, int]:
        """File positions ``[a, b)`` whose bytes are scored for ``split`` (``"val"``/``"test"``),
        after ``limit_*_bytes``."""
        self.setup()
        start, end = self.splits[split]
        limit = self.limits.get(split)
        return max(start, 1), end if limit is None else min(end, start + limit)

    def num_scored_bytes(self, split: str) -> int:
        """Number of bytes scored by the ``split`` loader (the bpb denominator)."""
        a, b = self.scored_range(split)
        return max(0, b - a)

    def eval_dataset(self, split: str) -> SlidingWindowDataset:
        """The deterministic sliding-window dataset of ``split`` (``"val"`` or ``"test"``)."""
        a, b = self.scored_range(split)
        assert self.data is not None
        return SlidingWindowDataset(self.data, a, b, self.context, self.eval_stride)

    def train_dataloader(self) -> DataLoader:
        """Random training windows; the batch of global step ``g`` is a pure function of
        ``(seed, g)`` (:class:`StepWindowDataset`), so resuming needs no skip bookkeeping.

        Raises:
            ValueError: ``trainer.accumulate_grad_batches > 1`` (batches are indexed by
                optimizer step, so accumulation would reuse them).
        """
        self.setup()
        assert self.data is not None
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        if accumulate != 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches={accumulate} is not supported for enwik8 "
                "(training batches are indexed by optimizer step): raise task.data.batch_size "
                "instead"
            )
        start, end = self.splits["train"]
        global_batch = self.batch_size * world
        ds = StepWindowDataset(
            self.data,
            start,
            end,
            self.context,
            global_batch,
            self.train_batches_per_epoch * global_batch,
            self.seed,
        )
        sampler = StepSampler(
            ds, self.batch_size, self.train_batches_per_epoch, self._train_start_step, world, rank
        )
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            generator=loader_generator(self.seed),
        )

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self.eval_dataset(split)
        return DataLoader(
            ds,
            batch_size=self.eval_batch_size,
            sampler=eval_sampler(ds, getattr(self, "trainer", None)),  # DDP: each window once
            num_workers=self.num_workers,
            generator=loader_generator(self.seed),
        )

    def example_for_maps(self, text: str) -> tuple[list[int], list[str]]:
        """``attnlab analyze``'s attention-map input: the UTF-8 bytes of ``text`` (the last
        ``context``), and a printable label per byte."""
        raw = text.encode("utf-8")[-self.context :]
        return list(raw), [chr(b) if 32 < b < 127 else repr(chr(b))[1:-1] for b in raw]

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
