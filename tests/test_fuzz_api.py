"""API fuzzing: every input either satisfies the documented contract or raises ValueError/TypeError.

Hypothesis draws leaves of every dtype prunejax meets (float16, bfloat16, float32, float64, int8
to int64, unsigned, bool, complex64), 0-d to 4-d, empty, with NaN/inf and integers past 2**24
and 2**53, in dicts, lists and nested mixes, NumPy or JAX; and numeric arguments that are valid,
out of range, NaN, strings, None, bools, arrays or per-leaf maps.  For each call the test
checks either the contract (exact counts ``round(s * n)`` half to even among selected leaves,
the exact magnitude order with ties by index, NumPy in -> NumPy out, dtypes kept by
``apply_masks``, masks of the params' structure and shapes) or that a ValueError/TypeError was
raised, and that inputs the documentation accepts are not refused.  ``COUNTS`` records the cases
tried per group; the last test checks every group saw accepted and refused inputs.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prunejax as pj
from prunejax.compact import compact
from prunejax.schedules import polynomial_sparsity
from prunejax.transforms import masked

# PRUNEJAX_FUZZ_SCALE=20 multiplies every example count (a long run: about 20x the CI time).
SCALE = max(1, int(os.environ.get("PRUNEJAX_FUZZ_SCALE", "1")))
SETTINGS = settings(
    max_examples=50 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=True,
)
FEW = settings(SETTINGS, max_examples=25 * SCALE)

COUNTS: Counter = Counter()
REAL = ["float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64"]
REAL += ["uint8", "uint16", "uint32", "uint64", "bool"]
DTYPES = REAL + ["complex64"]


def np_dtype(name):
    return np.dtype(jnp.bfloat16) if name == "bfloat16" else np.dtype(name)


# ----------------------------------------------------------------------------- strategies


@st.composite
def arrays(draw, min_ndim=0, max_ndim=4, dtypes=DTYPES, max_side=5, even=False):
    dt = np_dtype(draw(st.sampled_from(dtypes)))
    nd = draw(st.integers(min_ndim, max_ndim))
    side = st.sampled_from([0, 2, 4]) if even else st.integers(0, max_side)
    shape = tuple(max(draw(side), 0 if draw(st.integers(0, 3)) == 0 else 1) for _ in range(nd))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = int(np.prod(shape, dtype=np.int64))
    if dt == np.bool_:
        x = rng.random(n) < 0.5
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        style = draw(st.sampled_from(["small", "big", "edge"]))
        if style == "small":  # many ties
            x = rng.integers(max(info.min, -3), 4, n)
        elif style == "big":
            x = rng.integers(info.min, info.max, n, endpoint=True, dtype=dt)
        else:  # around 2**24 and 2**53, where float32 / float64 stop being exact
            pool = [0, 1, info.max, info.min, info.max - 1]
            for b in (24, 31, 53, 63):
                pool += [2**b - 1, 2**b, 2**b + 1, -(2**b), -(2**b) - 1]
            pool = [v for v in pool if info.min <= v <= info.max]
            x = np.array([pool[i] for i in rng.integers(0, len(pool), n)], dtype=object)
        x = np.asarray(x).astype(dt) if n else np.zeros(0, dt)
    else:
        x = rng.normal(size=n) * 10.0 ** rng.integers(-3, 4)
        if draw(st.booleans()):
            x = np.round(x)  # ties
        if dt.kind == "c":
            x = x + 1j * rng.normal(size=n)
        if n and draw(st.integers(0, 6)) == 0:
            x[rng.integers(0, n)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        x = x.astype(dt)
    return x.reshape(shape)


@st.composite
def trees(draw, leaf=None, jax_ok=True):
    """A dict, a list or a nested dict/tuple mix of 1-4 leaves, NumPy or (sometimes) JAX."""
    leaf = arrays() if leaf is None else leaf
    leaves = [draw(leaf) for _ in range(draw(st.integers(1, 4)))]
    if jax_ok and draw(st.integers(0, 7)) == 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            leaves = [jnp.asarray(x) for x in leaves]
    layout = draw(st.sampled_from(["dict", "list", "nested"]))
    names = ["kernel", "bias", "w1", "b1", "embed", "x"]
    if layout == "dict":
        return {f"{names[i % len(names)]}_{i}": x for i, x in enumerate(leaves)}
    if layout == "list":
        return leaves
    return {"a": tuple(leaves[:-1]), "b": {"kernel": leaves[-1]}}


def good_numbers(lo=0.0, hi=1.0):
    return st.one_of(
        st.floats(lo, hi, allow_nan=False),
        st.sampled_from([lo, hi, 0.5, 0.25, 0.125, 0.375, 0.625]),
        st.sampled_from([np.float32(0.5), np.float16(0.25), np.array(0.75), np.int64(1)]),
    )


def numbers(valid=(0.0, 1.0)):
    """Numeric arguments: valid values (about half), edges, out of range, NaN, and non-numbers."""
    lo, hi = valid
    good = good_numbers(lo, hi)
    bad = st.one_of(
        st.sampled_from([-0.1, 1.5, np.nan, np.inf, -np.inf, 2]),
        st.sampled_from(["0.5", b"0.5", None, True, False, np.bool_(True), 0.5j, [], {}]),
        st.sampled_from([np.array([0.5, 0.5]), jnp.asarray(0.5), np.array("0.5")]),
    )
    return st.one_of(good, good, good, bad, bad)


# ----------------------------------------------------------------------------- oracles


def leaves_of(tree):
    return jax.tree_util.tree_leaves(tree)


def is_number_in(v, lo, hi):
    """Whether the API documents ``v`` as a valid number in ``[lo, hi]``."""
    if isinstance(v, bool | np.bool_ | str | bytes | complex) or v is None:
        return False
    if isinstance(v, np.ndarray | jax.Array):
        if v.ndim != 0 or np.dtype(v.dtype).kind not in "fiu":
            return False
    elif not isinstance(v, int | float | np.integer | np.floating):
        return False
    f = float(v)
    return lo <= f <= hi


def exact_values(leaf):
    """Python numbers with the exact value of every entry (ints stay ints)."""
    a = np.asarray(leaf)
    if a.dtype == np.bool_ or a.dtype.kind in "iu":
        return [int(v) for v in a.reshape(-1).tolist()]
    return [float(v) for v in a.astype(np.float64).reshape(-1)]


def oracle_keep(values, s):
    """False at the ``round(s * n)`` smallest magnitudes, ties by index (exact arithmetic)."""
    n = len(values)
    k = int(np.round(np.float64(s) * n))
    keep = np.ones(n, bool)
    keep[sorted(range(n), key=lambda i: (abs(values[i]), i))[:k]] = False
    return keep


def real_finite(leaf):
    a = np.asarray(leaf)
    if a.dtype.kind == "c" or not (a.dtype.kind in "biuf" or a.dtype == jnp.bfloat16):
        return False
    return a.dtype.kind in "biu" or bool(np.isfinite(a.astype(np.float64)).all())


def check_masks(params, masks):
    """Masks have the params' structure, shapes, bool dtype and array kind (JAX if a params
    leaf is a JAX array, else NumPy, whatever the kind of a concrete numeric argument)."""
    assert jax.tree_util.tree_structure(masks) == jax.tree_util.tree_structure(params)
    use_jax = any(isinstance(x, jax.Array) for x in leaves_of(params))
    for x, m in zip(leaves_of(params), leaves_of(masks), strict=True):
        assert np.shape(m) == np.shape(x) and np.dtype(m.dtype) == np.bool_
        assert isinstance(m, jax.Array) if use_jax else isinstance(m, np.ndarray)


def attempt(group, call, *, must_pass):
    """Run ``call``; count the outcome; only ValueError/TypeError may escape, and not for an
    input the documentation accepts."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = call()
    except (ValueError, TypeError) as e:
        COUNTS[group, "refused"] += 1
        assert not must_pass, f"{group}: a documented-valid input was refused: {e!r}"
        return None, False
    COUNTS[group, "accepted"] += 1
    return out, True


# ----------------------------------------------------------------------------- builders


@pytest.mark.parametrize("glob", [False, True], ids=["layer", "global"])
@SETTINGS
@given(tree=trees(), s=numbers())
def test_magnitude_masks(tree, s, glob):
    leaves = leaves_of(tree)
    selected = [np.ndim(x) >= 2 for x in leaves]
    valid = is_number_in(s, 0, 1) and all(real_finite(x) for x, c in zip(leaves, selected) if c)
    if glob:
        valid = valid and any(selected)
    group = "magnitude_masks(global)" if glob else "magnitude_masks(layer)"
    scope = "global" if glob else "layer"
    masks, ok = attempt(group, lambda: pj.magnitude_masks(tree, s, scope=scope), must_pass=valid)
    if not ok:
        return
    check_masks(tree, masks)
    mleaves = leaves_of(masks)
    for m, c in zip(mleaves, selected, strict=True):
        if not c:
            assert np.asarray(m).all()
    chosen = [i for i, c in enumerate(selected) if c]
    if glob:
        values = [v for i in chosen for v in exact_values(leaves[i])]
        got = np.concatenate([np.asarray(mleaves[i]).reshape(-1) for i in chosen])
        np.testing.assert_array_equal(got, oracle_keep(values, s))
    else:
        for i in chosen:
            expect = oracle_keep(exact_values(leaves[i]), s)
            np.testing.assert_array_equal(np.asarray(mleaves[i]).reshape(-1), expect)


KEYS = [jax.random.key(0), jax.random.key(1), jax.random.PRNGKey(2)] * 3 + [None, "a", 0, True]


@FEW
@given(tree=trees(leaf=arrays(max_side=3)), s=numbers(), key=st.sampled_from(KEYS))
def test_random_masks(tree, s, key):
    leaves = leaves_of(tree)
    good_key = isinstance(key, jax.Array)
    masks, ok = attempt(
        "random_masks",
        lambda: pj.random_masks(key, tree, s),
        must_pass=is_number_in(s, 0, 1) and good_key,
    )
    if not ok:
        return
    check_masks(tree, masks)
    for x, m in zip(leaves, leaves_of(masks), strict=True):
        n = int(np.size(x))
        pruned = int((~np.asarray(m)).sum())
        assert pruned == (int(np.round(np.float64(s) * n)) if np.ndim(x) >= 2 else 0)


@SETTINGS
@given(tree=trees(leaf=arrays(1, 2)), s=numbers(), ord=st.sampled_from([1, 2, np.inf, "2", 0]))
def test_unit_masks(tree, s, ord):
    leaves = leaves_of(tree)
    kernels = [x for x in leaves if np.ndim(x) == 2]
    valid = is_number_in(s, 0, 1) and ord in (1, 2, np.inf) and all(map(real_finite, kernels))
    layers = pj.dense_layers(tree)
    # a paired bias of the wrong width is refused (no mask of the wrong shape)
    valid = valid and all(
        layer.bias is None or np.shape(leaves[layer.bias])[0] == np.shape(leaves[layer.kernel])[1]
        for layer in layers
    )
    masks, ok = attempt(
        "unit_masks", lambda: pj.unit_masks(tree, s, ord=ord, prune_output=True), must_pass=valid
    )
    if not ok:
        return
    check_masks(tree, masks)
    mleaves = [np.asarray(m) for m in leaves_of(masks)]
    biases = {layer.bias: layer.kernel for layer in layers if layer.bias is not None}
    for i, (x, m) in enumerate(zip(leaves, mleaves, strict=True)):
        if np.ndim(x) == 2 and np.shape(x)[0]:
            cols = m[0]
            assert (m == cols[None, :]).all()
            assert int((~cols).sum()) == int(np.round(np.float64(s) * np.shape(x)[1]))
        elif i in biases and np.shape(leaves[biases[i]])[0]:
            np.testing.assert_array_equal(m, mleaves[biases[i]][0])  # the bias follows
        elif np.ndim(x) == 1:
            assert m.all()


@SETTINGS
@given(
    tree=trees(leaf=arrays(2, 2, even=True)),
    s=numbers(),
    block=st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2)] * 2 + [(0, 1), (2,), "2x2", (True, 1)]),
)
def test_block_masks(tree, s, block):
    leaves = leaves_of(tree)
    good_block = block in [(1, 1), (2, 1), (1, 2), (2, 2)] and not isinstance(block[0], bool)
    valid = (
        is_number_in(s, 0, 1)
        and good_block
        and all(map(real_finite, leaves))
        and all(np.shape(x)[0] % block[0] == 0 and np.shape(x)[1] % block[1] == 0 for x in leaves)
    )
    masks, ok = attempt(
        "block_masks", lambda: pj.block_masks(tree, s, block=block), must_pass=valid
    )
    if not ok:
        return
    check_masks(tree, masks)
    bh, bw = block
    for x, m in zip(leaves, leaves_of(masks), strict=True):
        r, c = np.shape(x)
        grid = np.asarray(m).reshape(r // bh, bh, c // bw, bw)
        assert (grid == grid[:, :1, :, :1]).all()  # constant on blocks
        nblocks = (r // bh) * (c // bw)
        assert int((~grid[:, 0, :, 0]).sum()) == int(np.round(np.float64(s) * nblocks))


@SETTINGS
@given(
    tree=trees(),
    n=st.sampled_from([0, 1, 2] * 3 + [3, -1, 1.0, True, "1"]),
    m=st.sampled_from([1, 2] * 4 + [4, 0, 2.0, None]),
    axis=st.sampled_from([0, 1, -1] * 3 + [5, 0.0]),
)
def test_nm_masks(tree, n, m, axis):
    leaves = leaves_of(tree)
    ints = all(type(v) is int for v in (n, m, axis))
    valid = ints and m >= 1 and 0 <= n <= m
    for x in leaves:
        if valid and np.ndim(x) >= 2:
            valid = real_finite(x) and -np.ndim(x) <= axis < np.ndim(x)
            valid = valid and np.shape(x)[axis] % m == 0
    masks, ok = attempt("nm_masks", lambda: pj.nm_masks(tree, n, m, axis=axis), must_pass=valid)
    if not ok:
        return
    check_masks(tree, masks)
    for x, mk in zip(leaves, leaves_of(masks), strict=True):
        if np.ndim(x) < 2:
            assert np.asarray(mk).all()
            continue
        vals = np.moveaxis(np.array(exact_values(x), dtype=object).reshape(np.shape(x)), axis, -1)
        keep = np.moveaxis(np.asarray(mk), axis, -1)
        for g, k in zip(vals.reshape(-1, m), keep.reshape(-1, m), strict=True):
            top = sorted(range(m), key=lambda i: (abs(g[i]), i))[m - n :]
            assert sorted(np.flatnonzero(k).tolist()) == sorted(top)


@SETTINGS
@given(tree=trees(), q=numbers(valid=(0.0, 3.0)))
def test_threshold_masks(tree, q):
    leaves = leaves_of(tree)
    valid = is_number_in(q, 0, 1e300) and all(real_finite(x) for x in leaves if np.ndim(x) >= 2)
    masks, ok = attempt("threshold_masks", lambda: pj.threshold_masks(tree, q), must_pass=valid)
    if not ok:
        return
    check_masks(tree, masks)
    for x, m in zip(leaves, leaves_of(masks), strict=True):
        m = np.asarray(m).reshape(-1)
        if np.ndim(x) < 2:
            assert m.all()
        elif m.any() and (~m).any():  # a threshold: every kept magnitude >= every pruned one
            mag = np.abs(np.asarray(x).astype(np.float64)).reshape(-1)
            assert mag[m].min() >= mag[~m].max()


# ----------------------------------------------------------------------------- mask algebra


@st.composite
def masks_for(draw, tree):
    """A mask tree for ``tree``: usually matching; sometimes a wrong shape, dtype or structure."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out = [rng.random(np.shape(x)) < 0.5 for x in leaves]
    fault = draw(st.sampled_from(["none"] * 5 + ["shape", "dtype", "structure", "jax"]))
    i = draw(st.integers(0, len(out) - 1))
    if fault == "shape":
        out[i] = np.ones(np.shape(out[i]) + (1,), bool)
    elif fault == "dtype":
        out[i] = out[i].astype(draw(st.sampled_from([np.float32, np.int8, np.uint8])))
    elif fault == "jax":
        out = [jnp.asarray(m) for m in out]
    masks = jax.tree_util.tree_unflatten(treedef, out)
    if fault == "structure":
        masks = out + [np.ones(1, bool)]
    return masks, fault


@FEW
@given(data=st.data(), tree=trees())
def test_apply_masks(data, tree):
    masks, fault = data.draw(masks_for(tree))
    out, ok = attempt(
        "apply_masks", lambda: pj.apply_masks(tree, masks), must_pass=fault in ("none", "jax")
    )
    if not ok:
        return
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
    for x, m, y in zip(leaves_of(tree), leaves_of(masks), leaves_of(out), strict=True):
        assert np.dtype(y.dtype) == np.dtype(x.dtype) and np.shape(y) == np.shape(x)
        if isinstance(x, jax.Array):
            assert isinstance(y, jax.Array)
        else:
            assert isinstance(y, np.ndarray)
        a, b = np.asarray(x), np.asarray(y)
        m = np.asarray(m)
        assert (b[~m] == 0).all()
        kept_in, kept_out = a[m], b[m]
        if a.dtype.kind in "fc" or a.dtype == jnp.bfloat16:
            kept_in = kept_in.astype(np.complex128 if a.dtype.kind == "c" else np.float64)
            kept_out = kept_out.astype(kept_in.dtype)
            np.testing.assert_array_equal(kept_out, kept_in)  # NaN == NaN here
        else:
            assert (kept_out == kept_in).all()


@SETTINGS
@given(data=st.data(), tree=trees(leaf=arrays(dtypes=["bool"])), k=st.integers(1, 3))
def test_combine(data, tree, k):
    others = [data.draw(masks_for(tree)) for _ in range(k)]
    valid = all(f in ("none", "jax") for _, f in others)
    out, ok = attempt("combine", lambda: pj.combine(tree, *[m for m, _ in others]), must_pass=valid)
    if not ok:
        return
    expect = [np.asarray(x) for x in leaves_of(tree)]
    for m, _ in others:
        expect = [e & np.asarray(o) for e, o in zip(expect, leaves_of(m), strict=True)]
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
    for e, o in zip(expect, leaves_of(out), strict=True):
        np.testing.assert_array_equal(np.asarray(o), e)


# ----------------------------------------------------------------------------- masked


@FEW
@given(
    shape=st.sampled_from([(8, 6), (2, 3), (4,), (1, 1)]),
    grad_shape=st.sampled_from(["same"] * 4 + [(1, 6), (6,), (), (8, 1), (1,)]),
    structure=st.sampled_from(["same"] * 4 + ["extra", "missing"]),
    jit=st.booleans(),
)
def test_masked_update(shape, grad_shape, structure, jit):
    rng = np.random.default_rng(0)
    masks = {"w": rng.random(shape) < 0.5, "b": np.ones(3, bool)}
    params = {"w": jnp.ones(shape, jnp.float32), "b": jnp.ones(3, jnp.float32)}
    gshape = shape if grad_shape == "same" else grad_shape
    grads = {"w": jnp.ones(gshape, jnp.float32), "b": jnp.ones(3, jnp.float32)}
    if structure == "extra":
        grads["c"] = jnp.ones(3)
    elif structure == "missing":
        del grads["b"]
    tx = masked(optax.sgd(1.0), masks)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    valid = tuple(gshape) == tuple(shape) and structure == "same"
    out, ok = attempt("masked.update", lambda: update(grads, state, params), must_pass=valid)
    if ok:
        updates, _ = out
        np.testing.assert_array_equal(np.asarray(updates["w"]) != 0, masks["w"])
        assert np.shape(updates["w"]) == shape


# ----------------------------------------------------------------------------- compact


@st.composite
def mlps(draw):
    """A small MLP in one of the layouts compact knows, sometimes with a foreign leaf."""
    sizes = draw(st.lists(st.integers(1, 4), min_size=2, max_size=4))
    dt = np_dtype(draw(st.sampled_from(["float32", "float64", "float16", "int32", "complex64"])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    ws, bs = [], []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        w = np.round(rng.normal(size=(a, b)) * 2) * (rng.random((a, b)) < 0.5)
        ws.append(w.astype(dt))
        bs.append(np.round(rng.normal(size=b)).astype(dt))
    layout = draw(st.sampled_from(["flax", "keras", "numbered"]))
    if layout == "flax":
        tree = {f"Dense_{i}": {"kernel": w, "bias": b} for i, (w, b) in enumerate(zip(ws, bs))}
    elif layout == "keras":
        tree = [x for pair in zip(ws, bs) for x in pair]
    else:
        tree = {f"w{i}": w for i, w in enumerate(ws)} | {f"b{i}": b for i, b in enumerate(bs)}
    extra = draw(st.sampled_from([None, None, "embed", "vector", "nan"]))
    if extra == "embed" and isinstance(tree, dict):
        tree["embed"] = np.ones((sizes[-1], sizes[0]), dt)  # chains with the last layer
    elif extra == "vector" and isinstance(tree, dict):
        tree["scale"] = np.ones(sizes[0], dt)
    elif extra == "nan" and dt.kind == "f":
        ws[0].reshape(-1)[0] = np.nan
    return tree, extra, dt


def forward64(params, x):
    """The MLP forward pass in float64 with relu, independent of prunejax.models."""
    leaves = leaves_of(params)
    layers = pj.dense_layers(params)
    h = x
    for i, layer in enumerate(layers):
        h = h @ np.asarray(leaves[layer.kernel]).astype(np.float64)
        if layer.bias is not None:
            h = h + np.asarray(leaves[layer.bias]).astype(np.float64)
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


@SETTINGS
@given(case=mlps(), data=st.data(), with_masks=st.booleans())
def test_compact(case, data, with_masks):
    tree, extra, dt = case
    added = extra in ("embed", "vector") and isinstance(tree, dict)
    valid = dt.kind in "fiu" and not added and not (extra == "nan" and dt.kind == "f")
    masks, fault = data.draw(masks_for(tree)) if with_masks else (None, "none")
    valid = valid and fault in ("none", "jax")
    res, ok = attempt("compact", lambda: compact(tree, masks=masks), must_pass=valid)
    if not ok:
        return
    if masks is not None:
        tree = pj.apply_masks(tree, masks)
    assert jax.tree_util.tree_structure(res.params) == jax.tree_util.tree_structure(tree)
    for a, b in zip(leaves_of(tree), leaves_of(res.params), strict=True):
        assert np.dtype(b.dtype) == np.dtype(a.dtype) and isinstance(b, np.ndarray)
    first = np.shape(leaves_of(tree)[pj.dense_layers(tree)[0].kernel])[0]
    x = np.random.default_rng(1).normal(size=(3, first))
    tol = {"f": 1e-2 if dt.itemsize == 2 else 1e-4}.get(dt.kind, 0)
    np.testing.assert_allclose(forward64(res.params, x), forward64(tree, x), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- schedules


@SETTINGS
@given(
    initial=numbers(),
    final=numbers(),
    begin=st.sampled_from([0, 1, 5] * 3 + [-1, 2.0, True, "0", None]),
    span=st.sampled_from([1, 3, 10] * 3 + [0, -2]),
    power=st.sampled_from([1, 3.0, 0.5] * 3 + [0, -1, np.nan, "3", True, None]),
    ordered=st.booleans(),
)
def test_polynomial_sparsity(initial, final, begin, span, power, ordered):
    if ordered:  # half the cases: valid end points in order, the rest as drawn
        initial, final = sorted(
            [initial, final], key=lambda v: float(v) if is_number_in(v, 0, 1) else 0.5
        )
        initial = initial if is_number_in(initial, 0, 1) else 0.0
        final = final if is_number_in(final, 0, 1) else 1.0
    end = begin + span if type(begin) is int else 10
    valid = (
        is_number_in(initial, 0, 1)
        and is_number_in(final, 0, 1)
        and float(final) >= float(initial)
        and type(begin) is int
        and begin >= 0
        and end > begin
        and isinstance(power, int | float)
        and not isinstance(power, bool)
        and power > 0
    )
    sched, ok = attempt(
        "polynomial_sparsity",
        lambda: polynomial_sparsity(initial, final, begin, end, power=power),
        must_pass=valid,
    )
    if not ok:
        return
    lo, hi = np.float32(float(initial)), np.float32(float(final))
    assert float(sched(begin)) == lo and float(sched(end)) == hi
    vals = [float(sched(t)) for t in range(max(begin - 1, 0), end + 2)]
    assert all(a <= b for a, b in zip(vals, vals[1:], strict=False))
    assert all(lo <= v <= hi for v in vals)


# ----------------------------------------------------------------------------- counts


def test_every_group_saw_accepted_and_refused_inputs():
    groups = sorted({g for g, _ in COUNTS})
    if not groups:
        pytest.skip("run with the fuzz tests above (this checks their tallies)")
    lines = [
        f"{g}: {COUNTS[g, 'accepted']} accepted, {COUNTS[g, 'refused']} refused" for g in groups
    ]
    print("\n".join(["fuzz cases per group:", *lines]))
    for g in groups:
        assert COUNTS[g, "accepted"] > 0 and COUNTS[g, "refused"] > 0, lines
