"""Tests of prunejax.compact: dead-unit removal, bias folding, cascades, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunejax.compact import Compacted, compact, compaction_plan
from prunejax.masks import apply_masks, magnitude_masks, unit_masks
from prunejax.models import mlp_apply


def softplus(x):
    return jax.nn.softplus(x)


def gelu(x):
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": gelu,
    "softplus": softplus,  # softplus(0) = log 2 != 0
    "sigmoid": jax.nn.sigmoid,  # sigmoid(0) = 0.5
}


def make_mlp(sizes, density, seed=0, kind="flax", bias=True, dtype=np.float32):
    """A random MLP whose kernels keep about ``density`` of their weights."""
    rng = np.random.default_rng(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        w = rng.normal(size=(a, b)) / np.sqrt(a) * (rng.random((a, b)) < density)
        layers.append((w.astype(dtype), rng.normal(size=b).astype(dtype) if bias else None))
    return as_kind(layers, kind)


def as_kind(layers, kind):
    if kind == "flax":
        return {
            f"Dense_{i}": ({"kernel": w, "bias": b} if b is not None else {"kernel": w})
            for i, (w, b) in enumerate(layers)
        }
    out = []
    for w, b in layers:
        out.append(w)
        if b is not None:
            out.append(b)
    return out


def kernels_biases(params):
    if isinstance(params, dict):
        keys = sorted(params, key=lambda k: int(k.split("_")[1]))
        return [params[k]["kernel"] for k in keys], [params[k].get("bias") for k in keys]
    ks = [x for x in params if np.ndim(x) == 2]
    bs = []
    for i, x in enumerate(params):
        if np.ndim(x) == 2:
            nxt = params[i + 1] if i + 1 < len(params) else None
            bs.append(nxt if nxt is not None and np.ndim(nxt) == 1 else None)
    return ks, bs


def outputs(params, x, act):
    return np.asarray(mlp_apply(params, jnp.asarray(x), activation=act))


def x_of(n_in, seed=1, batch=64):
    return np.random.default_rng(seed).normal(size=(batch, n_in)).astype(np.float32) * 2.0


def assert_equivalent(params, small, act, n_in):
    x = x_of(n_in)
    np.testing.assert_allclose(
        outputs(small, x, act), outputs(params, x, act), rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("kind", ["flax", "keras"])
@pytest.mark.parametrize("act_name", list(ACTIVATIONS))
def test_compact_matches_masked_network(kind, act_name):
    act = ACTIVATIONS[act_name]
    params = make_mlp([12, 10, 9, 8, 5], density=0.25, seed=3, kind=kind)
    res = compact(params, activation=act)
    assert isinstance(res, Compacted)
    small, kept = res
    assert type(small) is type(params)
    assert jax.tree_util.tree_structure(small) == jax.tree_util.tree_structure(params)
    ks, _ = kernels_biases(small)
    ks0, _ = kernels_biases(params)
    # something was removed, and the kept indices describe the shapes
    assert sum(k.size for k in ks) < sum(k.size for k in ks0)
    assert [k.shape[1] for k in ks] == [len(c) for c in kept]
    np.testing.assert_array_equal(kept[-1], np.arange(5))
    assert ks[0].shape[0] == 12
    for c in kept:
        assert c.dtype == np.int64 and np.all(np.diff(c) > 0)
    # the kernels are the original ones sliced at the kept units
    rows = np.arange(12)
    for k, k0, c in zip(ks, ks0, kept, strict=True):
        np.testing.assert_array_equal(k, k0[np.ix_(rows, c)])
        rows = c
    assert_equivalent(params, small, act, 12)
    for a, b in zip(compaction_plan(params), kept, strict=True):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 7), min_size=2, max_size=5),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    act_name=st.sampled_from(["relu", "softplus", "tanh"]),
)
def test_compact_property_random_chains(sizes, density, seed, act_name):
    """Any sparsity pattern, any widths: same outputs, and nothing dead remains."""
    act = ACTIVATIONS[act_name]
    params = make_mlp(sizes, density=density, seed=seed)
    small, kept = compact(params, activation=act)
    assert_equivalent(params, small, act, sizes[0])
    ks, _ = kernels_biases(small)
    for a, b in zip(ks[:-1], ks[1:], strict=True):
        # fixed point: no hidden unit has an all-zero incoming column or outgoing row
        assert np.all((a != 0).any(axis=0))
        assert np.all((b != 0).any(axis=1))
    # idempotent
    again, kept2 = compact(small, activation=act)
    assert [k.shape for k in kernels_biases(again)[0]] == [k.shape for k in ks]


def test_numpy_in_numpy_out_jax_in_jax_out_dtypes_kept():
    params = make_mlp([6, 5, 4], density=0.4, seed=0)
    small, _ = compact(params)
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(small))
    jparams = jax.tree_util.tree_map(jnp.asarray, params)
    jsmall, _ = compact(jparams)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(jsmall))
    p16 = make_mlp([6, 5, 4], density=0.4, seed=0, dtype=np.float16)
    s16, _ = compact(p16)
    assert all(x.dtype == np.float16 for x in jax.tree_util.tree_leaves(s16))


def test_masks_argument_equals_applying_masks_first():
    params = make_mlp([10, 8, 6, 3], density=1.0, seed=5)
    masks = unit_masks(params, 0.5, where=lambda p, leaf: np.ndim(leaf) == 2 and "Dense_2" not in p)
    a, ka = compact(params, masks=masks)
    b, kb = compact(apply_masks(params, masks))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert [k.tolist() for k in ka] == [k.tolist() for k in kb]
    assert [len(k) for k in ka] == [4, 3, 3]


# ----------------------------------------------------------------------------- corner cases


@pytest.mark.parametrize("act_name", ["relu", "softplus", "tanh"])
def test_hidden_layer_pruned_to_100_percent_outputs_the_bias_constant(act_name):
    act = ACTIVATIONS[act_name]
    params = make_mlp([6, 5, 4, 3], density=0.6, seed=2)
    params["Dense_1"]["kernel"][:] = 0
    small, kept = compact(params, activation=act)
    # every hidden unit dies: the network is the constant the biases imply
    assert [len(k) for k in kept] == [0, 0, 3]
    assert small["Dense_0"]["kernel"].shape == (6, 0)
    assert small["Dense_2"]["kernel"].shape == (0, 3)
    b1 = params["Dense_1"]["bias"].astype(np.float64)
    h1 = np.asarray(act(jnp.asarray(b1, jnp.float32)), np.float64)
    # Dense_1 emits act(b1) whatever the input; the last layer has no activation
    expected = h1 @ params["Dense_2"]["kernel"].astype(np.float64) + params["Dense_2"]["bias"]
    np.testing.assert_allclose(small["Dense_2"]["bias"], expected, rtol=1e-5, atol=1e-6)
    x = x_of(6)
    out = outputs(small, x, act)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-5, atol=1e-5)
    assert_equivalent(params, small, act, 6)


def test_last_layer_pruned_to_100_percent_outputs_its_bias():
    params = make_mlp([6, 5, 4], density=0.7, seed=4, kind="keras")
    params[2][:] = 0
    small, kept = compact(params, activation=softplus)
    assert [len(k) for k in kept] == [0, 4]
    out = outputs(small, x_of(6), softplus)
    np.testing.assert_array_equal(out, np.broadcast_to(params[3], out.shape))


def test_layer_at_0_percent_sparsity_is_unchanged():
    params = make_mlp([7, 6, 5, 2], density=1.0, seed=6)
    small, kept = compact(params, activation=softplus)
    assert [k.tolist() for k in kept] == [list(range(6)), list(range(5)), [0, 1]]
    for x, y in zip(
        jax.tree_util.tree_leaves(small), jax.tree_util.tree_leaves(params), strict=True
    ):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("act_name", ["relu", "softplus", "sigmoid"])
def test_unit_dead_on_input_but_alive_through_its_bias_is_folded(act_name):
    act = ACTIVATIONS[act_name]
    w1 = np.arange(1, 13, dtype=np.float32).reshape(4, 3) / 10
    w1[:, 1] = 0  # unit 1 has no incoming weights ...
    b1 = np.array([0.1, 2.0, -0.3], np.float32)  # ... but emits act(2.0)
    w2 = np.array([[1.0, -1.0], [0.5, 2.0], [0.25, 0.0]], np.float32)
    b2 = np.array([0.3, -0.2], np.float32)
    params = [w1, b1, w2, b2]
    (k1, c1, k2, c2), kept = compact(params, activation=act)
    assert kept[0].tolist() == [0, 2]
    const = float(act(jnp.float32(2.0)))
    np.testing.assert_allclose(c2, b2 + const * w2[1], rtol=1e-6)
    np.testing.assert_array_equal(k2, w2[[0, 2]])
    assert_equivalent(params, [k1, c1, k2, c2], act, 4)


def test_unit_without_bias_and_nonzero_act0_folds_act0_into_next_bias():
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 3)).astype(np.float32)
    w1[:, 2] = 0
    w2 = rng.normal(size=(3, 2)).astype(np.float32)
    b2 = rng.normal(size=2).astype(np.float32)
    params = {"Dense_0": {"kernel": w1}, "Dense_1": {"kernel": w2, "bias": b2}}
    small, kept = compact(params, activation=softplus)
    assert kept[0].tolist() == [0, 1]
    np.testing.assert_allclose(small["Dense_1"]["bias"], b2 + np.log(2) * w2[2], rtol=1e-6)
    assert_equivalent(params, small, softplus, 4)


def test_no_biases_and_act0_zero_needs_no_folding():
    params = make_mlp([6, 5, 4, 3], density=0.3, seed=11, kind="keras", bias=False)
    params[0][:, :2] = 0
    small, kept = compact(params, activation=jnp.tanh)
    assert len(small) == 3
    assert 0 not in kept[0] and 1 not in kept[0]
    assert_equivalent(params, small, jnp.tanh, 6)


def test_folding_impossible_raises_naming_the_layers():
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 3)).astype(np.float32)
    w1[:, 1] = 0
    w2 = rng.normal(size=(3, 2)).astype(np.float32)  # row 1 is live, and there is no bias
    params = {"Dense_0": {"kernel": w1}, "Dense_1": {"kernel": w2}}
    with pytest.raises(ValueError, match=r"unit\(s\) \[1\] of layer 'Dense_0'.*'Dense_1'.*no bias"):
        compact(params, activation=softplus)
    # the same network with relu (relu(0) = 0) compacts fine
    small, kept = compact(params, activation=jax.nn.relu)
    assert kept[0].tolist() == [0, 2]
    # and with a dead outgoing row the unit is simply dead, whatever the activation
    w2[1] = 0
    small, kept = compact(params, activation=softplus)
    assert kept[0].tolist() == [0, 2]
    assert_equivalent(params, small, softplus, 4)


def test_cascades_in_both_directions():
    # 3 -> 4 -> 3 -> 2.  Backward: unit 3 of layer 1 (boundary 1) feeds only unit 0 of layer 1,
    # whose outgoing row is zero, so both die.  Forward: unit 0 of layer 0 has no inputs; it is
    # the only input of unit 1 of layer 1, which then dies too (its constant folds onward).
    w0 = np.array([[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 1, 1]], np.float32)
    b0 = np.array([0.5, 0.1, 0.2, 0.3], np.float32)
    w1 = np.zeros((4, 3), np.float32)
    w1[0, 1] = 2.0  # unit 0 of layer 0 -> unit 1 of layer 1 only
    w1[1, 2] = 1.0
    w1[2, 2] = -1.0
    w1[3, 0] = 3.0  # unit 3 of layer 0 -> unit 0 of layer 1 only
    b1 = np.array([0.0, 0.7, 0.1], np.float32)
    w2 = np.array([[0, 0], [1.5, -0.5], [1, 2]], np.float32)  # unit 0 of layer 1 is dead out
    b2 = np.array([0.01, -0.02], np.float32)
    params = [w0, b0, w1, b1, w2, b2]
    for act in (jax.nn.relu, softplus):
        small, kept = compact(params, activation=act)
        assert kept[0].tolist() == [1, 2]
        assert kept[1].tolist() == [2]
        assert_equivalent(params, small, act, 3)
        np.testing.assert_array_equal(compaction_plan(params)[1], kept[1])


def test_lenet_unit_pruning_half_the_hidden_units():
    params = make_mlp([784, 300, 100, 10], density=1.0, seed=0)
    hidden = lambda p, leaf: np.ndim(leaf) == 2 and not p.startswith("Dense_2")  # noqa: E731
    pruned = apply_masks(params, unit_masks(params, 0.5, where=hidden))
    small, kept = compact(pruned)
    assert [len(k) for k in kept] == [150, 50, 10]
    flops = sum(2 * k.size for k in kernels_biases(small)[0])
    assert flops <= 0.55 * sum(2 * k.size for k in kernels_biases(params)[0])
    assert_equivalent(pruned, small, jax.nn.relu, 784)


def test_magnitude_pruned_network_compacts_where_units_die():
    params = make_mlp([20, 16, 12, 4], density=1.0, seed=9)
    pruned = apply_masks(params, magnitude_masks(params, 0.9))
    small, _ = compact(pruned, activation=gelu)
    assert_equivalent(pruned, small, gelu, 20)


# ----------------------------------------------------------------------------- bad input


def test_mismatched_chain_raises_naming_layers():
    params = make_mlp([6, 5, 4], density=0.5)
    params["Dense_1"]["kernel"] = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"not an MLP chain.*'Dense_0' has 5 outputs.*'Dense_1'"):
        compact(params)


def test_leaf_outside_a_dense_layer_raises():
    params = make_mlp([6, 5, 4], density=0.5)
    params["BatchNorm_0"] = {"scale": np.ones(5, np.float32), "extra": np.ones(5, np.float32)}
    with pytest.raises(ValueError, match="BatchNorm_0/extra"):
        compact(params)


def test_bias_of_wrong_length_raises():
    params = make_mlp([6, 5, 4], density=0.5)
    params["Dense_0"]["bias"] = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="Dense_0/bias"):
        compact(params)


def test_nan_weight_raises_naming_leaf():
    params = make_mlp([6, 5, 4], density=0.5)
    params["Dense_1"]["kernel"][0, 0] = np.nan
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        compact(params)


def test_jit_is_refused():
    params = jax.tree_util.tree_map(jnp.asarray, make_mlp([6, 5, 4], density=0.5))
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda p: compact(p).params)(params)


def test_bad_activation_and_no_kernels():
    params = make_mlp([6, 5, 4], density=0.5)
    with pytest.raises(TypeError, match="callable"):
        compact(params, activation="relu")
    with pytest.raises(ValueError, match="not an MLP"):
        compact({"b": np.ones(3, np.float32)})
    params["Dense_0"]["kernel"][:, 0] = 0
    with pytest.raises(ValueError, match="elementwise"):
        compact(params, activation=lambda z: jnp.sum(z) + 1.0)


def test_sparse_kernel_object_is_refused():
    from jax.experimental import sparse as jsparse

    params = make_mlp([6, 5, 4], density=0.5)
    params["Dense_0"]["kernel"] = jsparse.BCOO.fromdense(params["Dense_0"]["kernel"])
    with pytest.raises(TypeError, match="Dense_0/kernel.*todense"):
        compact(params)


def test_compaction_plan_does_not_depend_on_values_only_on_zeros():
    params = make_mlp([8, 7, 6, 2], density=0.3, seed=13)
    scaled = jax.tree_util.tree_map(lambda x: x * 3.0, params)
    a = compaction_plan(params)
    b = compaction_plan(scaled)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]


# ----------------------------------------------------------------------------- what is a kernel


def test_embedding_table_that_chains_is_refused_not_compacted():
    # Dense_0's 4 outputs happen to match the table's 4 rows, and row 1 (a padding token) is
    # zero: treating the table as the next layer would delete that row and Dense_0's unit 1.
    table = np.arange(1.0, 13.0, dtype=np.float32).reshape(4, 3)
    table[1] = 0.0
    params = {
        "embed": table,
        "Dense_0": {"kernel": np.ones((3, 4), np.float32), "bias": np.zeros(4, np.float32)},
    }
    with pytest.raises(ValueError, match=r"2-D leaf 'embed' \(shape \(4, 3\)\) is not a dense"):
        compact(params)
    with pytest.raises(ValueError, match="'embed'"):
        compaction_plan(params)
    flax_embed = {"Embed_0": {"embedding": table}, "Dense_0": params["Dense_0"]}
    with pytest.raises(ValueError, match="'Embed_0/embedding'"):
        compact(flax_embed)


def test_named_flat_dicts_and_lists_still_compact():
    w1 = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 1.0]], np.float32)
    w2 = np.array([[1.0], [5.0], [2.0]], np.float32)  # unit 1 of layer 1 is dead on input
    b1 = np.array([0.5, -1.0, 0.25], np.float32)
    b2 = np.array([0.1], np.float32)
    x = np.array([[1.0, -2.0], [0.5, 0.5]], np.float32)
    for params in (
        {"w1": w1, "b1": b1, "w2": w2, "b2": b2},
        {"W_1": w1, "b_1": b1, "W_2": w2, "b_2": b2},
        [w1, b1, w2, b2],
        [w1, w2],  # a Keras list without biases
    ):
        small, kept = compact(params)
        assert [k.tolist() for k in kept] == [[0, 2], [0]]
        np.testing.assert_allclose(
            np.asarray(mlp_apply(small, x)), np.asarray(mlp_apply(params, x)), rtol=1e-6
        )
