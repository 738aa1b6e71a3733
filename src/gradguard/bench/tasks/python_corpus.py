"""``charlm``: character-level language modelling on the Python standard library's own source."""

from __future__ import annotations

import functools
import hashlib
import os
import string
import sysconfig
from pathlib import Path

import numpy as np
import torch

from ...errors import ConfigError
from .base import Criterion, Task
from .checks import _check_int
from .registry import _register

# Printable ASCII (string.printable: digits, letters, punctuation, whitespace) get ids 0..99;
# every other character shares the id 100.
CHARLM_ALPHABET = string.printable
CHARLM_OTHER = len(CHARLM_ALPHABET)
_CHAR_TABLE = np.full(128, CHARLM_OTHER, dtype=np.int64)
_CHAR_TABLE[[ord(c) for c in CHARLM_ALPHABET]] = np.arange(len(CHARLM_ALPHABET))
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def encode_chars(text: str) -> np.ndarray:
    """Character ids: printable ASCII -> 0..99, anything else -> ``CHARLM_OTHER`` (100)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    return np.where(codes < 128, _CHAR_TABLE[np.minimum(codes, 127)], CHARLM_OTHER)


@functools.lru_cache(maxsize=4)
def _python_corpus(root: str, max_chars: int) -> tuple[np.ndarray, int, str]:
    """The first ``max_chars`` characters of the ``.py`` files under ``root`` (sorted relative
    paths; test and site-packages folders skipped), as ids; also the file count and a digest."""
    base = Path(root)
    files: list[str] = []
    for folder, dirs, names in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        rel = Path(folder).relative_to(base)
        files.extend(str(rel / n) for n in names if n.endswith(".py"))
    chunks: list[str] = []
    total = 0
    for rel_path in sorted(files):
        text = (base / rel_path).read_bytes().decode("utf-8", errors="replace")
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    text = "".join(chunks)[:max_chars]
    digest = hashlib.sha256(text.encode("utf-8", errors="replace")).hexdigest()[:16]
    return encode_chars(text), len(chunks), digest


@_register("charlm")
def charlm(
    *,
    context: int = 64,
    max_chars: int = 1_000_000,
    root: str | None = None,
) -> Task:
    """Character-level language modelling on Python source: the standard library's own ``.py``
    files (``sysconfig.get_paths()["stdlib"]``, or ``root``), so the corpus exists on every
    machine and nothing is downloaded. Files are read in sorted order of their relative path
    (``test``/``tests``/``site-packages`` skipped) until ``max_chars`` characters; the corpus
    therefore depends on the Python version, and ``info["sha256"]`` fingerprints it.

    Vocabulary: printable ASCII (100 ids) + one "other" id. Split by position: the last 10% is
    the test stream. ``train``/``test`` hold non-overlapping windows: ``x`` is ``(N, context)``
    long ids and ``y`` the same window shifted by one character; ``batches()`` cuts training
    windows at random offsets instead. The model outputs ``(B, context, 101)`` logits; the loss
    is cross-entropy over every position.

    Metric: test bits per character (lower is better). Chance: the bpc of the training split's
    character frequencies (add-one smoothed) on the test targets, what a model that ignores its
    input reaches (~4.4 bpc on CPython 3.11's stdlib). Success: bpc below a bigram count model
    (add-one smoothed, next character given the current one; ~3.3 bpc there), i.e. the model
    uses more context than one character as well as counting does. The margin (~1.1 bits) is
    measured on the corpus, not chosen, so it holds for any Python's stdlib or ``root``.
    """
    where = "task 'charlm'"
    context = _check_int("context", context, minimum=1, where=where)
    max_chars = _check_int("max_chars", max_chars, minimum=1_000, where=where)
    source = root if root is not None else sysconfig.get_paths()["stdlib"]
    ids, n_files, digest = _corpus(source, context, max_chars, where)
    n_test = len(ids) // 10
    vocab = CHARLM_OTHER + 1
    train_ids, test_ids = ids[: len(ids) - n_test], ids[len(ids) - n_test :]

    test = _windows(test_ids, context)
    unigram, unigram_bpc, bigram_bpc = _count_baselines(train_ids, test, vocab)

    return Task(
        name="charlm",
        kind="lm",
        input_shape=(context,),
        num_outputs=vocab,
        train=_windows(train_ids, context),
        test=test,
        metric_name="bpc",
        higher_is_better=False,
        chance_metric=unigram_bpc,
        criterion=Criterion("metric", "<", bigram_bpc, "below a bigram count model's test bpc"),
        train_stream=torch.from_numpy(train_ids.copy()),
        info={
            "root": str(source),
            "files": n_files,
            "chars": len(ids),
            "sha256": digest,
            "unigram_bpc": unigram_bpc,
            "bigram_bpc": bigram_bpc,
            "unigram_log_probs": torch.from_numpy(np.log(unigram / unigram.sum())).float(),
        },
    )


def _corpus(source: str, context: int, max_chars: int, where: str) -> tuple[np.ndarray, int, str]:
    """The corpus under ``source`` (see ``_python_corpus``), checked to be long enough."""
    if not Path(source).is_dir():
        raise ConfigError(
            f"{where}: corpus directory {source!r} does not exist; pass root=DIR, a folder "
            "of .py files"
        )
    ids, n_files, digest = _python_corpus(str(Path(source).resolve()), max_chars)
    n_test = len(ids) // 10
    if len(ids) - n_test < 2 * (context + 1) or n_test < context + 1:
        raise ConfigError(
            f"{where}: {source} yields {len(ids)} characters of .py source, too few for "
            f"context={context} (need >= {10 * (context + 1)}); pass a folder with more .py "
            "files, a larger max_chars or a smaller context"
        )
    return ids, n_files, digest


def _windows(stream: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream cut into non-overlapping ``context``-long windows and their next characters."""
    n = (len(stream) - 1) // context
    x = stream[: n * context].reshape(n, context)
    y = stream[1 : n * context + 1].reshape(n, context)
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def _count_baselines(
    train_ids: np.ndarray, test: tuple[torch.Tensor, torch.Tensor], vocab: int
) -> tuple[np.ndarray, float, float]:
    """The add-one smoothed unigram counts of the training stream, and the test bits per
    character of the unigram and the bigram count models, on exactly the positions
    ``evaluate()`` scores."""
    unigram = np.bincount(train_ids, minlength=vocab) + 1.0
    unigram_bpc = float(-np.log2(unigram / unigram.sum())[test[1].numpy()].mean())
    pairs = np.bincount(train_ids[:-1] * vocab + train_ids[1:], minlength=vocab * vocab)
    bigram = pairs.reshape(vocab, vocab) + 1.0
    bigram = np.log2(bigram / bigram.sum(axis=1, keepdims=True))
    bigram_bpc = float(-bigram[test[0].numpy(), test[1].numpy()].mean())
    return unigram, unigram_bpc, bigram_bpc
