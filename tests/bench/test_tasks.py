"""The bench tasks: a contract test over every registered task, then each task's own data
properties, the strict IDX reader, and the option errors."""

from __future__ import annotations

import gzip
import math
import string
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradguard.bench.tasks import (
    ADDING_CHANCE_MSE,
    DIGITS_STD_FLOOR,
    KINDS,
    MNIST_FILES,
    Task,
    available_tasks,
    encode_chars,
    make_task,
    read_idx,
    task_options,
)
from gradguard.errors import ConfigError

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written independently of the reader under test."""
    code = IDX_CODES[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_mnist(
    directory: Path, n_train: int = 20, n_test: int = 10, gz: tuple[str, ...] = (), seed: int = 0
) -> dict[str, np.ndarray]:
    """Small MNIST-shaped IDX files; the keys in ``gz`` are written gzipped."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(n_train, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "test_labels": np.arange(n_test, dtype=np.uint8) % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, base in MNIST_FILES.items():
        write_idx(directory / (base + ".gz" if key in gz else base), arrays[key])
    return arrays


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    write_mnist(tmp_path / "mnist", gz=("train_images", "test_labels"))
    return tmp_path / "mnist"


def build(name: str, mnist_dir: Path, **options: object) -> Task:
    if name == "mnist":
        options.setdefault("path", str(mnist_dir))
    return make_task(name, **options)


class Constant(nn.Module):
    """Outputs a fixed vector for every example (and every position, for an LM)."""

    def __init__(self, task: Task, value: torch.Tensor | float = 0.0):
        super().__init__()
        self.task = task
        self.dummy = nn.Parameter(torch.zeros(()))  # gives evaluate() a device and dtype
        self.value = torch.as_tensor(value, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.task.kind == "regress":
            shape: tuple[int, ...] = (b, 1)
        elif self.task.kind == "classify":
            shape = (b, self.task.num_outputs)
        else:
            shape = (b, x.shape[1], self.task.num_outputs)
        return self.value.expand(shape) + 0 * self.dummy


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + 0 * self.dummy


# --------------------------------------------------------------------------------------------
# the contract every registered task keeps
# --------------------------------------------------------------------------------------------


def test_registry_lists_the_five_tasks():
    assert available_tasks() == ["digits", "mnist", "adding", "temporal_order", "charlm"]


@pytest.mark.parametrize("name", available_tasks())
def test_task_contract(name: str, mnist_dir: Path):
    task = build(name, mnist_dir)
    assert task.name == name and task.kind in KINDS
    assert task.options == {**task_options(name), **task.options}
    assert math.isfinite(task.chance_metric)
    for x, y in (task.train, task.test):
        assert len(x) == len(y) > 0
        assert x.shape[1:] == task.input_shape
        assert x.dtype == (torch.long if task.kind == "lm" else torch.float32)
        if task.kind == "classify":
            assert y.dtype == torch.long and y.shape == (len(x),)
            assert int(y.min()) >= 0 and int(y.max()) < task.num_outputs
        elif task.kind == "regress":
            assert y.dtype == torch.float32 and y.shape == (len(x),) and task.num_outputs == 1
        else:
            assert y.dtype == torch.long and y.shape == x.shape
            assert int(torch.minimum(x.min(), y.min())) >= 0
            assert int(torch.maximum(x.max(), y.max())) < task.num_outputs
        assert torch.isfinite(x.float()).all() and torch.isfinite(y.float()).all()

    # rebuilding gives bit-identical data
    again = build(name, mnist_dir)
    for a, b in zip((*task.train, *task.test), (*again.train, *again.test), strict=True):
        assert torch.equal(a, b)

    # batches: well formed, and the same generator seed gives the same batches
    def draw(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(task.batches(8, torch.Generator().manual_seed(seed), steps=5))

    first, second, other = draw(0), draw(0), draw(1)
    assert len(first) == 5
    for (xa, ya), (xb, yb) in zip(first, second, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (8, *task.input_shape) and xa.dtype == task.train[0].dtype
        assert ya.dtype == task.train[1].dtype and len(ya) == 8
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))

    # a model that ignores its input does not succeed; the loss it gets back is trainable
    model = Constant(task)
    result = task.evaluate(model, batch_size=7)
    assert {"loss", "metric", "success"} <= set(result)
    assert result["success"] is False
    assert math.isfinite(result["loss"]) and math.isfinite(result["metric"])
    x, y = next(task.batches(4, torch.Generator().manual_seed(0)))
    assert task.loss(model(x), y).requires_grad


@pytest.mark.parametrize("name", available_tasks())
def test_a_diverged_model_never_succeeds(name: str, mnist_dir: Path):
    task = build(name, mnist_dir)
    result = task.evaluate(Constant(task, float("nan")))
    assert result["success"] is False and math.isnan(result["loss"])
    if "accuracy" in result:
        assert result["accuracy"] == 0.0  # NaN outputs count as wrong, not as argmax 0
    if "error_rate" in result:
        assert result["error_rate"] == 1.0


def test_evaluate_restores_the_training_mode():
    task = make_task("adding", n_train=10, n_test=10)
    model = Constant(task)
    model.train()
    task.evaluate(model)
    assert model.training
    model.eval()
    task.evaluate(model)
    assert not model.training


def test_batches_visit_every_example_once_per_epoch():
    task = make_task("adding", n_train=12, n_test=2)
    seen = torch.cat([x for x, _ in task.batches(4, torch.Generator().manual_seed(3), steps=3)])
    assert torch.equal(seen.sort(0).values, task.train[0].sort(0).values)
    # a batch larger than the split still has batch_size examples
    (x, y), *_ = task.batches(30, torch.Generator().manual_seed(0), steps=1)
    assert len(x) == len(y) == 30


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_split_is_stratified():
    task = make_task("digits")
    assert len(task.train[0]) + len(task.test[0]) == 1797
    assert len(task.test[0]) == pytest.approx(0.25 * 1797, abs=1)
    p_train = torch.bincount(task.train[1], minlength=10) / len(task.train[1])
    p_test = torch.bincount(task.test[1], minlength=10) / len(task.test[1])
    assert (p_train - p_test).abs().max() < 0.02
    assert (p_train - 0.1).abs().max() < 0.02


@pytest.mark.parametrize("seed", [0, 2])
def test_digits_standardized_with_train_statistics(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    task = make_task("digits", seed=seed)
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, _, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    mean, std = x_tr.mean(0), np.maximum(x_tr.std(0), DIGITS_STD_FLOOR)
    expected_test = torch.tensor((x_te - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
    torch.testing.assert_close(task.test[0], expected_test)
    assert torch.equal(task.test[1], torch.tensor(y_te))
    flat = task.train[0].reshape(len(task.train[0]), 64).double()
    assert flat.mean(0).abs().max() < 1e-5
    varying = torch.tensor(x_tr.std(0) >= DIGITS_STD_FLOOR)
    torch.testing.assert_close(
        flat.std(0, correction=0)[varying], torch.ones(int(varying.sum())).double()
    )
    # the floor keeps a pixel that is constant in train but not in test bounded
    assert task.test[0].abs().max() <= 16


def test_digits_constant_model_is_at_chance():
    task = make_task("digits")
    for cls in range(10):
        logits = torch.zeros(10)
        logits[cls] = 1.0
        result = task.evaluate(Constant(task, logits))
        assert result["metric"] == pytest.approx(task.chance_metric, abs=0.01)
        assert result["success"] is False


# --------------------------------------------------------------------------------------------
# IDX reader and mnist
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(IDX_CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path: Path, dtype: np.dtype, gz: bool):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    path = write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), array)
    back = read_idx(path)
    assert back.dtype == dtype and back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    one_d = np.arange(7, dtype=dtype)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "b.idx", one_d)), one_d)


def _bad_files() -> dict[str, tuple[bytes, str]]:
    good = idx_bytes(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    return {
        "bad_magic": (b"\x01\x00" + good[2:], "bad magic number"),
        "html": (b"<html><body>404</body></html>", "bad magic number"),
        "gzipped_no_suffix": (gzip.compress(good), "looks gzipped"),
        "unknown_dtype": (good[:2] + b"\x0a" + good[3:], "unknown dtype code 0x0A"),
        "zero_dims": (b"\x00\x00\x08\x00", "0 dimensions"),
        "short_magic": (b"\x00\x00", "shorter than the 4-byte magic"),
        "truncated_header": (good[:9], "truncated"),
        "truncated_payload": (good[:-1], "truncated"),
        "trailing_bytes": (good + b"\x00", "trailing bytes"),
        "empty": (b"", "truncated"),
    }


@pytest.mark.parametrize("case", list(_bad_files()))
def test_read_idx_rejects_bad_files(tmp_path: Path, case: str):
    data, message = _bad_files()[case]
    path = tmp_path / f"{case}.idx"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_rejects_missing_and_broken_gzip(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"nope\.idx does not exist"):
        read_idx(tmp_path / "nope.idx")
    broken = tmp_path / "broken.idx.gz"
    broken.write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8)))[:-6])
    with pytest.raises(ConfigError, match=r"broken\.idx\.gz is named \.gz but is not a valid gzip"):
        read_idx(broken)
    plain = tmp_path / "plain.idx.gz"
    plain.write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(ConfigError, match="not a valid gzip"):
        read_idx(plain)


def test_mnist_reads_the_files_and_standardizes_with_train_statistics(mnist_dir: Path):
    raw = write_mnist(mnist_dir, gz=())  # overwrite the plain files; the .gz ones take second place
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (mnist_dir / name).unlink()
    task = make_task("mnist", path=str(mnist_dir))
    assert task.input_shape == (1, 28, 28) and task.num_outputs == 10
    assert task.chance_metric == pytest.approx(0.1)
    pixels = raw["train_images"].astype(np.float64) / 255.0
    mean, std = pixels.mean(), pixels.std()
    expected = (raw["test_images"].astype(np.float64) / 255.0 - mean) / std
    np.testing.assert_allclose(task.test[0].numpy()[:, 0], expected, rtol=1e-5, atol=1e-5)
    assert abs(float(task.train[0].double().mean())) < 1e-5
    assert float(task.train[0].double().std(correction=0)) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(task.train[1], torch.from_numpy(raw["train_labels"].astype(np.int64)))


def test_mnist_gzipped_files_give_the_same_task(tmp_path: Path):
    write_mnist(tmp_path / "plain")
    write_mnist(tmp_path / "gz", gz=tuple(MNIST_FILES))
    a = make_task("mnist", path=str(tmp_path / "plain"))
    b = make_task("mnist", path=str(tmp_path / "gz"))
    for x, y in zip((*a.train, *a.test), (*b.train, *b.test), strict=True):
        assert torch.equal(x, y)


def test_mnist_limit_keeps_the_first_examples(mnist_dir: Path):
    full = make_task("mnist", path=str(mnist_dir))
    small = make_task("mnist", path=str(mnist_dir), limit=5)
    assert len(small.train[0]) == 5 and torch.equal(small.train[1], full.train[1][:5])
    assert len(small.test[0]) == len(full.test[0])
    with pytest.raises(ConfigError, match=r"limit=21 but .* holds only 20"):
        make_task("mnist", path=str(mnist_dir), limit=21)
    with pytest.raises(ConfigError, match="limit must be >= 1"):
        make_task("mnist", path=str(mnist_dir), limit=0)


def test_mnist_rejects_bad_directories(tmp_path: Path):
    with pytest.raises(ConfigError, match="needs path=DIR"):
        make_task("mnist")
    with pytest.raises(ConfigError, match="is not a directory"):
        make_task("mnist", path=str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"neither train-images-idx3-ubyte nor .*\.gz .*nothing"):
        make_task("mnist", path=str(tmp_path / "empty"))


def test_mnist_rejects_inconsistent_files(tmp_path: Path):
    write_mnist(tmp_path)
    labels = tmp_path / MNIST_FILES["train_labels"]
    images = tmp_path / MNIST_FILES["train_images"]

    write_idx(labels, np.zeros(19, np.uint8))
    with pytest.raises(ConfigError, match=r"holds 20 images but .* holds 19 labels"):
        make_task("mnist", path=str(tmp_path))

    write_idx(labels, np.zeros((20, 1), np.uint8))
    with pytest.raises(
        ConfigError, match=r"train-labels-idx1-ubyte holds a 2-D .* labels must be 1-D"
    ):
        make_task("mnist", path=str(tmp_path))

    write_idx(labels, np.zeros(20, np.uint8))
    write_idx(images, np.zeros((20, 784), np.uint8))
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte holds a 2-D .* must be 3-D"):
        make_task("mnist", path=str(tmp_path))

    write_idx(images, np.zeros((20, 14, 14), np.uint8))
    with pytest.raises(ConfigError, match="one image size"):
        make_task("mnist", path=str(tmp_path))

    images.write_bytes(idx_bytes(np.zeros((20, 28, 28), np.uint8))[:-100])
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte is truncated"):
        make_task("mnist", path=str(tmp_path))


# --------------------------------------------------------------------------------------------
# adding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 7, 50])
def test_adding_sequences(T: int):
    task = make_task("adding", T=T, n_train=500, n_test=100)
    for x, y in (task.train, task.test):
        values, markers = x[..., 0], x[..., 1]
        assert ((values >= 0) & (values < 1)).all()
        assert set(markers.unique().tolist()) <= {0.0, 1.0}
        assert (markers.sum(1) == 2).all()
        pos = markers.nonzero()[:, 1].reshape(-1, 2)
        assert (pos[:, 0] < T // 2).all() and (pos[:, 1] >= T // 2).all()
        torch.testing.assert_close(y, (values * markers).sum(1))


def test_adding_seeds_and_sizes():
    a = make_task("adding", n_train=100, n_test=50, seed=1)
    b = make_task("adding", n_train=300, n_test=50, seed=1)
    c = make_task("adding", n_train=100, n_test=50, seed=2)
    assert torch.equal(a.test[0], b.test[0])  # the test set does not depend on the train size
    assert not torch.equal(a.test[0], c.test[0])
    assert not torch.equal(a.train[0][:50], a.test[0])


def test_adding_constant_prediction_is_at_chance_and_the_exact_sum_succeeds():
    task = make_task("adding")
    result = task.evaluate(Constant(task, 1.0))
    assert task.chance_metric == ADDING_CHANCE_MSE
    assert result["metric"] == pytest.approx(1 / 6, abs=0.015)
    assert result["error_rate"] == pytest.approx(0.36, abs=0.04)  # P(|u1 + u2 - 1| > 0.4)
    assert result["success"] is False

    oracle = Lambda(lambda x: (x[..., 0] * x[..., 1]).sum(1, keepdim=True))
    result = task.evaluate(oracle)
    assert result["metric"] < 1e-10 and result["error_rate"] == 0 and result["success"] is True
    off = Lambda(lambda x: (x[..., 0] * x[..., 1]).sum(1) + 0.39)  # (B,) outputs work too
    assert task.evaluate(off)["success"] is True
    assert (
        task.evaluate(Lambda(lambda x: (x[..., 0] * x[..., 1]).sum(1) + 0.41))["success"] is False
    )


def test_regression_output_shape_is_checked():
    task = make_task("adding", n_train=4, n_test=4)
    with pytest.raises(ConfigError, match="one output"):
        task.loss(torch.zeros(4, 2), task.train[1])


# --------------------------------------------------------------------------------------------
# temporal_order
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [10, 50, 123])
def test_temporal_order_sequences(T: int):
    task = make_task("temporal_order", T=T, n_train=400, n_test=100)
    assert task.input_shape == (T, 6) and task.num_outputs == 4
    lo0, hi0, lo1, hi1 = int(0.1 * T), int(0.2 * T), int(0.5 * T), int(0.6 * T)
    for x, y in (task.train, task.test):
        assert (x.sum(-1) == 1).all()  # one-hot
        symbols = x.argmax(-1)
        relevant = symbols < 2
        assert (relevant.sum(1) == 2).all()
        pos = relevant.nonzero()[:, 1].reshape(-1, 2)
        assert ((pos[:, 0] >= lo0) & (pos[:, 0] < hi0)).all()
        assert ((pos[:, 1] >= lo1) & (pos[:, 1] < hi1)).all()
        rows = torch.arange(len(x))
        first, second = symbols[rows, pos[:, 0]], symbols[rows, pos[:, 1]]
        assert torch.equal(y, 2 * first + second)  # 0 XX, 1 XY, 2 YX, 3 YY
    assert (torch.bincount(task.train[1], minlength=4) > 50).all()


def test_temporal_order_chance_and_oracle():
    task = make_task("temporal_order")
    result = task.evaluate(Constant(task, torch.tensor([0.0, 0.0, 1.0, 0.0])))
    assert result["metric"] == pytest.approx(0.25, abs=0.05) and result["success"] is False

    def read_the_answer(x: torch.Tensor) -> torch.Tensor:
        symbols = x.argmax(-1)
        relevant = (symbols < 2).nonzero()[:, 1].reshape(-1, 2)
        rows = torch.arange(len(x))
        label = 2 * symbols[rows, relevant[:, 0]] + symbols[rows, relevant[:, 1]]
        return torch.nn.functional.one_hot(label, 4).float()

    assert task.evaluate(Lambda(read_the_answer))["success"] is True


# --------------------------------------------------------------------------------------------
# charlm
# --------------------------------------------------------------------------------------------


def test_charlm_windows_are_shifted_by_one():
    task = make_task("charlm", context=32, max_chars=20_000)
    assert task.input_shape == (32,) and task.num_outputs == 101
    for x, y in (task.train, task.test):
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(x[1:, 0], y[:-1, -1])  # windows are consecutive
    for x, y in task.batches(16, torch.Generator().manual_seed(0), steps=3):
        assert x.shape == y.shape == (16, 32) and torch.equal(x[:, 1:], y[:, :-1])
    # the last 10% of the characters are the test split
    n_chars = task.info["chars"]
    assert len(task.train_stream) == n_chars - n_chars // 10
    assert torch.equal(task.train[0].flatten(), task.train_stream[: task.train[0].numel()])


def test_charlm_unigram_model_is_at_chance_and_fails():
    task = make_task("charlm")
    assert task.info["chars"] == 1_000_000
    assert task.info["bigram_bpc"] < task.chance_metric < math.log2(101)
    result = task.evaluate(Constant(task, task.info["unigram_log_probs"]), batch_size=512)
    assert result["metric"] == pytest.approx(task.chance_metric, rel=1e-5)
    assert result["loss"] == pytest.approx(task.chance_metric * math.log(2), rel=1e-5)
    assert result["success"] is False and 0 < result["accuracy"] < 0.3


def test_charlm_vocabulary():
    ids = encode_chars("aZ \n~é€")
    assert ids.tolist()[:5] == [string.printable.index(c) for c in "aZ \n~"]
    assert ids.tolist()[5:] == [100, 100]


def test_charlm_custom_root(tmp_path: Path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "skipped.py").write_text("x" * 5000)
    (tmp_path / "b.py").write_text("def f():\n    return 1\n" * 200)
    (tmp_path / "a.py").write_text("import os\n" * 200)
    task = make_task("charlm", root=str(tmp_path), context=8, max_chars=2_000)
    assert task.info["files"] == 1  # sorted: a.py alone reaches max_chars
    assert torch.equal(task.train_stream[:10], torch.from_numpy(encode_chars("import os\n")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"yields 0 characters .* too few for context=8"):
        make_task("charlm", root=str(tmp_path / "empty"), context=8, max_chars=1_000)


# --------------------------------------------------------------------------------------------
# bad names and options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("cifar", {}, "unknown task 'cifar'; choose one of: digits, mnist, adding"),
        ("adding", {"length": 5}, r"no option 'length'; its options .*T=50"),
        ("adding", {"T": 0}, "T must be >= 2, got 0"),
        ("adding", {"T": -3}, "T must be >= 2"),
        ("adding", {"T": 2.5}, "T must be an integer"),
        ("adding", {"T": True}, "T must be an integer"),
        ("adding", {"n_train": 0}, "n_train must be >= 1"),
        ("temporal_order", {"T": 9}, "T must be >= 10"),
        ("temporal_order", {"min_accuracy": 1.5}, r"min_accuracy must lie in \[0.0, 1.0\]"),
        ("digits", {"test_fraction": 0.9}, "test_fraction must lie in"),
        ("digits", {"seed": "zero"}, "seed must be an integer"),
        ("charlm", {"context": 0}, "context must be >= 1"),
        ("charlm", {"root": "/no/such/dir"}, "corpus directory '/no/such/dir' does not exist"),
    ],
)
def test_bad_names_and_options(name: str, options: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        make_task(name, **options)


def test_bad_batch_arguments():
    task = make_task("adding", n_train=10, n_test=10)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        next(task.batches(0, torch.Generator()))
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        task.evaluate(Constant(task), batch_size=0)
