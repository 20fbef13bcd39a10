"""Weight sharing (prunejax.quantize): k-means and uniform codebooks, dequantize, fine-tuning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prunejax as pj
from prunejax.quantize import Quantized, kmeans_codebook, nearest_codes


def _mlp(seed: int = 0, shapes=((12, 8), (8, 5))) -> dict:
    rng = np.random.default_rng(seed)
    return {
        f"Dense_{i}": {
            "kernel": rng.normal(size=s).astype(np.float32),
            "bias": rng.normal(size=s[1]).astype(np.float32),
        }
        for i, s in enumerate(shapes)
    }


def _assert_nearest(q: Quantized, w: np.ndarray) -> None:
    cb = np.asarray(q.codebook, np.float64)
    kept = np.asarray(q.mask)
    dist = np.abs(w[kept].astype(np.float64)[:, None] - cb[None, :])
    chosen = dist[np.arange(dist.shape[0]), np.asarray(q.codes)[kept].astype(int)]
    assert np.all(chosen <= dist.min(axis=1))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.integers(1, 6),
    sparsity=st.sampled_from([0.0, 0.5, 0.9]),
    rows=st.integers(1, 20),
)
def test_every_kept_weight_maps_to_its_nearest_centroid(seed, bits, sparsity, rows):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(rows, 7)) * 0.1).astype(np.float32)
    params = {"k": w}
    masks = pj.magnitude_masks(params, sparsity=sparsity)
    q = pj.kmeans_quantize(params, bits, masks=masks)["k"]
    assert isinstance(q, Quantized)
    assert q.codebook.shape == (2**bits,) and q.codebook.dtype == np.float32
    assert q.codes.dtype == np.uint8 and q.codes.shape == w.shape
    assert np.array_equal(q.mask, masks["k"])
    assert np.all(np.diff(q.codebook) >= 0)
    _assert_nearest(q, w)
    deq = pj.dequantize({"k": q})["k"]
    assert deq.dtype == np.float32
    assert np.all(deq[~masks["k"]] == 0) and np.all(q.codes[~masks["k"]] == 0)
    # the codebook is a fixed point of Lloyd's iteration: each used centroid is its cluster's mean
    codes = q.codes[masks["k"]]
    for j in np.unique(codes):
        mean = w[masks["k"]][codes == j].astype(np.float64).mean()
        assert np.isclose(q.codebook[j], mean, rtol=1e-5, atol=1e-6)


def test_linear_initialisation_spans_min_to_max():
    # one Lloyd step from the linear grid of a uniform sample barely moves the grid
    x = np.linspace(-1.0, 1.0, 4001)
    cb = kmeans_codebook(x, 4)
    assert np.allclose(cb, [-0.75, -0.25, 0.25, 0.75], atol=1e-3)
    # an outlier keeps a centroid of its own (linear, not density-based, initialisation)
    y = np.concatenate([np.zeros(1000), [10.0]])
    assert kmeans_codebook(y, 2).tolist() == [0.0, 10.0]


def test_kmeans_without_masks_keeps_the_nonzero_weights_and_leaves_others_alone():
    params = _mlp()
    params["Dense_0"]["kernel"][::2] = 0.0
    q = pj.kmeans_quantize(params, 3)
    assert isinstance(q["Dense_0"]["kernel"], Quantized)
    assert q["Dense_0"]["bias"] is params["Dense_0"]["bias"]
    assert np.array_equal(q["Dense_0"]["kernel"].mask, params["Dense_0"]["kernel"] != 0)
    deq = pj.dequantize(q)
    assert jax.tree.structure(deq) == jax.tree.structure(params)
    assert np.all(deq["Dense_0"]["kernel"][::2] == 0)


def test_per_leaf_bits_and_jax_in_jax_out():
    params = jax.tree.map(jnp.asarray, _mlp())
    q = pj.kmeans_quantize(params, {"Dense_0": 4, "Dense_1/kernel": 2})
    assert q["Dense_0"]["kernel"].codebook.shape == (16,)
    assert q["Dense_1"]["kernel"].codebook.shape == (4,)
    assert isinstance(q["Dense_0"]["kernel"].codes, jax.Array)
    assert isinstance(pj.dequantize(q)["Dense_0"]["kernel"], jax.Array)
    q9 = pj.kmeans_quantize(params, 9)
    assert q9["Dense_0"]["kernel"].codes.dtype == np.uint16


@pytest.mark.parametrize(
    "bits, kwargs, err",
    [
        (0, {}, ValueError),
        (17, {}, ValueError),
        (2.5, {}, TypeError),
        (True, {}, TypeError),
        ({"nope": 3}, {}, ValueError),
    ],
)
def test_bad_bits_are_refused_naming_the_leaf(bits, kwargs, err):
    with pytest.raises(err):
        pj.kmeans_quantize(_mlp(), bits, **kwargs)


def test_refuses_traced_integer_and_requantized_leaves():
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda p: pj.kmeans_quantize(p, 2)["k"].codebook)({"k": jnp.ones((3, 3))})
    with pytest.raises(TypeError, match="not a float"):
        pj.kmeans_quantize({"k": np.ones((3, 3), np.int32)}, 2)
    q = pj.kmeans_quantize(_mlp(), 2)
    with pytest.raises(TypeError, match="dequantize"):
        pj.kmeans_quantize(q, 2)
    with pytest.raises(TypeError, match="symmetric"):
        pj.uniform_quantize(_mlp(), 8, symmetric="yes")
    with pytest.raises(ValueError):
        pj.uniform_quantize(_mlp(), 1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_quantize_is_the_rounded_integer_grid(symmetric, bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(20, 9)).astype(np.float32) + (0.0 if symmetric else 0.7)
    masks = pj.magnitude_masks({"k": w}, sparsity=0.3)
    q = pj.uniform_quantize({"k": w}, bits, masks=masks, symmetric=symmetric)["k"]
    assert q.kind == "uniform" and q.codebook.shape == (2**bits,)
    cb = np.asarray(q.codebook, np.float64)
    steps = np.diff(cb)
    ulp = np.finfo(np.float32).eps * np.abs(cb).max()
    assert np.allclose(steps, steps[0], rtol=0, atol=2 * ulp)  # an even grid (float32 points)
    assert np.any(np.abs(cb) < 1e-6 * steps[0]) or cb[0] == 0  # zero is on the grid
    kept = w[masks["k"]]
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        assert np.isclose(steps[0] * qmax, np.abs(kept).max(), rtol=1e-5)
        expect = np.round(kept.astype(np.float64) / steps[0]).astype(int) + 2 ** (bits - 1)
        assert np.mean(np.asarray(q.codes)[masks["k"]] == expect) > 0.99  # ties may differ
    else:
        assert cb[0] <= kept.min() + steps[0] and cb[-1] >= kept.max() - steps[0]
    _assert_nearest(q, w)


def _xent_loss(q, x, y):
    def loss(theta):
        logits = pj.mlp_apply(pj.dequantize(pj.with_codebooks(q, theta)), x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss


def test_centroid_fine_tuning_keeps_codes_and_masks_and_lowers_the_loss():
    params = _mlp(1)
    masks = pj.magnitude_masks(params, sparsity=0.6)
    q = pj.kmeans_quantize(params, 2, masks=masks)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 12)).astype(np.float32)
    y = rng.integers(0, 5, size=64)
    loss = jax.jit(_xent_loss(q, x, y))
    theta = pj.codebooks(q)
    assert theta["Dense_0"]["kernel"].shape == (4,)
    tx = optax.adam(3e-2)
    state = tx.init(theta)
    before = float(loss(theta))
    for _ in range(40):
        grads = jax.grad(loss)(theta)
        updates, state = tx.update(grads, state, theta)
        theta = optax.apply_updates(theta, updates)
    q2 = pj.with_codebooks(q, theta)
    assert float(loss(theta)) < before
    for name in ("Dense_0", "Dense_1"):
        a, b = q[name]["kernel"], q2[name]["kernel"]
        assert np.array_equal(a.codes, b.codes) and np.array_equal(a.mask, b.mask)
        assert not np.array_equal(np.asarray(a.codebook), np.asarray(b.codebook))
        deq = np.asarray(pj.dequantize(q2)[name]["kernel"])
        assert np.all(deq[~masks[name]["kernel"]] == 0)
        assert np.all(deq[masks[name]["kernel"]] == np.asarray(b.codebook)[b.codes[b.mask]])


def test_codebook_grads_sum_the_gradients_of_shared_weights():
    params = _mlp(3)
    masks = pj.magnitude_masks(params, sparsity=0.5)
    q = pj.kmeans_quantize(params, 3, masks=masks)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, 12)).astype(np.float32)
    y = rng.integers(0, 5, size=32)
    via_codebooks = jax.grad(_xent_loss(q, x, y))(pj.codebooks(q))

    def dense_loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(pj.mlp_apply(p, x), y).mean()

    dense_grads = jax.grad(dense_loss)(pj.dequantize(q))
    mapped = pj.codebook_grads(q, dense_grads)
    for name in ("Dense_0", "Dense_1"):
        qq, g = q[name]["kernel"], np.asarray(dense_grads[name]["kernel"])
        by_hand = np.zeros(8)
        np.add.at(by_hand, qq.codes[qq.mask].astype(int), g[qq.mask])
        np.testing.assert_allclose(mapped[name]["kernel"], by_hand, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(via_codebooks[name]["kernel"], by_hand, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(mapped[name]["bias"], dense_grads[name]["bias"])


def test_with_codebooks_refuses_a_codebook_of_another_size():
    q = pj.kmeans_quantize(_mlp(), 2)
    theta = pj.codebooks(q)
    theta["Dense_0"]["kernel"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="codebook"):
        pj.with_codebooks(q, theta)


def test_nearest_codes_ties_and_bfloat16_weights():
    assert nearest_codes(np.array([0.5, 0.49, 0.51]), np.array([0.0, 1.0])).tolist() == [0, 0, 1]
    w = jnp.asarray(np.random.default_rng(5).normal(size=(6, 6)), jnp.bfloat16)
    q = pj.kmeans_quantize({"k": w}, 3)["k"]
    assert q.dtype == "bfloat16"
    assert pj.dequantize({"k": q})["k"].dtype == jnp.bfloat16


def test_the_module_docstring_example_runs():
    import textwrap

    import prunejax.quantize as quantize_module

    doc = quantize_module.__doc__
    block = doc.split("::\n\n", 1)[1].split("\n\n``codebook_grads", 1)[0]
    scope: dict = {}
    exec(textwrap.dedent(block), scope)  # noqa: S102 - the documented example itself
    q, params, masks = scope["q"], scope["params"], scope["masks"]
    k = q["Dense_0"]["kernel"]
    fresh = pj.kmeans_quantize(params, bits=2, masks=masks)["Dense_0"]["kernel"]
    assert np.array_equal(k.codes, fresh.codes) and np.array_equal(
        k.mask, masks["Dense_0"]["kernel"]
    )
    assert not np.array_equal(np.asarray(k.codebook), fresh.codebook)  # the centroids trained


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("quantize", [pj.kmeans_quantize, pj.uniform_quantize])
def test_non_finite_weights_are_refused_naming_the_leaf(bad, quantize):
    params = _mlp()
    params["Dense_1"]["kernel"][2, 3] = bad
    with pytest.raises(ValueError, match="'Dense_1/kernel'.*non-finite"):
        quantize(params, 3)
    with pytest.raises(ValueError, match="'Dense_1/kernel'.*non-finite"):
        quantize({"Dense_1": {"kernel": jnp.asarray(params["Dense_1"]["kernel"])}}, 3)
    # a leaf that is not selected is left alone
    out = quantize(params, {"Dense_0": 3})
    assert np.isnan(out["Dense_1"]["kernel"][2, 3]) or np.isinf(out["Dense_1"]["kernel"][2, 3])


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_affine_grid_covers_weights_of_one_sign(sign, bits):
    """Affine quantization of weights all in [10, 11] (or [-11, -10]): the grid spans
    [min(lo, 0), max(hi, 0)], so every kept weight is within half a step of a grid point and
    0 is a grid point."""
    rng = np.random.default_rng(0)
    w = (sign * (10 + rng.random((8, 8)))).astype(np.float32)
    q = pj.uniform_quantize({"k": w}, bits, symmetric=False)["k"]
    cb = np.asarray(q.codebook, np.float64)
    step = cb[1] - cb[0]
    assert 0.0 in cb
    err = np.abs(np.asarray(pj.dequantize(q), np.float64) - w).max()
    assert err <= step / 2 * (1 + 1e-6)


@pytest.mark.parametrize("k, err", [(0, ValueError), (-1, ValueError), (2.0, TypeError)])
def test_kmeans_codebook_refuses_a_bad_k(k, err):
    with pytest.raises(err, match="k must be"):
        kmeans_codebook(np.arange(5.0), k)


def test_nearest_codes_with_an_unsorted_codebook_names_its_own_entries():
    cb = np.array([3.0, -1.0, 0.5, 10.0], np.float32)
    v = np.array([-5.0, 0.4, 2.0, 2.9, 7.0, 11.0, 0.5])
    codes = nearest_codes(v, cb)
    assert codes.tolist() == [1, 2, 0, 0, 3, 3, 2]
    assert np.array_equal(np.abs(v - cb[codes]), np.abs(v[:, None] - cb[None, :]).min(1))
    with pytest.raises(ValueError, match="codebook"):
        nearest_codes(v, np.zeros(0))
