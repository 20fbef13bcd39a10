"""A Keras model's compressed (quantized, entropy-coded) file loads back into the same model."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import prunejax as pj  # noqa: E402
from prunejax import keras as pjk  # noqa: E402
from prunejax.fileformat import load_header  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        keras.backend.backend() != "jax", reason="these tests run Keras on the JAX backend"
    ),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(16, activation="relu", bias_initializer="random_normal"),
            keras.layers.Dense(4, bias_initializer="random_normal"),
        ]
    )


def test_compressed_keras_file_loads_back_into_the_same_model(tmp_path):
    model = _model()
    masks = pjk.magnitude_masks(model, sparsity=0.8)
    weights = pjk.quantize_weights(model, {"0": 4, "2": 3}, masks=masks)
    assert isinstance(weights[0], pj.Quantized) and not isinstance(weights[1], pj.Quantized)
    f = tmp_path / "m.safetensors"
    n = pjk.save_quantized(model, f, weights=weights)
    assert n == f.stat().st_size
    assert any(leaf["encoding"].startswith("q") for leaf in load_header(f)["leaves"])
    fresh = _model(seed=1)
    back = pjk.load_quantized(fresh, f)
    expect = pj.dequantize(weights)
    for got, want in zip(fresh.get_weights(), expect, strict=True):
        np.testing.assert_array_equal(got, want)
    for a, b in zip(back, weights, strict=True):
        if isinstance(b, pj.Quantized):
            assert np.array_equal(a.codes, b.codes) and np.array_equal(a.codebook, b.codebook)
            assert np.array_equal(a.mask, b.mask)
    assert np.all(fresh.get_weights()[0][~masks[0]] == 0)
    x = np.random.default_rng(0).normal(size=(5, 20)).astype(np.float32)
    pjk.set_quantized_weights(model, weights)
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), model.predict(x, verbose=0))
    # bits= quantizes the model's current weights directly
    m2 = pjk.save_quantized(model, tmp_path / "b.safetensors", bits=2)
    assert m2 < n


def test_keras_quantized_files_refuse_mismatches(tmp_path):
    model = _model()
    weights = pjk.quantize_weights(model, 3, method="uniform")
    assert weights[0].kind == "uniform"
    with pytest.raises(ValueError, match="exactly one"):
        pjk.save_quantized(model, tmp_path / "x", weights=weights, bits=3)
    with pytest.raises(ValueError, match="method"):
        pjk.quantize_weights(model, 3, method="median")
    with pytest.raises(ValueError, match="entries"):
        pjk.set_quantized_weights(model, weights[:2])
    other = keras.Sequential([keras.Input((20,)), keras.layers.Dense(8), keras.layers.Dense(4)])
    pjk.save_quantized(model, tmp_path / "w", weights=weights)
    with pytest.raises(ValueError, match="shape"):
        pjk.load_quantized(other, tmp_path / "w")
