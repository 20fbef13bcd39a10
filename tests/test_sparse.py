"""Correctness of prunejax.sparse: every format computes the masked dense ``x @ W``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse

from prunejax import sparse as sp
from prunejax.masks import apply_masks, block_masks, magnitude_masks, nm_masks
from prunejax.models import mlp_apply
from prunejax.sparse import ffi

FIXED_FORMATS = ["dense", "dense_t", "bcoo", "bcsr", "csr", "bcsr_t", "ell", "block", "nm"]
BATCHES = [(1,), (), (5,), (37,)]  # () is a 1-D x; 37 is no multiple of any tile or block


def rel_err(y, ref) -> float:
    y = np.asarray(y, np.float64)
    ref = np.asarray(ref, np.float64)
    assert y.shape == ref.shape
    if ref.size == 0:
        return 0.0  # the shapes agree and there is nothing else to compare
    scale = np.abs(ref).max()
    if scale == 0:
        return float(np.abs(y).max())
    return float(np.abs(y - ref).max() / scale)


def awkward_kernel(rng, n_in=64, n_out=48, density=0.15) -> np.ndarray:
    """Unstructured mask with empty rows/columns and fully dense rows/columns."""
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    w[rng.random(w.shape) >= density] = 0
    w[3, :] = 0  # empty input row
    w[:, 5] = 0  # output unit with no inputs
    w[7, :] = rng.standard_normal(n_out)  # fully dense row
    w[:, 11] = rng.standard_normal(n_in)  # fully dense column
    return w


def block_kernel(rng, n_in=64, n_out=48, block=(16, 16)) -> np.ndarray:
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    m = block_masks({"k": w}, 0.5, block=block)["k"]
    return np.where(m, w, 0).astype(np.float32)


def nm_kernel(rng, n_in=64, n_out=48, n=2, m=4) -> np.ndarray:
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    mask = nm_masks({"k": w}, n, m)["k"]
    w = np.where(mask, w, 0).astype(np.float32)
    w[:, 2] = 0  # groups with fewer than n nonzeros
    return w


def kernel_for(fmt: str, rng) -> np.ndarray:
    return {"block": block_kernel, "nm": nm_kernel}.get(fmt, awkward_kernel)(rng)


# Formats with a compiled CPU kernel run twice: compiled (where available) and pure JAX.
COMPILED_FORMATS = ["csr", "block", "dense_t"]
CASES = [(f, "pure") for f in FIXED_FORMATS] + [(f, "compiled") for f in COMPILED_FORMATS]


@pytest.fixture(params=["compiled", "pure"])
def kernel_path(request, monkeypatch):
    """Run a test with the compiled CPU kernels (where available) and without them."""
    return use_path(request.param, monkeypatch)


def use_path(path: str, monkeypatch) -> str:
    if path == "pure":
        monkeypatch.setenv("PRUNEJAX_DISABLE_FFI", "1")
    elif not ffi.available():
        pytest.skip(f"compiled kernels unavailable: {ffi.build_error()}")
    return path


@pytest.mark.parametrize(("fmt", "path"), CASES)
def test_matmul_matches_dense(fmt, path, monkeypatch):
    use_path(path, monkeypatch)
    rng = np.random.default_rng(0)
    w = kernel_for(fmt, rng)
    k = sp.sparsify({"k": w}, fmt)["k"]
    assert sp.format_of(k) == fmt
    assert k.shape == w.shape
    matmul = jax.jit(lambda x, k: x @ k)
    for lead in BATCHES:
        x = rng.standard_normal((*lead, w.shape[0])).astype(np.float32)
        ref = x.astype(np.float64) @ w.astype(np.float64)
        assert rel_err(jnp.asarray(x) @ k, ref) < 1e-5, (fmt, lead)
        assert rel_err(matmul(jnp.asarray(x), k), ref) < 1e-5, (fmt, lead)


@pytest.mark.parametrize(
    ("fmt", "path"),
    [("csr", "compiled"), ("block", "compiled"), ("block", "pure"), ("ell", "pure")],
)
def test_unstructured_kernel_any_format(fmt, path, monkeypatch):
    use_path(path, monkeypatch)
    # the block format also stores unstructured kernels exactly (zeros inside kept blocks)
    rng = np.random.default_rng(1)
    w = awkward_kernel(rng, 64, 32)
    k = sp.sparsify([w], fmt)[0]
    x = rng.standard_normal((9, 64)).astype(np.float32)
    assert rel_err(jax.jit(lambda x, k: x @ k)(x, k), x.astype(np.float64) @ w) < 1e-5


@pytest.mark.parametrize(("fmt", "path"), CASES)
def test_fully_pruned_layer(fmt, path, monkeypatch):
    use_path(path, monkeypatch)
    w = np.zeros((32, 16), np.float32)
    k = sp.sparsify({"k": w}, fmt)["k"]
    x = np.random.default_rng(2).standard_normal((3, 32)).astype(np.float32)
    y = jax.jit(lambda x, k: x @ k)(x, k)
    assert y.shape == (3, 16)
    np.testing.assert_array_equal(np.asarray(y), 0.0)
    np.testing.assert_array_equal(np.asarray(sp.densify({"k": k})["k"]), w)


@pytest.mark.parametrize(("fmt", "path"), CASES)
def test_fully_dense_layer(fmt, path, monkeypatch):
    use_path(path, monkeypatch)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    if fmt == "nm":
        w = np.where(nm_masks({"k": w}, 2, 4)["k"], w, 0).astype(np.float32)
    k = sp.sparsify({"k": w}, fmt)["k"]
    x = rng.standard_normal((4, 32)).astype(np.float32)
    assert rel_err(jax.jit(lambda x, k: x @ k)(x, k), x.astype(np.float64) @ w) < 1e-5


@pytest.mark.parametrize("fmt", FIXED_FORMATS)
def test_roundtrip_and_metadata(fmt):
    rng = np.random.default_rng(4)
    w = kernel_for(fmt, rng)
    params = {"Dense_0": {"kernel": w, "bias": np.ones(48, np.float32)}}
    s = sp.sparsify(params, fmt)
    k = s["Dense_0"]["kernel"]
    assert s["Dense_0"]["bias"] is params["Dense_0"]["bias"]  # 1-D leaves untouched
    assert sp.formats_of(s) == {"Dense_0/kernel": fmt}
    assert k.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(sp.densify(s)["Dense_0"]["kernel"]), w)
    if fmt != "dense":
        nnz = k.nse if fmt in ("bcoo", "bcsr") else k.nnz
        assert nnz >= np.count_nonzero(w)
    if fmt in ("csr", "bcsr_t", "ell", "nm"):
        assert k.nnz == np.count_nonzero(w)
    # kernel objects are pytrees: they flatten, unflatten and pass through jit as arguments
    leaves, treedef = jax.tree_util.tree_flatten(s)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    np.testing.assert_array_equal(np.asarray(sp.densify(again)["Dense_0"]["kernel"]), w)


@pytest.mark.parametrize(
    ("fmt", "path"),
    [
        ("csr", "compiled"),
        ("block", "compiled"),
        ("nm", "pure"),
        ("bcsr_t", "pure"),
        ("dense_t", "compiled"),
    ],
)
def test_numpy_lhs_and_transforms(fmt, path, monkeypatch):
    use_path(path, monkeypatch)
    rng = np.random.default_rng(5)
    w = kernel_for(fmt, rng)
    k = sp.sparsify({"k": w}, fmt)["k"]
    x = rng.standard_normal((3, w.shape[0])).astype(np.float32)
    ref = x.astype(np.float64) @ w
    assert rel_err(x @ k, ref) < 1e-5  # NumPy array on the left defers to __rmatmul__
    x3 = x.reshape(3, 1, -1)
    assert rel_err(jnp.asarray(x3) @ k, x3.astype(np.float64) @ w) < 1e-5  # leading dims
    xs = rng.standard_normal((4, 2, w.shape[0])).astype(np.float32)
    y = jax.vmap(lambda xi: xi @ k)(jnp.asarray(xs))
    assert rel_err(y, xs.astype(np.float64) @ w) < 1e-5


def test_bad_x_shape():
    k = sp.sparsify({"k": np.eye(8, dtype=np.float32)}, "csr")["k"]
    with pytest.raises(ValueError, match="8 input features"):
        np.ones((2, 7), np.float32) @ k


# ----------------------------------------------------------------------------- models


def flax_mlp(rng, sizes=(64, 48, 32, 16)) -> dict:
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"Dense_{i}"] = {
            "kernel": rng.standard_normal((a, b)).astype(np.float32) / np.sqrt(a),
            "bias": rng.standard_normal(b).astype(np.float32) * 0.1,
        }
    return params


def prune_for(fmt: str, params):
    if fmt == "block":
        masks = block_masks(params, 0.5, block=(16, 16))
    elif fmt == "nm":
        masks = nm_masks(params, 2, 4)
    else:
        masks = magnitude_masks(params, 0.8)
    return apply_masks(params, masks)


@pytest.mark.parametrize(("fmt", "path"), CASES)
def test_mlp_apply_flax_dict(fmt, path, monkeypatch):
    use_path(path, monkeypatch)
    rng = np.random.default_rng(6)
    params = prune_for(fmt, flax_mlp(rng))
    x = rng.standard_normal((7, 64)).astype(np.float32)
    ref = mlp_apply(params, x)
    s = sp.sparsify(params, fmt)
    assert set(sp.formats_of(s).values()) == {fmt}
    assert rel_err(jax.jit(mlp_apply)(s, x), ref) < 1e-5
    if fmt in ("dense", "csr", "block"):  # eager too (jax.experimental.sparse is slow eagerly)
        assert rel_err(mlp_apply(s, x), ref) < 1e-5


@pytest.mark.parametrize(("fmt", "path"), CASES)
def test_mlp_apply_keras_list(fmt, path, monkeypatch):
    use_path(path, monkeypatch)
    rng = np.random.default_rng(7)
    flat = flax_mlp(rng, (32, 48, 16))
    params = [flat["Dense_0"]["kernel"], flat["Dense_0"]["bias"]]
    params += [flat["Dense_1"]["kernel"], flat["Dense_1"]["bias"]]
    params = prune_for(fmt, params)
    x = rng.standard_normal((1, 32)).astype(np.float32)
    s = sp.sparsify(params, fmt)
    assert list(sp.formats_of(s)) == ["0", "2"]
    assert rel_err(jax.jit(mlp_apply)(s, x), mlp_apply(params, x)) < 1e-5


# ----------------------------------------------------------------------------- auto


@pytest.mark.parametrize("batch", [1, 256])
def test_auto_picks_and_is_correct(batch, kernel_path):
    rng = np.random.default_rng(8)
    params = prune_for("magnitude", flax_mlp(rng, (256, 128, 10)))
    s = sp.sparsify(params, "auto", batch_size=batch)
    chosen = sp.formats_of(s)
    assert set(chosen) == {"Dense_0/kernel", "Dense_1/kernel"}
    assert set(chosen.values()) <= set(sp.FORMATS) - {"auto"}
    x = rng.standard_normal((batch, 256)).astype(np.float32)
    assert rel_err(jax.jit(mlp_apply)(s, x), mlp_apply(params, x)) < 1e-5


@pytest.mark.parametrize(("path", "batch"), [("pure", 1), ("pure", 256), ("compiled", 256)])
def test_auto_prefers_dense_for_dense_kernel(path, batch, monkeypatch):
    use_path(path, monkeypatch)
    w = np.random.default_rng(9).standard_normal((128, 128)).astype(np.float32)
    assert sp.formats_of(sp.sparsify([w], "auto", batch_size=batch)) == {"0": "dense"}


def test_auto_dense_kernel_small_batch_compiled_is_dense_t(monkeypatch):
    use_path("compiled", monkeypatch)
    w = np.random.default_rng(9).standard_normal((128, 128)).astype(np.float32)
    layer = {"kernel": w}  # a layer kernel by name (a bare 2-D leaf stays a plain array)
    assert sp.formats_of(sp.sparsify(layer, "auto", batch_size=1)) == {"kernel": "dense_t"}
    assert sp.formats_of(sp.sparsify(layer, "auto", batch_size=2)) == {"kernel": "dense"}
    assert sp.formats_of(sp.sparsify([w], "auto", batch_size=1)) == {"0": "dense"}


def test_auto_picks_sparse_for_very_sparse_wide_layer():
    if not ffi.available() or jax.default_backend() != "cpu":
        pytest.skip("the cost model's sparse wins are for CPU with the compiled kernels")
    rng = np.random.default_rng(10)
    w = rng.standard_normal((2048, 2048)).astype(np.float32)
    w[rng.random(w.shape) >= 0.05] = 0
    assert sp.format_of(sp.sparsify([w], "auto", batch_size=1)[0]) != "dense"


def test_predict_times_has_dense():
    t = sp.predict_times((4096, 4096), 4096 * 410, 1)
    assert "dense" in t and all(v > 0 for v in t.values())


# ----------------------------------------------------------------------------- errors


def test_unknown_format():
    with pytest.raises(ValueError, match="valid formats: auto, dense, dense_t, bcoo"):
        sp.sparsify({"k": np.eye(4, dtype=np.float32)}, "coo")


def test_auto_needs_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        sp.sparsify({"k": np.eye(4, dtype=np.float32)}, "auto")
    with pytest.raises(ValueError, match="batch_size"):
        sp.sparsify({"k": np.eye(4, dtype=np.float32)}, "auto", batch_size=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_kernel_names_leaf(bad):
    w = np.eye(4, dtype=np.float32)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        sp.sparsify({"Dense_0": {"kernel": np.eye(4, dtype=np.float32)}, "Dense_1": {"kernel": w}})


def test_block_not_divisible_names_leaf_and_shape():
    with pytest.raises(ValueError, match=r"'Dense_0/kernel' of shape \(40, 32\)"):
        sp.sparsify({"Dense_0": {"kernel": np.ones((40, 32), np.float32)}}, "block")
    with pytest.raises(ValueError, match="block must be"):
        sp.sparsify({"k": np.ones((32, 32), np.float32)}, "block", block=(0, 16))


def test_nm_pattern_violation_names_leaf():
    with pytest.raises(ValueError, match="'0' is not 2:4"):
        sp.sparsify([np.ones((8, 4), np.float32)], "nm")
    with pytest.raises(ValueError, match="not divisible by m=4"):
        sp.sparsify([np.zeros((6, 4), np.float32)], "nm")


def test_non_2d_selected_leaf():
    params = {"conv": np.ones((3, 3, 4), np.float32), "b": np.ones(4, np.float32)}
    with pytest.raises(ValueError, match="'conv' has shape \\(3, 3, 4\\)"):
        sp.sparsify(params, "csr")
    with pytest.raises(ValueError, match="'b' has shape"):
        sp.sparsify(params, "csr", where=lambda p, leaf: p == "b")
    # where= can leave the 3-D leaf dense
    out = sp.sparsify(
        {"k": np.eye(4, dtype=np.float32), "conv": params["conv"]},
        "csr",
        where=lambda p, leaf: p == "k",
    )
    assert sp.formats_of(out) == {"k": "csr"}


def test_traced_leaf_rejected():
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(lambda w: sp.sparsify({"k": w}, "csr"))(jnp.eye(4))


def test_resparsify_and_jax_sparse_leaves():
    rng = np.random.default_rng(11)
    w = awkward_kernel(rng, 32, 16)
    s = sp.sparsify({"k": w}, "bcoo")
    assert isinstance(s["k"], jsparse.BCOO)
    again = sp.sparsify(s, "csr")
    assert sp.format_of(again["k"]) == "csr"
    np.testing.assert_array_equal(np.asarray(sp.densify(again)["k"]), w)


def test_no_compiler_falls_back_to_pure_jax(monkeypatch):
    monkeypatch.setattr(ffi, "_state", {"loaded": None, "error": None})
    monkeypatch.setattr(ffi, "find_compiler", lambda: None)
    monkeypatch.delenv("PRUNEJAX_DISABLE_FFI", raising=False)
    assert not ffi.available()
    assert "no C++ compiler" in ffi.build_error()
    rng = np.random.default_rng(12)
    w = block_kernel(rng, 32, 32)
    x = rng.standard_normal((3, 32)).astype(np.float32)
    for fmt in ("csr", "block"):
        k = sp.sparsify([w], fmt)[0]
        assert rel_err(jax.jit(lambda x, k: x @ k)(x, k), x.astype(np.float64) @ w) < 1e-5


@pytest.mark.parametrize("fmt", COMPILED_FORMATS)
def test_compiled_batch_paths(fmt, monkeypatch):
    # every batch regime of the compiled kernels: gather-dot (< 8), 16-row tiles (8..31),
    # 32-row tiles with a partial tile, block re-layout (>= 16); int32 indices past 65536 inputs
    use_path("compiled", monkeypatch)
    rng = np.random.default_rng(13)
    w = kernel_for(fmt, rng)
    k = sp.sparsify([w], fmt)[0]
    f = jax.jit(lambda x, k: x @ k)
    for batch in (7, 8, 16, 20, 33):
        x = rng.standard_normal((batch, w.shape[0])).astype(np.float32)
        assert rel_err(f(x, k), x.astype(np.float64) @ w) < 1e-5, batch


def test_csr_int32_indices_for_wide_inputs():
    rng = np.random.default_rng(14)
    w = np.zeros((70_000, 3), np.float32)
    rows = rng.choice(70_000, 50, replace=False)
    w[rows, rng.integers(0, 3, 50)] = rng.standard_normal(50)
    w[69_999, 1] = 2.0
    k = sp.sparsify([w], "csr")[0]
    assert k.idx.dtype == jnp.int32
    x = rng.standard_normal((2, 70_000)).astype(np.float32)
    assert rel_err(jax.jit(lambda x, k: x @ k)(x, k), x.astype(np.float64) @ w) < 1e-5


def dense_choice(batch: int) -> str:
    """What "auto" runs a layer it keeps dense as: the row-dot layout at batch 1 on CPU."""
    return "dense_t" if batch == 1 and ffi.available() else "dense"


def test_auto_keeps_tiny_and_near_dense_layers_dense(kernel_path):
    rng = np.random.default_rng(3)
    tiny = rng.normal(size=(100, 10)).astype(np.float32)
    tiny[rng.random(tiny.shape) < 0.9] = 0.0  # 90% sparse, but a kernel call costs more
    chosen = sp.formats_of(sp.sparsify({"kernel": tiny}, "auto", batch_size=1))
    assert chosen == {"kernel": dense_choice(1)}
    half = rng.normal(size=(512, 512)).astype(np.float32)
    half[rng.random(half.shape) < 0.4] = 0.0  # stores 60% of the entries: never sparse
    for batch in (1, 2, 8, 32, 256):
        chosen = sp.formats_of(sp.sparsify({"kernel": half}, "auto", batch_size=batch))
        assert chosen == {"kernel": dense_choice(batch)}, batch


def test_auto_small_batch_model_runs_only_compiled_kernels(monkeypatch):
    # at batch 1 every layer of a pruned LeNet-shaped MLP runs a compiled kernel (no XLA dot
    # between them), and the result equals the masked dense model
    use_path("compiled", monkeypatch)
    rng = np.random.default_rng(15)
    params = prune_for("magnitude", flax_mlp(rng, (784, 300, 100, 10)))
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    s = sp.sparsify(params, "auto", batch_size=1)
    chosen = set(sp.formats_of(s).values())
    assert chosen <= {"csr", "block", "dense_t"} and "dense" not in chosen
    x = rng.standard_normal((1, 784)).astype(np.float32)
    assert rel_err(jax.jit(mlp_apply)(s, x), mlp_apply(params, x)) < 1e-5
    hlo = jax.jit(mlp_apply).lower(s, x).as_text()
    assert "dot_general" not in hlo and "prunejax_" in hlo


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 7])
def test_dense_rows_kernel_every_batch(batch, monkeypatch):
    # the row-dot kernel itself handles any batch (rows of 4, 2 and 1) and any width (masked
    # tail); prunejax calls it at batch 1 only, so check the other paths directly
    use_path("compiled", monkeypatch)
    rng = np.random.default_rng(16)
    for n_in, n_out in ((784, 300), (17, 3), (1, 1), (4096, 33), (65, 1), (0, 4), (5, 0)):
        x = rng.standard_normal((batch, n_in)).astype(np.float32)
        wt = rng.standard_normal((n_out, n_in)).astype(np.float32)
        y = jax.jit(ffi.dense_rows_matmul)(jnp.asarray(x), jnp.asarray(wt))
        assert rel_err(y, x.astype(np.float64) @ wt.T.astype(np.float64)) < 1e-5, (n_in, n_out)


def test_dense_t_grad_vmap_and_tracing(monkeypatch):
    # unlike the sparse kernels, dense_t is differentiable (auto returns it for dense layers at
    # batch 1), and vmapped batch-1 products become one XLA dot instead of a loop of calls
    use_path("compiled", monkeypatch)
    rng = np.random.default_rng(17)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    k = sp.sparsify([w], "dense_t")[0]
    x = jnp.asarray(rng.standard_normal((1, 64)).astype(np.float32))
    assert "prunejax_dense_rows" in jax.jit(lambda x, k: x @ k).lower(x, k).as_text()

    def loss(x, k):
        return jnp.sum(jnp.tanh(x @ k))

    gx, gk = jax.grad(loss, argnums=(0, 1))(x, k)
    rx, rw = jax.grad(loss, argnums=(0, 1))(x, jnp.asarray(w))
    assert rel_err(gx, rx) < 1e-5
    assert rel_err(np.asarray(gk.wt).T, rw) < 1e-5
    xs = rng.standard_normal((40, 64)).astype(np.float32)
    f = jax.jit(jax.vmap(lambda xi: xi @ k))
    assert rel_err(f(xs), xs.astype(np.float64) @ w) < 1e-5
    assert "while" not in f.lower(xs).compile().as_text()
    ks = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), k)
    y = jax.vmap(lambda kk: x @ kk)(ks)
    assert rel_err(y[1], 2 * (np.asarray(x, np.float64) @ w)) < 1e-5
    # metadata is static: repr and nnz work on a traced kernel
    seen = []
    jax.jit(lambda kk: seen.append((repr(kk), kk.nnz)) or kk.wt.sum())(k)
    assert seen[0][1] == np.count_nonzero(w) and "dense_t" in seen[0][0]


def test_auto_batch1_keeps_non_kernel_leaves_plain(monkeypatch):
    # only layer kernels (named kernel/weight/w, or followed by a bias) become dense_t at
    # batch 1; an embedding table that stays dense is still a plain array
    use_path("compiled", monkeypatch)
    rng = np.random.default_rng(18)
    params = {
        "Embed_0": {"embedding": rng.standard_normal((100, 16)).astype(np.float32)},
        "Dense_0": {
            "kernel": rng.standard_normal((16, 8)).astype(np.float32),
            "bias": np.zeros(8, np.float32),
        },
    }
    s = sp.sparsify(params, "auto", batch_size=1)
    assert sp.formats_of(s) == {"Dense_0/kernel": "dense_t", "Embed_0/embedding": "dense"}
    assert isinstance(s["Embed_0"]["embedding"], jax.Array)
    keras = [params["Dense_0"]["kernel"], params["Dense_0"]["bias"]]
    assert sp.formats_of(sp.sparsify(keras, "auto", batch_size=1)) == {"0": "dense_t"}


def test_zero_size_inputs():
    k = sp.sparsify([np.zeros((0, 5), np.float32)], "dense_t")[0]
    assert (np.zeros((3, 0), np.float32) @ k).shape == (3, 5)
    k = sp.sparsify([np.ones((4, 5), np.float32)], "csr")[0]
    assert (np.zeros((0, 4), np.float32) @ k).shape == (0, 5)


# ----------------------------------------------------------------------------- documented edges


@pytest.mark.parametrize(("fmt", "path"), CASES)
def test_nan_input_meeting_only_pruned_weights(fmt, path, monkeypatch):
    # as the prunejax.sparse docstring says: dense x @ W turns a NaN input into NaN outputs
    # (0 * nan is nan); the forms that skip pruned entries give finite outputs
    use_path(path, monkeypatch)
    rng = np.random.default_rng(19)
    w = kernel_for(fmt, rng)
    dead = 20 if fmt == "block" else 3  # an input row whose weights are all pruned
    w[dead, :] = 0
    if fmt == "block":
        w[16:32, :] = 0  # ... and for blocks, the whole block row it belongs to
    x = np.ones((2, w.shape[0]), np.float32)
    x[0, dead] = np.nan
    y = np.asarray(jax.jit(lambda x, k: x @ k)(x, sp.sparsify([w], fmt)[0]))
    assert np.isnan(x @ w)[0].all() and np.isfinite(x @ w)[1].all()
    if fmt in ("dense", "dense_t"):
        assert np.isnan(y[0]).all()
    elif fmt not in ("ell", "nm"):  # their padding entries may point at the NaN input
        assert np.isfinite(y).all()
        np.testing.assert_allclose(y[0], np.nan_to_num(x[0]) @ w, rtol=1e-5, atol=1e-5)
    assert np.isfinite(y[1]).all()


def test_default_selection_names_a_4d_leaf_and_where_excludes_it():
    conv = np.ones((3, 3, 2, 4), np.float32)
    params = {"conv": conv, "dense": {"kernel": np.eye(4, dtype=np.float32)}}
    with pytest.raises(ValueError, match="'conv' has shape \\(3, 3, 2, 4\\).*where="):
        sp.sparsify(params, "csr")
    out = sp.sparsify(params, "csr", where=lambda p, leaf: np.ndim(leaf) == 2)
    assert out["conv"] is conv and sp.formats_of(out) == {"dense/kernel": "csr"}
