"""Tokenisers for the text-classification data, all built with Hugging Face ``tokenizers``.

Three kinds are supported (``TOKENIZER_KINDS``); every one reserves the same special tokens at
the same ids: ``<pad>`` = 0, ``<unk>`` = 1, ``<cls>`` = 2.

* ``"bpe"``: byte-level BPE (GPT-2 style ``ByteLevel`` pre-tokenizer, ``BPE`` model), trained on
  the training texts to ``vocab_size`` tokens (special tokens included).
* ``"bytes"``: raw UTF-8 bytes as in the Long Range Arena text task: byte ``b`` has id ``b + 3``;
  259 tokens in all, no training.
* ``"word"``: lower-cased words and punctuation runs (``Whitespace`` pre-tokenizer, ``WordLevel``
  model), the ``vocab_size - 3`` most frequent in the training texts; others map to ``<unk>``.

Trained tokenisers are cached as JSON under ``<cache_dir>/tokenizers/``, keyed by a hash of the
kind, the vocabulary size and a fingerprint of the training texts (see :func:`get_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

log = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<cls>")
PAD_ID, UNK_ID, CLS_ID = 0, 1, 2
TOKENIZER_KINDS: tuple[str, ...] = ("bpe", "bytes", "word")
#: Vocabulary size used when ``vocab_size=None`` (``bytes``: the 256 byte values; 259 ids in all).
DEFAULT_VOCAB_SIZES: dict[str, int] = {"bpe": 16000, "bytes": 256, "word": 50000}
#: Bump when the way tokenisers are built changes, so that stale cache files are not reused.
_CACHE_FORMAT = 1


def check_kind(kind: str) -> str:
    """Return ``kind`` if it names a tokeniser; raise ``ValueError`` listing the valid ones."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(
            f"unknown tokenizer {kind!r}: valid tokenizers are {', '.join(TOKENIZER_KINDS)}"
        )
    return kind


def resolve_vocab_size(kind: str, vocab_size: int | None) -> int:
    """Vocabulary size to build for ``kind``: ``vocab_size`` or the kind's default.

    Raises:
        ValueError: unknown ``kind``, or a ``vocab_size`` too small for it (``bpe`` needs the 256
            byte symbols plus the 3 special tokens, ``word`` at least one word).
    """
    check_kind(kind)
    if kind == "bytes":
        if vocab_size not in (None, DEFAULT_VOCAB_SIZES["bytes"]):
            log.warning(
                "tokenizer=bytes has a fixed vocabulary of 256 bytes: ignoring vocab_size=%s",
                vocab_size,
            )
        return DEFAULT_VOCAB_SIZES["bytes"]
    size = DEFAULT_VOCAB_SIZES[kind] if vocab_size is None else int(vocab_size)
    minimum = 256 + len(SPECIAL_TOKENS) if kind == "bpe" else len(SPECIAL_TOKENS) + 1
    if size < minimum:
        raise ValueError(
            f"vocab_size={size} is too small for tokenizer={kind!r}: use at least "
            f"{minimum} (the special tokens are included in the count)"
        )
    return size


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, as used by the ``ByteLevel`` steps."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_byte_tokenizer() -> Tokenizer:
    """Tokeniser over raw UTF-8 bytes: byte ``b`` -> id ``b + 3``; 259 ids with the specials.

    Built as a ``ByteLevel`` pre-tokenizer (no regex split, no prefix space) feeding a ``BPE``
    model whose vocabulary is the 256-symbol byte alphabet and which has no merges.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b, ch in _bytes_to_unicode().items():
        vocab[ch] = b + len(SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokeniser of ``vocab_size`` tokens (specials included) on ``texts``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def train_word_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Word-level tokeniser: the ``vocab_size - 3`` most frequent lower-cased words of ``texts``."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def texts_fingerprint(texts: Iterable[str]) -> str:
    """SHA-256 (hex) of the texts, each length-prefixed so that the boundaries count."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def tokenizer_cache_path(
    cache_dir: str | os.PathLike, kind: str, vocab_size: int, fingerprint: str
) -> Path:
    """Cache file of a trained tokeniser: ``<cache_dir>/tokenizers/<kind>-<size>-<hash>.json``."""
    key = json.dumps(
        {"kind": kind, "vocab_size": vocab_size, "data": fingerprint, "format": _CACHE_FORMAT},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / "tokenizers" / f"{kind}-{vocab_size}-{digest}.json"


def _save_atomic(tok: Tokenizer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def get_tokenizer(
    kind: str, texts: Sequence[str], vocab_size: int | None, cache_dir: str | os.PathLike | None
) -> Tokenizer:
    """Return a tokeniser of ``kind``, training it on ``texts`` or reusing a cached one.

    Args:
        kind: one of :data:`TOKENIZER_KINDS`.
        texts: training texts (cleaned); ignored for ``"bytes"``.
        vocab_size: target vocabulary size including the special tokens, ``None`` for the
            kind's default (:data:`DEFAULT_VOCAB_SIZES`).
        cache_dir: directory under which ``tokenizers/*.json`` are kept; ``None`` disables the
            cache. A trained tokeniser is written atomically (temporary file + ``os.replace``).

    Special-token strings inside a text (e.g. a literal ``"<pad>"``) are encoded as plain text
    (``encode_special_tokens = True``), so ids 0-2 only ever come from the data module.

    Raises:
        ValueError: unknown ``kind``, too small ``vocab_size`` or no training texts.
    """
    tok = _get_tokenizer(kind, texts, resolve_vocab_size(kind, vocab_size), cache_dir)
    # Treat "<pad>" etc. inside a text as plain text, never as the special ids (not persisted).
    tok.encode_special_tokens = True
    return tok


def _get_tokenizer(
    kind: str, texts: Sequence[str], size: int, cache_dir: str | os.PathLike | None
) -> Tokenizer:
    if kind == "bytes":
        return build_byte_tokenizer()
    if len(texts) == 0:
        raise ValueError(f"cannot train a {kind!r} tokenizer on zero training texts")
    path = None
    if cache_dir is not None:
        path = tokenizer_cache_path(cache_dir, kind, size, texts_fingerprint(texts))
        if path.is_file():
            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as err:  # a corrupt cache file: retrain and overwrite it
                log.warning("cannot read cached tokenizer %s (%s): retraining", path, err)
            else:
                log.info("reusing tokenizer at %s", path)
                return tok
    log.info("training %s tokenizer (vocab_size=%d) on %d texts", kind, size, len(texts))
    train = train_bpe_tokenizer if kind == "bpe" else train_word_tokenizer
    tok = train(texts, size)
    for i, special in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(special) != i:  # guaranteed by the trainers; checked for safety
            raise RuntimeError(f"{special} got id {tok.token_to_id(special)}, expected {i}")
    if path is not None:
        _save_atomic(tok, path)
        log.info("saved tokenizer to %s", path)
    return tok
