"""``digits``: scikit-learn's 8x8 handwritten digits (shipped inside scikit-learn), classified."""

from __future__ import annotations

import functools

import numpy as np
import torch

from .base import Criterion, Task
from .checks import _check_float, _check_int
from .registry import _register

# Digits pixels are integer gray levels 0..16. A few pixels never vary in a training split (std
# 0) but do in its test split; dividing by a 1e-6 floor turns such a test pixel into ~1e6. A
# floor of one gray level bounds every standardized value by 16 and leaves every pixel whose
# train std is >= 1 level (all but the near-constant border ones) exactly standardized.
DIGITS_STD_FLOOR = 1.0


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x, y


@_register("digits")
def digits(*, test_fraction: float = 0.25, seed: int = 0, min_accuracy: float = 0.90) -> Task:
    """scikit-learn's handwritten digits: 1797 real 8x8 images (shipped inside scikit-learn),
    10 classes, as ``(1, 8, 8)`` float32 images.

    The split is stratified (``test_fraction``, ``seed``); each pixel is standardized with the
    training split's mean and std (floored at ``DIGITS_STD_FLOOR`` gray levels, see there).

    Success: test accuracy >= ``min_accuracy`` = 0.90. A logistic regression on the same
    standardized pixels reaches 0.95-0.97 on seeds 0-2, and ``gradguard demo``'s healthy runs
    0.92-0.95 while its damaged ones end at 0.24-0.86, so 0.90 separates "trained" from "hurt".
    Chance: 0.1 (10 balanced classes).
    """
    where = "task 'digits'"
    test_fraction = _check_float("test_fraction", test_fraction, low=0.05, high=0.5, where=where)
    seed = _check_int("seed", seed, minimum=0, where=where)
    min_accuracy = _check_float("min_accuracy", min_accuracy, low=0.0, high=1.0, where=where)
    from sklearn.model_selection import train_test_split

    x, y = _digits_arrays()
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    mean, std = x_tr.mean(0), np.maximum(x_tr.std(0), DIGITS_STD_FLOOR)

    def as_images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((a - mean) / std).astype(np.float32)).reshape(-1, 1, 8, 8)

    return Task(
        name="digits",
        kind="classify",
        input_shape=(1, 8, 8),
        num_outputs=10,
        train=(as_images(x_tr), torch.from_numpy(y_tr).long()),
        test=(as_images(x_te), torch.from_numpy(y_te).long()),
        metric_name="accuracy",
        higher_is_better=True,
        chance_metric=0.1,
        criterion=Criterion(
            "metric", ">=", min_accuracy, "below a linear model's 0.95-0.97 on this data"
        ),
        info={
            "source": "sklearn.datasets.load_digits",
            "pixel_mean": mean,
            "pixel_std": std,
        },
    )
