"""Mask builders: exact counts, ordering, purity, NumPy/JAX agreement, jit/vmap, bad input."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunejax as pj

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Properties that compile a JAX computation per drawn shape run fewer examples.
JAX_SETTINGS = settings(SETTINGS, max_examples=12)

DTYPES = {"float32": np.float32, "float64": np.float64, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------- strategies


@st.composite
def matrices(draw, dtype=None, min_side=1, max_side=9):
    r = draw(st.integers(min_side, max_side))
    c = draw(st.integers(min_side, max_side))
    seed = draw(st.integers(0, 2**31 - 1))
    name = dtype or draw(st.sampled_from(["float32", "float64"]))
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(r, c))
    if draw(st.booleans()):  # ties: quantise so many magnitudes repeat, some exactly zero
        w = np.round(w * 2) / 2
    return w.astype(np.float64).astype(np.float32 if name == "float32" else np.float64)


@st.composite
def pytrees(draw, dtype=None):
    """A Flax-style dict, a Keras-style list, or a nested tuple/dict mix."""
    layout = draw(st.sampled_from(["flax", "keras", "nested"]))
    n_layers = draw(st.integers(1, 3))
    ws = [draw(matrices(dtype=dtype)) for _ in range(n_layers)]
    bs = [np.ones(w.shape[1], w.dtype) for w in ws]
    if layout == "flax":
        return {f"Dense_{i}": {"kernel": w, "bias": b} for i, (w, b) in enumerate(zip(ws, bs))}
    if layout == "keras":
        return [x for pair in zip(ws, bs) for x in pair]
    return {"encoder": tuple((w, b) for w, b in zip(ws, bs)), "scale": np.ones(3, np.float32)}


def fractions():
    return st.one_of(
        st.floats(0.0, 1.0, allow_nan=False),
        st.sampled_from([0.0, 0.5, 1.0, 0.25, 0.75, 0.9]),
    )


def kernel_leaves(tree):
    return [x for x in jax.tree_util.tree_leaves(tree) if np.ndim(x) >= 2]


def to_jax(tree):
    return jax.tree_util.tree_map(jnp.asarray, tree)


def as_np(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def oracle_magnitude(w, s):
    """Independent reference: lexsort by (|w|, flat index), prune the first round(s*n)."""
    flat = np.abs(np.asarray(w, np.float64)).ravel()
    k = int(np.round(s * flat.size))
    order = np.lexsort((np.arange(flat.size), flat))
    keep = np.ones(flat.size, bool)
    keep[order[:k]] = False
    return keep.reshape(np.shape(w))


# ----------------------------------------------------------------------------- magnitude


@SETTINGS
@given(tree=pytrees(), s=fractions())
def test_magnitude_exact_count_and_order(tree, s):
    masks = pj.magnitude_masks(tree, s)
    assert jax.tree_util.tree_structure(masks) == jax.tree_util.tree_structure(tree)
    for w, m in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(masks)):
        assert isinstance(m, np.ndarray) and m.dtype == np.bool_ and m.shape == w.shape
        if w.ndim < 2:
            assert m.all()
            continue
        assert (~m).sum() == int(np.round(s * w.size))
        if m.any() and (~m).any():
            assert np.abs(w[~m]).max() <= np.abs(w[m]).min()
        np.testing.assert_array_equal(m, oracle_magnitude(w, s))


@SETTINGS
@given(tree=pytrees(), s=fractions())
def test_magnitude_idempotent_and_pure(tree, s):
    before = jax.tree_util.tree_map(np.copy, tree)
    masks = pj.magnitude_masks(tree, s)
    assert trees_equal(tree, before)  # nothing mutated
    assert trees_equal(masks, pj.magnitude_masks(tree, s))  # same in, same out
    pruned = pj.apply_masks(tree, masks)
    assert trees_equal(pj.magnitude_masks(pruned, s), masks)
    assert trees_equal(pj.apply_masks(pruned, masks), pruned)


@SETTINGS
@given(tree=pytrees(), s=fractions())
def test_magnitude_global_scope(tree, s):
    masks = pj.magnitude_masks(tree, s, scope="global")
    ws = kernel_leaves(tree)
    ms = [m for m in jax.tree_util.tree_leaves(masks) if m.ndim >= 2]
    n = sum(w.size for w in ws)
    assert sum((~m).sum() for m in ms) == int(np.round(s * n))
    pruned = np.concatenate([np.abs(w[~m]).astype(np.float64) for w, m in zip(ws, ms)])
    kept = np.concatenate([np.abs(w[m]).astype(np.float64) for w, m in zip(ws, ms)])
    if pruned.size and kept.size:
        assert pruned.max() <= kept.min()
    cat = np.concatenate([w.ravel().astype(np.float64) for w in ws])
    np.testing.assert_array_equal(np.concatenate([m.ravel() for m in ms]), oracle_magnitude(cat, s))


@JAX_SETTINGS
@given(tree=pytrees(dtype="float32"), s=fractions())
def test_numpy_and_jax_agree(tree, s):
    m_np = pj.magnitude_masks(tree, s)
    m_jx = pj.magnitude_masks(to_jax(tree), s)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(m_jx))
    assert trees_equal(m_np, m_jx)
    assert trees_equal(
        pj.unit_masks(tree, s, prune_output=True), pj.unit_masks(to_jax(tree), s, prune_output=True)
    )
    g_np = pj.magnitude_masks(tree, s, scope="global")
    assert trees_equal(g_np, pj.magnitude_masks(to_jax(tree), s, scope="global"))


@JAX_SETTINGS
@given(w=matrices(dtype="float32"), s=fractions())
def test_bfloat16_counts_and_order(w, s):
    wb = jnp.asarray(w, jnp.bfloat16)
    m = np.asarray(pj.magnitude_masks({"w": wb}, s)["w"])
    assert (~m).sum() == int(np.round(s * w.size))
    np.testing.assert_array_equal(m, oracle_magnitude(np.asarray(wb, np.float32), s))


@JAX_SETTINGS
@given(tree=pytrees(dtype="float32"), k=st.integers(0, 64))
def test_jit_and_vmap_match_eager(tree, k):
    s = k / 64  # exactly representable, so float32 tracing cannot shift round(s * n)
    jtree = to_jax(tree)
    eager = pj.magnitude_masks(jtree, s)
    static = jax.jit(pj.magnitude_masks, static_argnames=("scope",))(jtree, s)
    traced = jax.jit(lambda p, s: pj.magnitude_masks(p, s))(jtree, jnp.float32(s))
    assert trees_equal(eager, static) and trees_equal(eager, traced)
    levels = jnp.array([0.0, s, 0.5, 1.0], jnp.float32)
    batched = jax.vmap(lambda s: pj.magnitude_masks(jtree, s))(levels)
    for i, lvl in enumerate([0.0, s, 0.5, 1.0]):
        one = jax.tree_util.tree_map(lambda x, i=i: x[i], batched)
        assert trees_equal(one, pj.magnitude_masks(jtree, lvl))
    u_eager = pj.unit_masks(jtree, s, prune_output=True)
    assert trees_equal(
        u_eager, jax.jit(lambda p, s: pj.unit_masks(p, s, prune_output=True))(jtree, jnp.float32(s))
    )


def test_magnitude_ties_lower_index_first():
    w = np.array([[1.0, 1.0, 1.0, 1.0]], np.float32)
    m = pj.magnitude_masks({"w": w}, 0.5, where=lambda p, x: True)["w"]
    np.testing.assert_array_equal(m, [[False, False, True, True]])


def test_round_half_to_even():
    w = np.arange(1, 11, dtype=np.float32).reshape(2, 5)  # n = 10
    assert (~pj.magnitude_masks([w], 0.25)[0]).sum() == 2  # 2.5 -> 2
    assert (~pj.magnitude_masks([w], 0.35)[0]).sum() == 4  # 3.5 -> 4
    assert (~pj.magnitude_masks([w], 0.05)[0]).sum() == 0  # 0.5 -> 0
    assert (~pj.magnitude_masks([w], 0.15)[0]).sum() == 2  # 1.5 -> 2


def test_per_leaf_sparsity_mapping_forms():
    rng = np.random.default_rng(0)
    p = {
        "Dense_0": {"kernel": rng.normal(size=(20, 10)), "bias": np.zeros(10)},
        "Dense_1": {"kernel": rng.normal(size=(10, 10)), "bias": np.zeros(10)},
    }
    by_path = pj.magnitude_masks(p, {"Dense_0/kernel": 0.9, "Dense_1/kernel": 0.5})
    by_prefix = pj.magnitude_masks(p, {"Dense_0": 0.9, "Dense_1": 0.5})
    nested = pj.magnitude_masks(p, {"Dense_0": {"kernel": 0.9}, "Dense_1": {"kernel": 0.5}})
    assert trees_equal(by_path, by_prefix) and trees_equal(by_path, nested)
    assert (~by_path["Dense_0"]["kernel"]).sum() == 180
    assert (~by_path["Dense_1"]["kernel"]).sum() == 50
    only_first = pj.magnitude_masks(p, {"Dense_0": 0.9})
    assert only_first["Dense_1"]["kernel"].all()  # unnamed leaves stay dense


def test_keras_list_round_trip():
    rng = np.random.default_rng(1)
    weights = [
        rng.normal(size=(12, 8)).astype(np.float32),
        rng.normal(size=8).astype(np.float32),
        rng.normal(size=(8, 6)).astype(np.float32),
        rng.normal(size=6).astype(np.float32),
        rng.normal(size=(6, 3)).astype(np.float32),
        rng.normal(size=3).astype(np.float32),
    ]
    masks = pj.magnitude_masks(weights, [0.9, None, 0.9, None, 0.5, None])
    assert isinstance(masks, list) and len(masks) == 6
    assert all(isinstance(m, np.ndarray) and m.dtype == np.bool_ for m in masks)
    assert masks[1].all() and masks[3].all() and masks[5].all()
    assert [(~m).sum() for m in masks[::2]] == [86, 43, 9]
    pruned = pj.apply_masks(weights, masks)
    assert isinstance(pruned, list) and all(p.dtype == np.float32 for p in pruned)
    units = pj.unit_masks(weights, 0.5, prune_output=True)
    for w_mask, b_mask in zip(units[::2], units[1::2]):
        np.testing.assert_array_equal(w_mask[0], b_mask)  # bias follows its column


# ----------------------------------------------------------------------------- unit


@SETTINGS
@given(tree=pytrees(), s=fractions(), ord=st.sampled_from([1, 2, np.inf]))
def test_unit_masks_column_norm_oracle(tree, s, ord):
    masks = pj.unit_masks(tree, s, ord=ord, prune_output=True)
    layers = pj.dense_layers(tree)
    leaves = jax.tree_util.tree_leaves(tree)
    mleaves = jax.tree_util.tree_leaves(masks)
    for layer in layers:
        w, m = leaves[layer.kernel], mleaves[layer.kernel]
        norms = np.linalg.norm(w.astype(np.float64), ord=ord, axis=0)
        expect_cols = oracle_magnitude(norms, s)
        np.testing.assert_array_equal(m, np.broadcast_to(expect_cols, w.shape))
        assert (~expect_cols).sum() == int(np.round(s * w.shape[1]))
        if layer.bias is not None:
            np.testing.assert_array_equal(mleaves[layer.bias], expect_cols)


def test_unit_masks_flax_bias_pairing():
    w = np.array([[3.0, 0.1, 2.0, 0.2], [3.0, 0.1, 2.0, 0.2]], np.float32)
    p = {"Dense_0": {"kernel": w, "bias": np.ones(4, np.float32)}}
    m = pj.unit_masks(p, 0.5, prune_output=True)
    np.testing.assert_array_equal(m["Dense_0"]["bias"], [True, False, True, False])
    np.testing.assert_array_equal(m["Dense_0"]["kernel"][0], [True, False, True, False])


# ----------------------------------------------------------------------------- others


@SETTINGS
@given(tree=pytrees(), q=st.floats(0.0, 3.0, allow_nan=False))
def test_threshold_masks(tree, q):
    masks = pj.threshold_masks(tree, q)
    for w, m in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(masks)):
        if w.ndim < 2:
            assert m.all()
        else:
            np.testing.assert_array_equal(m, np.abs(w) >= q * np.std(w))


@JAX_SETTINGS
@given(
    r=st.integers(1, 4),
    c=st.integers(1, 6),
    nm=st.sampled_from([(2, 4), (1, 4), (0, 2), (3, 3)]),
    seed=st.integers(0, 1000),
    use_jax=st.booleans(),
)
def test_nm_masks(r, c, nm, seed, use_jax):
    n, m = nm
    w = np.random.default_rng(seed).normal(size=(r * m, c)).astype(np.float32)
    w = np.round(w * 2) / 2
    tree = {"w": jnp.asarray(w) if use_jax else w}
    mask = np.asarray(pj.nm_masks(tree, n, m)["w"])
    groups_m = mask.reshape(r, m, c)
    groups_w = np.abs(w).reshape(r, m, c)
    assert (groups_m.sum(axis=1) == n).all()
    for i in range(r):
        for j in range(c):
            kept, pruned = groups_w[i, groups_m[i, :, j], j], groups_w[i, ~groups_m[i, :, j], j]
            if kept.size and pruned.size:
                assert pruned.max() <= kept.min()
    other_axis = np.asarray(pj.nm_masks({"w": w.T}, n, m, axis=1)["w"])
    np.testing.assert_array_equal(other_axis, mask.T)


@JAX_SETTINGS
@given(
    gr=st.integers(1, 4),
    gc=st.integers(1, 4),
    bh=st.integers(1, 3),
    bw=st.integers(1, 3),
    s=fractions(),
    seed=st.integers(0, 1000),
)
def test_block_masks(gr, gc, bh, bw, s, seed):
    w = np.random.default_rng(seed).normal(size=(gr * bh, gc * bw)).astype(np.float32)
    m = pj.block_masks({"w": w}, s, block=(bh, bw))["w"]
    blocks = m.reshape(gr, bh, gc, bw)
    per_block = blocks.all(axis=(1, 3))
    assert (blocks.any(axis=(1, 3)) == per_block).all()  # constant on each block
    norms = np.sqrt((w.astype(np.float64).reshape(gr, bh, gc, bw) ** 2).sum(axis=(1, 3)))
    np.testing.assert_array_equal(per_block, oracle_magnitude(norms, s))
    assert trees_equal(pj.block_masks({"w": jnp.asarray(w)}, s, block=(bh, bw)), {"w": m})


@JAX_SETTINGS
@given(tree=pytrees(), s=fractions(), seed=st.integers(0, 2**16))
def test_random_masks(tree, s, seed):
    key = jax.random.key(seed)
    masks = pj.random_masks(key, tree, s)
    assert trees_equal(masks, pj.random_masks(key, tree, s))
    for w, m in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(masks)):
        assert isinstance(m, np.ndarray)
        assert (~m).sum() == (int(np.round(s * w.size)) if w.ndim >= 2 else 0)


def test_random_masks_differ_across_keys():
    tree = {"w": np.ones((30, 30), np.float32)}
    a = pj.random_masks(jax.random.key(0), tree, 0.5)["w"]
    b = pj.random_masks(jax.random.key(1), tree, 0.5)["w"]
    assert not np.array_equal(a, b)


def test_where_predicate_overrides_default():
    p = {"a": np.arange(1.0, 7.0).reshape(2, 3), "b": np.arange(1.0, 5.0)}
    m = pj.magnitude_masks(p, 0.5, where=lambda path, leaf: path == "b")
    assert m["a"].all()
    np.testing.assert_array_equal(m["b"], [False, False, True, True])


def test_combine_and_apply():
    p = {"w": np.arange(1.0, 9.0, dtype=np.float32).reshape(2, 4)}
    a = pj.magnitude_masks(p, 0.25)
    b = {"w": np.array([[True] * 4, [False, True, True, True]])}
    both = pj.combine(a, b)
    np.testing.assert_array_equal(both["w"], a["w"] & b["w"])
    out = pj.apply_masks(p, both)
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["w"], np.where(both["w"], p["w"], 0))
    jout = pj.apply_masks(to_jax(p), both)
    assert isinstance(jout["w"], jax.Array)
    np.testing.assert_array_equal(np.asarray(jout["w"]), out["w"])


def test_sparsity_report_table_and_dict():
    p = {"Dense_0": {"kernel": np.ones((10, 10)), "bias": np.ones(10)}}
    pruned = pj.apply_masks(p, pj.magnitude_masks(p, 0.9))
    rep = pj.sparsity_report(pruned)
    d = rep.to_dict()
    assert d["kept"] == 20 and d["total"] == 110
    assert math.isclose(d["sparsity"], 90 / 110)
    kernel = next(r for r in d["leaves"] if r["path"] == "Dense_0/kernel")
    assert kernel["kept"] == 10 and kernel["sparsity"] == pytest.approx(0.9)
    text = str(rep)
    assert "Dense_0/kernel" in text and "10x10" in text and "total" in text
    masks_rep = pj.sparsity_report(pj.magnitude_masks(p, 0.9))
    assert masks_rep.kept == 20


# ----------------------------------------------------------------------------- bad input

P = {"Dense_0": {"kernel": np.ones((4, 4), np.float32), "bias": np.ones(4, np.float32)}}


@pytest.mark.parametrize("s", [-0.1, 1.1, float("nan"), float("inf")])
def test_bad_sparsity_names_leaf(s):
    with pytest.raises(ValueError, match=r"Dense_0/kernel.*\[0, 1\]"):
        pj.magnitude_masks(P, s)
    with pytest.raises(ValueError, match="Dense_0/kernel"):
        pj.unit_masks(P, s)
    with pytest.raises(ValueError, match="Dense_0/kernel"):
        pj.block_masks(P, s, block=(2, 2))
    with pytest.raises(ValueError, match="Dense_0/kernel"):
        pj.random_masks(jax.random.key(0), P, s)


def test_bad_sparsity_type():
    with pytest.raises(TypeError, match="sparsity"):
        pj.magnitude_masks(P, "0.5")
    with pytest.raises(TypeError, match="global"):
        pj.magnitude_masks(P, {"Dense_0": 0.5}, scope="global")
    with pytest.raises(ValueError, match="scope"):
        pj.magnitude_masks(P, 0.5, scope="model")


def test_sparsity_map_naming_missing_or_unselected_leaf():
    with pytest.raises(ValueError, match="Dense_7"):
        pj.magnitude_masks(P, {"Dense_7/kernel": 0.5})
    with pytest.raises(ValueError, match="Dense_0/bias"):
        pj.magnitude_masks(P, {"Dense_0/bias": 0.5})
    with pytest.raises(ValueError, match=r"Dense_0/kernel.*\[0, 1\]"):
        pj.magnitude_masks(P, {"Dense_0/kernel": 2.0})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights(bad):
    p = {"layer": {"kernel": np.array([[1.0, bad], [2.0, 3.0]], np.float32)}}
    for fn in (
        lambda: pj.magnitude_masks(p, 0.5),
        lambda: pj.unit_masks(p, 0.5),
        lambda: pj.threshold_masks(p, 1.0),
        lambda: pj.nm_masks(p, 1, 2),
        lambda: pj.block_masks(p, 0.5, block=(1, 1)),
    ):
        with pytest.raises(ValueError, match="layer/kernel.*non-finite"):
            fn()


def test_structured_rank_errors_and_where_escape():
    p = {"conv": np.ones((3, 3, 2, 4), np.float32), "dense": np.ones((4, 4), np.float32)}
    # unit_masks prunes conv filters (tests/test_unit_masks_layouts.py); 1-D leaves it refuses
    with pytest.raises(ValueError, match=r"'vec'.*\(4,\)"):
        pj.unit_masks(p | {"vec": np.ones(4, np.float32)}, 0.5, where=lambda path, leaf: True)
    with pytest.raises(ValueError, match="conv"):
        pj.block_masks(p, 0.5, block=(2, 2))
    only_dense = lambda path, leaf: path == "dense"  # noqa: E731
    assert pj.unit_masks(p, 0.5, where=only_dense)["conv"].all()
    assert pj.block_masks(p, 0.5, block=(2, 2), where=only_dense)["conv"].all()


def test_block_shape_not_divisible():
    with pytest.raises(ValueError, match=r"Dense_0/kernel.*\(4, 4\).*\(3, 2\)"):
        pj.block_masks(P, 0.5, block=(3, 2))
    with pytest.raises(ValueError, match="block"):
        pj.block_masks(P, 0.5, block=(0, 2))


def test_nm_errors():
    with pytest.raises(ValueError, match="n must be in"):
        pj.nm_masks(P, 5, 4)
    with pytest.raises(ValueError, match=r"Dense_0/kernel.*not divisible by m=3"):
        pj.nm_masks(P, 2, 3)
    with pytest.raises(ValueError, match="m must be"):
        pj.nm_masks(P, 0, 0)
    with pytest.raises(TypeError, match="n must be an int"):
        pj.nm_masks(P, 2.0, 4)


def test_threshold_errors():
    with pytest.raises(ValueError, match="Dense_0/kernel"):
        pj.threshold_masks(P, -1.0)
    with pytest.raises(ValueError, match="Dense_0/kernel"):
        pj.threshold_masks(P, float("nan"))


def test_mask_tree_mismatch():
    masks = pj.magnitude_masks(P, 0.5)
    with pytest.raises(ValueError, match="Dense_0/bias"):
        pj.apply_masks(P, {"Dense_0": {"kernel": masks["Dense_0"]["kernel"]}})
    wrong_shape = {"Dense_0": {"kernel": np.ones((4, 3), bool), "bias": np.ones(4, bool)}}
    with pytest.raises(ValueError, match=r"Dense_0/kernel.*\(4, 3\)"):
        pj.apply_masks(P, wrong_shape)
    not_bool = {"Dense_0": {"kernel": np.ones((4, 4)), "bias": np.ones(4, bool)}}
    with pytest.raises(TypeError, match="Dense_0/kernel.*bool"):
        pj.apply_masks(P, not_bool)
    with pytest.raises(ValueError, match="Dense_0/kernel"):
        pj.combine(masks, wrong_shape)


def test_empty_pytree_and_non_array_leaf():
    for empty in ({}, [], ()):
        with pytest.raises(ValueError, match="empty"):
            pj.magnitude_masks(empty, 0.5)
    with pytest.raises(TypeError, match="'a'.*str"):
        pj.magnitude_masks({"a": "weights"}, 0.5)


# ----------------------------------------------------------------------------- exact scores


def _exact_oracle(values, s):
    """Prune ``round(s * n)`` entries by exact Python magnitude (ints compare exactly), ties by
    index."""
    n = len(values)
    k = int(np.round(np.float64(s) * n))
    order = sorted(range(n), key=lambda i: (abs(values[i]), i))
    keep = np.ones(n, bool)
    keep[order[:k]] = False
    return keep


BIG_INTS = [2**53 + 1, 2**53, -(2**53) - 1, 2**24 + 1, 2**24, -(2**24) - 1, -(2**63), 2**63 - 1]


@pytest.mark.parametrize("s", [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875])
def test_integer_weights_rank_exactly_beyond_float_precision(s):
    x = np.array(BIG_INTS + [7, -7, 0, 2**53], np.int64)  # ties: ±7, 2**53 twice
    ints = [int(v) for v in x]
    m = pj.magnitude_masks({"a": x.reshape(3, 4)}, s)["a"].reshape(-1)
    np.testing.assert_array_equal(m, _exact_oracle(ints, s))
    # nm: within a pair the exact larger magnitude survives
    nm = pj.nm_masks({"a": x.reshape(6, 2).T.copy()}, 1, 2, axis=0)["a"].T.reshape(-1)
    pairs = x.reshape(6, 2)
    # ties (7, -7): the lower index is pruned first
    expect = [[abs(int(a)) > abs(int(b)), abs(int(b)) >= abs(int(a))] for a, b in pairs]
    np.testing.assert_array_equal(nm, np.array(expect).reshape(-1))


@pytest.mark.parametrize("s", [0.2, 0.4, 0.5, 0.6, 0.8])
def test_global_scope_mixes_int_and_float_leaves_exactly(s):
    ints = np.array([[2**53 + 1, 2**53, 2**24 + 1, 2**24, 3]], np.int64)
    floats = np.array([[2.0**53, 2.0**53 + 2, 2.0**24, 0.5, 3.0]], np.float64)
    small = np.array([[2**24 + 1, -(2**15)]], np.int32)
    m = pj.magnitude_masks({"a": ints, "b": floats, "c": small}, s, scope="global")
    values = [int(v) for v in ints[0]] + [float(v) for v in floats[0]] + [int(v) for v in small[0]]
    got = np.concatenate([m["a"][0], m["b"][0], m["c"][0]])
    np.testing.assert_array_equal(got, _exact_oracle(values, s))


@pytest.mark.parametrize("s", [0.25, 0.5, 0.75])
def test_integer_ranking_is_exact_under_jax_and_jit(s):
    x = jnp.array([2**30 + 1, 2**30, -(2**31), 2**31 - 1, 2**24 + 1, 2**24, 3, -3], jnp.int32)
    f = jnp.array([[float(2**24), 2.0**30 + 128]], jnp.float32)
    ints = [int(v) for v in np.asarray(x)]
    eager = pj.magnitude_masks({"a": x.reshape(2, 4)}, s)["a"]
    np.testing.assert_array_equal(np.asarray(eager).reshape(-1), _exact_oracle(ints, s))
    glob = jax.jit(lambda p: pj.magnitude_masks(p, s, scope="global"))(
        {"a": x.reshape(2, 4), "f": f}
    )
    got = np.concatenate([np.asarray(glob["a"]).reshape(-1), np.asarray(glob["f"]).reshape(-1)])
    values = ints + [float(v) for v in np.asarray(f)[0]]
    np.testing.assert_array_equal(got, _exact_oracle(values, s))


def test_small_and_unsigned_integers_and_bools_rank_by_magnitude():
    i8 = np.array([[-128, 127, -1, 0]], np.int8)
    np.testing.assert_array_equal(pj.magnitude_masks([i8], 0.5)[0], [[True, True, False, False]])
    u64 = np.array([[2**64 - 1, 2**64 - 2, 2**63, 1]], np.uint64)
    np.testing.assert_array_equal(pj.magnitude_masks([u64], 0.5)[0], [[True, True, False, False]])
    b = np.array([[True, False, True, False]])
    np.testing.assert_array_equal(pj.magnitude_masks([b], 0.5)[0], [[True, False, True, False]])


@pytest.mark.parametrize(
    "build",
    [
        lambda p: pj.magnitude_masks(p, 0.5),
        lambda p: pj.magnitude_masks(p, 0.5, scope="global"),
        lambda p: pj.unit_masks(p, 0.5),
        lambda p: pj.block_masks(p, 0.5, block=(1, 1)),
        lambda p: pj.threshold_masks(p, 1.0),
        lambda p: pj.nm_masks(p, 1, 2),
    ],
)
@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_complex_weights_are_refused_naming_the_leaf(build, kind):
    w = np.array([[1 + 5j, 2 + 0j], [3 - 1j, 4j]], np.complex64)
    p = {"Dense_0": {"kernel": w if kind == "numpy" else jnp.asarray(w)}}
    with pytest.raises(TypeError, match=r"'Dense_0/kernel'.*complex64"):
        build(p)


@pytest.mark.parametrize("bad", ["0.5", b"0.5", True, np.bool_(False), np.array("0.5"), None])
def test_strings_and_bools_are_refused_as_sparsity_at_every_scope(bad):
    p = {"a": np.ones((2, 2), np.float32)}
    for call in (
        lambda: pj.magnitude_masks(p, bad),
        lambda: pj.magnitude_masks(p, bad, scope="global"),
        lambda: pj.unit_masks(p, bad),
        lambda: pj.block_masks(p, bad, block=(1, 1)),
        lambda: pj.random_masks(jax.random.key(0), p, bad),
        lambda: pj.threshold_masks(p, bad),
    ):
        with pytest.raises(TypeError):
            call()
    # in a per-leaf map, None means "leave unpruned", so {"a": None} names nothing
    with pytest.raises(ValueError if bad is None else TypeError):
        pj.magnitude_masks(p, {"a": bad})


# ----------------------------------------------------------------------------- bias pairing


def test_unit_masks_pairs_numbered_and_uppercase_names():
    w = np.array([[3.0, 0.1, 2.0, 0.2], [3.0, 0.1, 2.0, 0.2]], np.float32)
    expect = [True, False, True, False]
    for kname, bname in [("w1", "b1"), ("W", "b"), ("W_2", "b_2"), ("kernel3", "bias3")]:
        p = {kname: w, bname: np.ones(4, np.float32), "other": np.ones(4, np.float32)}
        m = pj.unit_masks(p, 0.5, prune_output=True)
        np.testing.assert_array_equal(m[bname], expect, err_msg=kname)
        assert m["other"].all()
    # several numbered layers in one flat dict pair by suffix, not by flatten order
    p = {
        "W1": np.ones((3, 4), np.float32) * [[1, 0.1, 1, 0.1]],
        "W2": np.ones((4, 4), np.float32) * [[0.1, 1, 1, 0.1]],
        "b1": np.ones(4, np.float32),
        "b2": np.ones(4, np.float32),
    }
    layers = pj.dense_layers(p)
    assert [(x.name, x.kernel, x.bias) for x in layers] == [("W1", 0, 2), ("W2", 1, 3)]
    m = pj.unit_masks(p, 0.5, prune_output=True)
    np.testing.assert_array_equal(m["b1"], expect)
    np.testing.assert_array_equal(m["b2"], [False, True, True, False])


def test_dense_layers_kinds():
    p = {
        "embed": np.ones((5, 3)),
        "Dense_0": {"kernel": np.ones((3, 2)), "bias": np.ones(2)},
        "keras": [np.ones((2, 2)), np.ones(2)],
    }
    kinds = {x.name: x.kind for x in pj.dense_layers(p)}
    assert kinds == {"Dense_0": "named", "embed": "unnamed", "keras/0": "sequence"}


def test_unit_masks_warns_about_an_unpaired_bias_beside_a_kernel():
    # "offset" sorts before "proj", so the [W, b] sequence rule does not pair it either
    p = {"layer": {"proj": np.ones((3, 4), np.float32), "offset": np.ones(4, np.float32)}}
    p["layer"]["proj"][:, 0] = 0.0
    assert pj.dense_layers(p)[0].bias is None
    with pytest.warns(UserWarning, match=r"'layer/proj'.*'layer/offset'"):
        m = pj.unit_masks(p, 0.25, prune_output=True)
    assert m["layer"]["offset"].all() and not m["layer"]["proj"][:, 0].any()
    # an unrelated width does not warn
    p["layer"]["offset"] = np.ones(3, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pj.unit_masks(p, 0.25, prune_output=True)


def test_unit_masks_refuses_a_paired_bias_of_the_wrong_width():
    p = {"Dense_0": {"kernel": np.ones((3, 4), np.float32), "bias": np.ones(5, np.float32)}}
    with pytest.raises(ValueError, match=r"'Dense_0/bias'.*\(5,\).*4 output"):
        pj.unit_masks(p, 0.5, prune_output=True)


@pytest.mark.parametrize("ord", ["2", True, None, 0, -1, float("nan")])
def test_unit_masks_refuses_bad_ord(ord):
    with pytest.raises((TypeError, ValueError), match="ord"):
        pj.unit_masks({"w": np.ones((2, 2), np.float32)}, 0.5, ord=ord)


def test_int64_beyond_int32_is_refused_when_ranking_runs_in_jax():
    big = {"a": np.array([[2**40, 2**40 + 1], [3, 4]], np.int64)}
    with pytest.raises(ValueError, match=r"'a' \(int64\).*beyond int32"):
        jax.vmap(lambda s: pj.magnitude_masks(big, s)["a"])(jnp.array([0.25, 0.5]))
    with pytest.raises(ValueError, match="'a'"):
        pj.magnitude_masks({**big, "j": jnp.ones((2, 2))}, 0.5)
    np.testing.assert_array_equal(pj.magnitude_masks(big, 0.25)["a"], [[True, True], [False, True]])
    fits = {"a": np.array([[2**20, 2**20 + 1], [3, 4]], np.int64)}
    m = jax.vmap(lambda s: pj.magnitude_masks(fits, s)["a"])(jnp.array([0.25, 0.5]))
    np.testing.assert_array_equal(m[1], [[True, True], [False, False]])


def test_threshold_masks_numpy_in_numpy_out_with_a_jax_quality():
    w = np.array([[1.0, 0.1], [2.0, -3.0]], np.float32)
    m = pj.threshold_masks({"k": w}, jnp.asarray(0.5))["k"]
    assert isinstance(m, np.ndarray)
    np.testing.assert_array_equal(m, np.abs(w) >= 0.5 * np.std(w))
