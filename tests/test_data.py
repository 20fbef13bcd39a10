import numpy as np
import pytest

from prunejax._util import cache_dir
from prunejax.apps.mnist import data as pdata
from prunejax.apps.mnist.augment import random_shift
from prunejax.apps.mnist.data import (
    MNIST_TRAIN_LABEL_COUNTS,
    batches,
    find_data_dir,
    load_mnist,
    num_batches,
)


def _mnist_available() -> bool:
    try:
        find_data_dir()
    except FileNotFoundError:
        return False
    return True


needs_mnist = pytest.mark.skipif(not _mnist_available(), reason="MNIST not found offline")


def test_explicit_missing_data_dir_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        find_data_dir(tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "mnist") in msg
    assert "TFDS_DATA_DIR" in msg and "data_dir" in msg


def test_env_var_beats_repository_copies(tmp_path, monkeypatch):
    (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)
    (tmp_path / "mnist" / "3.0.1" / "dataset_info.json").write_text("{}")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert find_data_dir() == tmp_path.resolve()


def test_nothing_found_lists_every_candidate(tmp_path, monkeypatch):
    cands = [("a", tmp_path / "a"), ("b", tmp_path / "b")]
    monkeypatch.setattr(pdata, "data_candidates", lambda: cands)
    with pytest.raises(FileNotFoundError) as e:
        find_data_dir()
    assert str(tmp_path / "a" / "mnist") in str(e.value)
    assert str(tmp_path / "b" / "mnist") in str(e.value)


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEJAX_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path


@needs_mnist
def test_load_mnist_arrays_and_label_counts():
    d = load_mnist()
    assert d.x_train.shape == (60_000, 784) and d.x_test.shape == (10_000, 784)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    np.testing.assert_array_equal(np.bincount(d.y_train), MNIST_TRAIN_LABEL_COUNTS)
    assert np.bincount(d.y_test).sum() == 10_000


@needs_mnist
def test_cache_is_written_and_then_used(tmp_path, monkeypatch):
    real = load_mnist()
    raw = {
        "x_train": np.round(real.x_train * 255).astype(np.uint8),
        "y_train": real.y_train,
        "x_test": np.round(real.x_test * 255).astype(np.uint8),
        "y_test": real.y_test,
    }
    monkeypatch.setenv("PRUNEJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(pdata, "decode_mnist", lambda src: raw)
    load_mnist()
    files = list(tmp_path.glob("mnist-*.npz"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))

    def fail(src):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(pdata, "decode_mnist", fail)
    again = load_mnist()
    np.testing.assert_array_equal(again.x_test, real.x_test)
    np.testing.assert_array_equal(again.y_train, real.y_train)


def test_batches_shuffle_is_seeded_and_covers_the_split():
    x = np.arange(100, dtype=np.float32)[:, None]
    y = np.arange(100)
    a = [yb for _, yb in batches(x, y, 10, seed=3, epoch=0)]
    b = [yb for _, yb in batches(x, y, 10, seed=3, epoch=0)]
    c = [yb for _, yb in batches(x, y, 10, seed=3, epoch=1)]
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c, strict=True))
    np.testing.assert_array_equal(np.sort(np.concatenate(a)), y)
    rest = [yb for _, yb in batches(x, y, 10, seed=3, epoch=0, start=7)]
    assert all(np.array_equal(u, v) for u, v in zip(a[7:], rest, strict=True))


def test_batches_remainder_and_bad_sizes():
    x, y = np.zeros((25, 2)), np.zeros(25)
    assert len(list(batches(x, y, 10))) == 2 == num_batches(25, 10)
    assert len(list(batches(x, y, 10, drop_remainder=False))) == 3
    with pytest.raises(ValueError, match="larger than the split"):
        list(batches(x, y, 26))
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(x, y, 0))
    with pytest.raises(ValueError, match="examples"):
        list(batches(x, y[:3], 2))


def test_random_shift_translates_each_image():
    rng = np.random.default_rng(0)
    img = np.zeros((28, 28), np.float32)
    img[10:14, 12:15] = 1.0
    x = np.stack([img.ravel()] * 50)
    out = random_shift(x, np.random.default_rng(5), max_shift=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    again = random_shift(x, np.random.default_rng(5), max_shift=2)
    np.testing.assert_array_equal(out, again)
    offsets = set()
    for o in out:
        ys, xs = np.nonzero(o.reshape(28, 28))
        dy, dx = ys.min() - 10, xs.min() - 12
        assert abs(dy) <= 2 and abs(dx) <= 2
        np.testing.assert_array_equal(np.roll(np.roll(img, dy, 0), dx, 1), o.reshape(28, 28))
        offsets.add((int(dy), int(dx)))
    assert len(offsets) > 5
    np.testing.assert_array_equal(random_shift(x, rng, max_shift=0), x)
    with pytest.raises(ValueError, match="shape"):
        random_shift(np.zeros((2, 10)), rng)
