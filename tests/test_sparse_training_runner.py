"""The sparse-training comparison runner (benchmarks/sparse_training.py): its in-jit augmentation
(the MNIST application's ``shift_images``) and its argument handling.  The full comparison is a
benchmark, not a test."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import sparse_training
from prunejax.apps.mnist import shift_images


def test_shift_is_a_whole_pixel_translation_with_zero_fill():
    rng = np.random.default_rng(0)
    x = rng.random((16, 784)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    m = 2
    y = np.asarray(jax.jit(shift_images, static_argnums=2)(key, jnp.asarray(x), m))
    # the offsets the function drew, recomputed from the same key
    off = np.asarray(jax.random.randint(key, (16, 2), 0, 2 * m + 1))
    for i in range(16):
        img = np.pad(x[i].reshape(28, 28), m)
        want = img[off[i, 0] : off[i, 0] + 28, off[i, 1] : off[i, 1] + 28]
        np.testing.assert_array_equal(y[i].reshape(28, 28), want)
    assert len({tuple(o) for o in off}) > 1  # not one offset for the whole batch


def test_shift_zero_and_negative(tmp_path):
    data = type("D", (), {})()
    data.x_train = np.zeros((512, 784), np.float32)
    data.y_train = np.zeros(512, np.int32)
    data.x_test = np.zeros((10, 784), np.float32)
    data.y_test = np.zeros(10, np.int32)
    with pytest.raises(ValueError, match="shift must be >= 0"):
        sparse_training.Engine(data, 256, 1e-3, None, 0.0, -1)
    assert sparse_training.Engine(data, 256, 1e-3, None, 0.0, 0).shift == 0


def test_defaults_are_the_documented_budget():
    o = sparse_training.parse_args([])
    assert (o.lr, o.weight_decay, o.shift) == (2e-2, 0.1, 1)  # chosen on validation
    assert o.validation == 10_000
    assert (o.pretrain_epochs, o.finetune_epochs, o.scratch_epochs) == (15, 30, 45)
    # from-scratch methods train as long as pre-training + fine-tuning
    assert o.scratch_epochs == o.pretrain_epochs + o.finetune_epochs
    q = sparse_training.parse_args(["--quick"])
    assert q.seeds == [0] and q.finetune_epochs == 1
