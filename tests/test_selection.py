"""Selection without a sort (prunejax.selection) against a sort-based oracle."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunejax import magnitude_masks
from prunejax.selection import keep_lowest, keep_lowest_k, num_pruned, order_key, split_count

# ----------------------------------------------------------------------------- the oracle


def oracle_keep(flat, k):
    """Stable sort, ranks, ``rank >= k``: the sort-based ranking the library used to do."""
    order = np.argsort(flat, kind="stable")
    ranks = np.empty(flat.shape[0], np.int64)
    ranks[order] = np.arange(flat.shape[0])
    return ranks >= k


def exact_magnitude(x):
    """|x| as Python ints or float64 (exact for every dtype used here), flattened."""
    a = np.asarray(x)
    if a.dtype.kind in "iub":
        return np.array([abs(int(v)) for v in a.reshape(-1)], dtype=object)
    return np.abs(a.astype(np.float64)).reshape(-1)


def oracle_masks(leaves, s):
    """Global-scope masks from a stable sort of the exact magnitudes of all leaves."""
    mags = np.concatenate([exact_magnitude(x) for x in leaves])
    if mags.dtype == object:
        order = sorted(range(len(mags)), key=lambda i: (mags[i], i))
        ranks = np.empty(len(mags), np.int64)
        ranks[order] = np.arange(len(mags))
    else:
        order = np.argsort(mags, kind="stable")
        ranks = np.empty(len(mags), np.int64)
        ranks[order] = np.arange(len(mags))
    keep = ranks >= int(np.round(np.float64(s) * len(mags)))
    out, off = [], 0
    for x in leaves:
        out.append(keep[off : off + np.size(x)].reshape(np.shape(x)))
        off += np.size(x)
    return out


def arrays(rng, kind, n):
    if kind == "random":
        return rng.normal(size=n).astype(np.float32)
    if kind == "tied":
        return rng.integers(-3, 4, n).astype(np.float32) / 2
    if kind == "all-equal":
        return np.full(n, -1.5, np.float32)
    if kind == "zeros":  # +0.0 and -0.0 tie
        return np.zeros(n, np.float32) * rng.choice([-1.0, 1.0], n).astype(np.float32)
    if kind == "int":
        return rng.integers(-4, 5, n).astype(np.int32)
    raise AssertionError(kind)


KINDS = ["random", "tied", "all-equal", "zeros", "int"]

# ----------------------------------------------------------------------------- keep_lowest


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 257])
def test_keep_lowest_k_matches_the_sort(kind, n):
    rng = np.random.default_rng(n)
    x = arrays(rng, kind, n)
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        want = oracle_keep(x, k)
        np.testing.assert_array_equal(np.asarray(keep_lowest_k(jnp.asarray(x), k, True)), want)
        np.testing.assert_array_equal(keep_lowest_k(x, k, False), want)


def test_signed_scores_and_infinities_order_like_the_sort():
    x = np.array([3.0, -np.inf, -0.0, 0.0, -2.5, np.inf, 1e-30, -1e-30, 2.5, -2.5], np.float32)
    for k in range(len(x) + 1):
        want = oracle_keep(x, k)
        np.testing.assert_array_equal(np.asarray(keep_lowest_k(jnp.asarray(x), k, True)), want)
        np.testing.assert_array_equal(keep_lowest_k(x, k, False), want)


def test_subnormals_rank_as_the_jax_sort_ranked_them():
    # XLA on CPU compares with subnormals flushed to zero, so its sort ties them with 0.0;
    # the JAX path keeps that ranking, the NumPy path NumPy's.
    x = np.array([1e-38, -0.0, -1e-38, 0.0, 2e-39, 1.0], np.float32)
    order = np.asarray(jnp.argsort(jnp.asarray(x), stable=True))
    ranks = np.empty(len(x), np.int64)
    ranks[order] = np.arange(len(x))
    for k in range(len(x) + 1):
        got = np.asarray(keep_lowest_k(jnp.asarray(x), k, True))
        np.testing.assert_array_equal(got, ranks >= k)
        np.testing.assert_array_equal(keep_lowest_k(x, k, False), oracle_keep(x, k))


def test_order_key_is_monotone_for_every_dtype():
    for dt in (np.float16, np.float32, np.float64, np.int8, np.int32, np.uint16, np.uint32):
        info = np.finfo(dt) if np.dtype(dt).kind == "f" else np.iinfo(dt)
        raw = [info.min, -1, 0, 1, 2, info.max] if info.min < 0 else [0, 1, 2, info.max]
        vals = np.array(raw, dtype=dt)
        keys = order_key(vals)
        assert keys.dtype.kind == "u" and keys.dtype.itemsize == np.dtype(dt).itemsize
        assert np.all(np.diff(keys.astype(np.float64)) > 0), dt


@pytest.mark.parametrize("shapes", [[(5,), (3, 4), (2, 2, 2)], [(1,), (1,)], [(6, 6)]])
def test_keep_lowest_is_global_over_arrays_in_order(shapes):
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 3, s).astype(np.float32) for s in shapes]
    flat = np.concatenate([p.reshape(-1) for p in parts])
    for k in range(flat.size + 1):
        want = oracle_keep(flat, k)
        for use_jax in (True, False):
            xs = [jnp.asarray(p) for p in parts] if use_jax else parts
            got = keep_lowest(xs, k, use_jax=use_jax)
            assert [np.shape(g) for g in got] == [p.shape for p in parts]
            np.testing.assert_array_equal(
                np.concatenate([np.asarray(g).reshape(-1) for g in got]), want
            )


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(-3, 3), min_size=1, max_size=40),
    st.integers(1, 3),
    st.data(),
)
def test_keep_lowest_property(values, pieces, data):
    x = np.asarray(values, np.float32)
    k = data.draw(st.integers(-2, x.size + 2))
    cuts = sorted(
        data.draw(st.lists(st.integers(0, x.size), min_size=pieces - 1, max_size=pieces - 1))
    )
    parts = [p for p in np.split(x, cuts)]
    parts = [p for p in parts if p.size] or [x]
    want = oracle_keep(x, min(max(k, 0), x.size))
    got = keep_lowest([jnp.asarray(p) for p in parts], k)
    np.testing.assert_array_equal(np.concatenate([np.asarray(g) for g in got]), want)
    got_np = keep_lowest(parts, max(k, 0), use_jax=False)
    np.testing.assert_array_equal(np.concatenate(got_np), want)


def test_keep_lowest_traced_k_under_jit():
    x = jnp.asarray(np.random.default_rng(2).integers(0, 4, 50).astype(np.float32))
    f = jax.jit(lambda v, k: keep_lowest_k(v, k, True))
    for k in (0, 13, 25, 50):
        np.testing.assert_array_equal(np.asarray(f(x, jnp.int32(k))), oracle_keep(np.asarray(x), k))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one array"):
        keep_lowest([], 1)
    with pytest.raises(ValueError, match="key functions"):
        keep_lowest([np.zeros(3)], 1, keys=(), use_jax=False)
    with pytest.raises(ValueError, match="dtypes"):
        keep_lowest([jnp.zeros(3, jnp.float32), jnp.zeros(3, jnp.int8)], 1)


def test_counts_beyond_int32_are_pairs():
    n = 3 * 2**31 + 12345
    for s in (0.0, 0.1, 0.5, 0.999, 1.0):
        hi, lo = jax.jit(lambda v, s=s: num_pruned(v, n))(jnp.float32(s))
        want = int(np.round(np.float32(s) * np.float32(n)))
        assert int(hi) * 2**16 + int(lo) == want and 0 <= int(lo) < 2**16
    assert split_count(n) == (n >> 16, n & 0xFFFF)


# ----------------------------------------------------------------------------- magnitude_masks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.75, 1.0])
def test_magnitude_masks_match_the_oracle(kind, s):
    rng = np.random.default_rng(3)
    leaves = [arrays(rng, kind, 12).reshape(3, 4), arrays(rng, kind, 10).reshape(2, 5)]
    params = {"a": leaves[0], "b": leaves[1]}
    want = oracle_masks(leaves, s)
    for p in (params, jax.tree_util.tree_map(jnp.asarray, params)):
        got = magnitude_masks(p, s, scope="global")
        np.testing.assert_array_equal(np.asarray(got["a"]), want[0])
        np.testing.assert_array_equal(np.asarray(got["b"]), want[1])
        lay = magnitude_masks(p, s)
        np.testing.assert_array_equal(np.asarray(lay["a"]), oracle_masks([leaves[0]], s)[0])


def test_half_types_and_mixed_int_float_global_match_the_oracle():
    rng = np.random.default_rng(4)
    f16 = rng.normal(size=(4, 6)).astype(np.float16)
    bf16 = rng.integers(-3, 4, (3, 5)).astype(ml_dtypes.bfloat16)
    i8 = rng.integers(-128, 128, (5, 4)).astype(np.int8)
    big = np.array([[2**24 + 1, 2**24, -(2**24), 3]], np.int32)
    leaves = [f16, bf16, i8, big]
    for s in (0.2, 0.5, 0.9):
        want = oracle_masks(leaves, s)
        for conv in (lambda a: a, jnp.asarray):
            got = magnitude_masks([conv(x) for x in leaves], s, scope="global")
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(np.asarray(g), w)


def test_traced_sparsity_under_jit_matches_eager():
    rng = np.random.default_rng(5)
    p = {
        "w": jnp.asarray(rng.integers(-2, 3, (8, 8)).astype(np.float32)),
        "v": jnp.asarray(rng.normal(size=(4, 8)).astype(np.float32)),
    }
    for scope in ("layer", "global"):
        f = jax.jit(lambda q, s, scope=scope: magnitude_masks(q, s, scope=scope))
        for s in (0.25, 0.4, 0.9):
            got, want = f(p, s), magnitude_masks(p, s, scope=scope)
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_compiled_temporaries_of_a_4096_kernel_stay_under_a_quarter(scope):
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.float32)  # nothing allocated
    f = jax.jit(lambda p, s: magnitude_masks(p, s, scope=scope))
    mem = f.lower({"k": w, "b": jax.ShapeDtypeStruct((4096,), jnp.float32)}, 0.9)
    mem = mem.compile().memory_analysis()
    param_bytes = 4096 * 4096 * 4
    assert mem.temp_size_in_bytes <= param_bytes // 4, mem.temp_size_in_bytes
    assert mem.output_size_in_bytes <= 4096 * 4096 + 4096 + 64  # the masks, one byte each
