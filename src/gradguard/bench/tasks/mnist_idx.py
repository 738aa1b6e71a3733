"""``mnist``: MNIST (or any IDX dataset of the same layout) read from local files by a strict IDX
reader; nothing is downloaded."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError
from .base import Criterion, Task
from .checks import _check_float, _check_int
from .registry import _register

IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (LeCun's MNIST format), gzipped when its name ends in ``.gz``.

    Layout: magic ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 sizes, then
    exactly ``prod(sizes)`` big-endian items. Dtype codes: 0x08 ubyte, 0x09 byte, 0x0B short,
    0x0C int, 0x0D float, 0x0E double. Returns a native-endian array of that shape.

    A missing file, a bad gzip stream, a bad magic, an unknown dtype code, a truncated header or
    payload, or trailing bytes raise ``ConfigError`` naming the file and what is wrong.
    """
    path = Path(path)
    raw = _idx_bytes(path)
    dtype, dims, header = _idx_header(path, raw)
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "too long (trailing bytes)"
        raise ConfigError(
            f"IDX file {path} is {what}: shape {dims} of {dtype.name} needs "
            f"{count * dtype.itemsize} payload bytes, it has {len(raw) - header}; "
            "download it again"
        )
    return (
        np.frombuffer(raw, dtype=dtype, count=count, offset=header)
        .reshape(dims)
        .astype(dtype.newbyteorder("="))
    )


def _idx_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in ``.gz``."""
    if not path.is_file():
        raise ConfigError(f"IDX file {path} does not exist; check the path")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ConfigError(
                f"IDX file {path} is named .gz but is not a valid gzip file ({err}); "
                "download it again or gunzip it by hand"
            ) from None
    return raw


def _idx_header(path: Path, raw: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """The item dtype, the dimensions and the header's length in bytes, each checked."""
    if len(raw) < 4:
        raise ConfigError(
            f"IDX file {path} is truncated: {len(raw)} bytes, shorter than the 4-byte magic"
        )
    if raw[0] != 0 or raw[1] != 0:
        hint = (
            "; it looks gzipped: name it *.gz"
            if raw[:2] == b"\x1f\x8b"
            else "; is it an IDX file (not an HTML page from a failed download)?"
        )
        raise ConfigError(
            f"IDX file {path} has a bad magic number: starts with 0x{raw[0]:02x} 0x{raw[1]:02x}, "
            f"expected 0x00 0x00{hint}"
        )
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        codes = ", ".join(f"0x{c:02X} {d.name}" for c, d in IDX_DTYPES.items())
        raise ConfigError(
            f"IDX file {path} has unknown dtype code 0x{code:02X} in its magic; valid: {codes}"
        )
    if ndim == 0:
        raise ConfigError(f"IDX file {path} declares 0 dimensions; an IDX array needs >= 1")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(
            f"IDX file {path} is truncated: {ndim} dimensions need a {header}-byte header, "
            f"the file has {len(raw)} bytes"
        )
    return IDX_DTYPES[code], struct.unpack(f">{ndim}I", raw[4:header]), header


def _find_idx(directory: Path, base: str) -> Path:
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    held = sorted(p.name for p in directory.iterdir())
    raise ConfigError(
        f"task 'mnist': {directory} has neither {base} nor {base}.gz (it holds: "
        f"{', '.join(held[:8]) or 'nothing'}{', ...' if len(held) > 8 else ''}); put the four "
        f"MNIST files ({', '.join(MNIST_FILES.values())}, optionally .gz) there"
    )


@_register("mnist")
def mnist(*, path: str | None = None, limit: int | None = None, min_accuracy: float = 0.95) -> Task:
    """MNIST read from the four standard IDX files in directory ``path`` (each optionally
    ``.gz``); nothing is downloaded. ``limit`` keeps the first N training examples.

    Images become ``(1, rows, cols)`` float32 (``(1, 28, 28)`` for MNIST): ubyte pixels are
    scaled to [0, 1] (float files are taken as they are), then standardized with the training
    split's single mean and std. One global pair, not per pixel: MNIST's border pixels are 0 in
    every training image, so a per-pixel std is 0 there and any test stroke would blow up.
    The class count is the largest label + 1 (10 for MNIST and Fashion-MNIST).

    Success: test accuracy >= ``min_accuracy`` = 0.95, the level of LeCun et al. (1998)'s
    two-layer MLP (300 hidden units, 4.7% test error) and above their linear classifiers
    (7.6-12% error). Chance: 1 / classes.
    """
    where = "task 'mnist'"
    directory = _mnist_directory(path, where)
    min_accuracy = _check_float("min_accuracy", min_accuracy, low=0.0, high=1.0, where=where)
    files = {key: _find_idx(directory, base) for key, base in MNIST_FILES.items()}
    arrays = {key: read_idx(p) for key, p in files.items()}
    for split in ("train", "test"):
        _check_split(arrays, files, split, where)
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise ConfigError(
            f"{where}: train images are {arrays['train_images'].shape[1:]} but test images "
            f"{arrays['test_images'].shape[1:]}; both splits must have one image size"
        )
    x_tr, y_tr = arrays["train_images"], arrays["train_labels"]
    if limit is not None:
        limit = _check_int("limit", limit, minimum=1, where=where)
        if limit > len(x_tr):
            raise ConfigError(
                f"{where}: limit={limit} but {files['train_images']} holds only {len(x_tr)} "
                "training images; pass a smaller limit or none"
            )
        x_tr, y_tr = x_tr[:limit], y_tr[:limit]
    return _mnist_task(
        (x_tr, y_tr), (arrays["test_images"], arrays["test_labels"]), files, min_accuracy
    )


def _mnist_directory(path: str | None, where: str) -> Path:
    if path is None:
        raise ConfigError(
            f"{where} needs path=DIR, a directory holding {', '.join(MNIST_FILES.values())} "
            "(each optionally .gz); nothing is downloaded"
        )
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(
            f"{where}: path {str(directory)!r} is not a directory; pass the folder "
            "that holds the four MNIST IDX files"
        )
    return directory


def _check_split(
    arrays: dict[str, np.ndarray], files: dict[str, Path], split: str, where: str
) -> None:
    """The images and labels of one split: 3-D and 1-D, as many of each, valid dtypes."""
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    img_path, lab_path = files[f"{split}_images"], files[f"{split}_labels"]
    if images.ndim != 3:
        raise ConfigError(
            f"{where}: {img_path} holds a {images.ndim}-D array of shape {images.shape}; "
            "images must be 3-D (count, rows, cols)"
        )
    if labels.ndim != 1:
        raise ConfigError(
            f"{where}: {lab_path} holds a {labels.ndim}-D array of shape {labels.shape}; "
            "labels must be 1-D (count,)"
        )
    if len(images) != len(labels):
        raise ConfigError(
            f"{where}: {img_path} holds {len(images)} images but {lab_path} holds "
            f"{len(labels)} labels; the files of one split must match"
        )
    if len(images) == 0:
        raise ConfigError(f"{where}: {img_path} holds no images")
    if labels.dtype.kind not in "iu" or labels.min() < 0:
        raise ConfigError(
            f"{where}: {lab_path} must hold non-negative integer labels "
            f"(dtype {labels.dtype}, min {labels.min()})"
        )
    if images.dtype.kind not in "uf" or (images.dtype.kind == "u" and images.itemsize != 1):
        raise ConfigError(
            f"{where}: {img_path} holds {images.dtype} pixels; use ubyte (0x08) or float"
        )


def _scaled(a: np.ndarray) -> np.ndarray:
    """Pixels as float32: ubyte scaled to [0, 1], float taken as it is."""
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)


def _mnist_task(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    files: dict[str, Path],
    min_accuracy: float,
) -> Task:
    """The task from checked arrays: pixels standardized with the training split's mean and std."""
    (x_tr, y_tr), (x_te, y_te) = train, test
    x_tr, x_te = _scaled(x_tr), _scaled(x_te)
    mean, std = float(x_tr.mean()), max(float(x_tr.std()), 1e-6)
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    rows, cols = x_tr.shape[1:]

    def as_images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a - mean) / std).float().reshape(-1, 1, rows, cols)

    return Task(
        name="mnist",
        kind="classify",
        input_shape=(1, rows, cols),
        num_outputs=num_classes,
        train=(as_images(x_tr), torch.from_numpy(y_tr.astype(np.int64))),
        test=(as_images(x_te), torch.from_numpy(y_te.astype(np.int64))),
        metric_name="accuracy",
        higher_is_better=True,
        chance_metric=1.0 / num_classes,
        criterion=Criterion(
            "metric", ">=", min_accuracy, "LeCun et al. 1998: 2-layer MLP, 4.7% test error"
        ),
        info={"files": {k: str(p) for k, p in files.items()}, "mean": mean, "std": std},
    )
