"""The validation split: the last 10,000 training images, disjoint from training, deterministic."""

import numpy as np
import pytest

from prunejax.apps.mnist.data import (
    MNIST,
    VALIDATION_SIZE,
    find_data_dir,
    load_mnist,
    split_validation,
)


def _fake(n_train: int = 50, n_test: int = 7) -> MNIST:
    x = np.arange(n_train * 784, dtype=np.float32).reshape(n_train, 784)
    y = (np.arange(n_train) % 10).astype(np.int32)
    xt = -np.ones((n_test, 784), np.float32)
    return MNIST(x, y, xt, np.zeros(n_test, np.int32))


def test_split_takes_the_last_examples_and_keeps_the_test_split():
    d = _fake()
    s = split_validation(d, 12)
    assert s.x_train.shape == (38, 784) and s.x_val.shape == (12, 784)
    assert s.y_train.shape == (38,) and s.y_val.shape == (12,)
    np.testing.assert_array_equal(s.x_train, d.x_train[:38])
    np.testing.assert_array_equal(s.x_val, d.x_train[38:])
    np.testing.assert_array_equal(s.y_val, d.y_train[38:])
    np.testing.assert_array_equal(s.x_test, d.x_test)
    # disjoint: no row of the validation split is a training row
    train_rows = {r.tobytes() for r in s.x_train}
    assert not any(r.tobytes() in train_rows for r in s.x_val)


def test_split_is_deterministic():
    d = _fake()
    a, b = split_validation(d, 10), split_validation(d, 10)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    np.testing.assert_array_equal(a.y_train, b.y_train)


def test_split_rejects_bad_sizes_and_a_second_split():
    d = _fake()
    with pytest.raises(ValueError, match="smaller than the training split"):
        split_validation(d, 50)
    with pytest.raises(ValueError, match="validation must be >= 1"):
        split_validation(d, 0)
    with pytest.raises(TypeError, match="validation must be an int"):
        split_validation(d, 2.5)
    with pytest.raises(ValueError, match="already holds a validation split"):
        split_validation(split_validation(d, 5), 5)


def test_without_validation_the_fields_are_none():
    d = _fake()
    assert d.x_val is None and d.y_val is None


def _mnist_available() -> bool:
    try:
        find_data_dir()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _mnist_available(), reason="MNIST not found offline")
def test_load_mnist_validation_is_the_documented_split():
    full = load_mnist()
    d = load_mnist(validation=VALIDATION_SIZE)
    assert VALIDATION_SIZE == 10_000
    assert d.x_train.shape == (50_000, 784) and d.x_val.shape == (10_000, 784)
    assert d.y_val.shape == (10_000,) and d.x_test.shape == (10_000, 784)
    np.testing.assert_array_equal(d.x_val, full.x_train[50_000:])
    np.testing.assert_array_equal(d.y_train, full.y_train[:50_000])
    np.testing.assert_array_equal(d.y_test, full.y_test)
    # every digit is in the validation split in roughly its share
    counts = np.bincount(d.y_val, minlength=10)
    assert counts.min() > 800 and counts.sum() == 10_000
    again = load_mnist(validation=VALIDATION_SIZE)
    np.testing.assert_array_equal(again.x_val, d.x_val)
    with pytest.raises(ValueError, match="validation must be >= 0"):
        load_mnist(validation=-1)


def test_main_job_validation_option(tmp_path, capsys):
    from prunejax.apps.mnist.cli import build_parser, main

    assert build_parser().parse_args(["mnist"]).validation == 0  # test split by default
    assert build_parser().parse_args(["mnist", "--validation", "10000"]).validation == 10_000
    if _mnist_available():
        assert main(["mnist", "--validation", "-1", "--out", str(tmp_path)]) == 2
        assert "validation must be >= 0" in capsys.readouterr().err
