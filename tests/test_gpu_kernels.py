"""The GPU kernels of prunejax.sparse.gpu, checked on CPU.

The Pallas block kernel runs in Pallas's interpreter (``interpret=True``: the same kernel
body, grid and indexing as on the GPU), its pure-JAX fallback runs by default off the GPU, and
its Triton lowering for CUDA is produced (not run) to catch lowering errors without a GPU.
Tolerances: fp32 results are compared with a float64 reference of the same inputs; the kernel
sums at most a few hundred fp32 products in another order, so 1e-5 of the largest output is
~100x the worst rounding seen.  bf16 inputs are rounded to bf16 before the reference is taken,
the kernel accumulates in fp32 and rounds the output to bf16 once: half a bf16 ulp (2^-9
relative) plus fp32 accumulation, under 2^-7 = 7.8e-3 of the largest output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prunejax as pj
from prunejax.masks import block_masks, magnitude_masks, nm_masks
from prunejax.models import mlp_apply
from prunejax.sparse import gpu
from prunejax.sparse.convert import densify, format_of

FP32_TOL = 1e-5
BF16_TOL = 2.0**-7


def rel_err(y, ref) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    assert y.shape == ref.shape
    scale = np.abs(ref).max()
    return float(np.abs(y - ref).max() / (scale if scale else 1.0))


def block_sparse(rng, shape, block, sparsity=0.5) -> np.ndarray:
    w = rng.standard_normal(shape).astype(np.float32)
    m = block_masks({"k": w}, sparsity, block=block)["k"]
    return np.where(m, w, 0).astype(np.float32)


def matmul(x, k):
    return x @ k


jit_matmul = jax.jit(matmul)


@pytest.mark.parametrize(("side", "batch"), [(16, 1), (16, 37), (32, 3), (64, 1), (64, 37)])
def test_interpret_matches_dense_fp32(side, batch):
    rng = np.random.default_rng(side + batch)
    w = block_sparse(rng, (4 * side, 3 * side), (side, side))
    x = rng.standard_normal((batch, w.shape[0])).astype(np.float32)
    k = gpu.PallasBlockKernel.fromdense(w, (side, side), interpret=True)
    ref = x.astype(np.float64) @ w
    assert rel_err(jit_matmul(x, k), ref) <= FP32_TOL
    assert rel_err(k.todense(), w) == 0.0


@pytest.mark.parametrize("split", [1, 2, 5])
def test_split_sums_partial_products(split):
    rng = np.random.default_rng(split)
    w = block_sparse(rng, (128, 32), (16, 16), sparsity=0.25)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    k = gpu.PallasBlockKernel.fromdense(w, (16, 16), split=split, interpret=True)
    assert k.max_count >= 5  # so that every split divides real work
    assert rel_err(jit_matmul(x, k), x.astype(np.float64) @ w) <= FP32_TOL


@pytest.mark.parametrize("batch", [1, 37])
def test_interpret_matches_dense_bf16(batch):
    rng = np.random.default_rng(batch)
    w = jnp.asarray(block_sparse(rng, (64, 32), (16, 16)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((batch, 64)), jnp.bfloat16)
    k = gpu.PallasBlockKernel.fromdense(np.asarray(w), (16, 16), interpret=True)
    assert k.dtype == jnp.bfloat16
    y = jit_matmul(x, k)
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    err = rel_err(y, ref)
    assert err <= BF16_TOL
    assert err > 0  # the output really is rounded to bf16 (the check can fail)


def awkward_blocks(rng) -> np.ndarray:
    """96x80 in 16x16 blocks: a full block column, an empty one, an empty block row."""
    w = rng.standard_normal((96, 80)).astype(np.float32)
    keep = rng.random((6, 5)) < 0.4
    keep[:, 0] = True  # every block of block column 0
    keep[:, 3] = False  # block column 3 empty: its outputs are exactly zero
    keep[2, :] = False  # block row 2 empty: inputs 32..47 unused
    mask = np.kron(keep, np.ones((16, 16), bool))
    w = np.where(mask, w, 0).astype(np.float32)
    w[0, 0] = 0  # a zero inside a kept block stays stored
    return w


@pytest.mark.parametrize("interpret", [True, False])
def test_awkward_grids_and_layouts(interpret):
    rng = np.random.default_rng(7)
    w = awkward_blocks(rng)
    k = gpu.PallasBlockKernel.fromdense(w, (16, 16), interpret=interpret)
    for lead in [(1,), (3,), (37,), (), (2, 5)]:
        x = rng.standard_normal((*lead, 96)).astype(np.float32)
        y = jit_matmul(x, k)
        assert y.shape == (*lead, 80)
        assert rel_err(y, x.astype(np.float64) @ w) <= FP32_TOL
        assert np.all(np.asarray(y)[..., 48:64] == 0)


@pytest.mark.parametrize("interpret", [True, False])
def test_all_zero_and_fully_dense(interpret):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    zero = gpu.PallasBlockKernel.fromdense(np.zeros((32, 16), np.float32), interpret=interpret)
    assert zero.nnz == 0 and zero.max_count == 0
    assert np.all(np.asarray(jit_matmul(x, zero)) == 0)
    assert np.all(np.asarray(zero.todense()) == 0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    full = gpu.PallasBlockKernel.fromdense(w, interpret=interpret)
    assert full.nnz == w.size
    assert rel_err(jit_matmul(x, full), x.astype(np.float64) @ w) <= FP32_TOL


def test_default_path_is_pallas_on_gpu_else_the_pure_fallback():
    rng = np.random.default_rng(11)
    w = block_sparse(rng, (64, 64), (32, 32))
    k = gpu.PallasBlockKernel.fromdense(w, (32, 32))
    x = rng.standard_normal((4, 64)).astype(np.float32)
    text = jax.jit(matmul).lower(x, k).as_text()
    on_gpu = jax.default_backend() == "gpu"
    assert ("prunejax_block_matmul" in text) == on_gpu  # the kernel only where it lowers
    assert rel_err(jit_matmul(x, k), x.astype(np.float64) @ w) <= FP32_TOL


@pytest.mark.parametrize(
    ("side", "dtype", "split"),
    [(16, jnp.float32, 1), (32, jnp.bfloat16, 1), (64, jnp.float32, 3), (16, jnp.bfloat16, 4)],
)
def test_lowers_to_triton_for_cuda(side, dtype, split):
    rng = np.random.default_rng(side)
    w = jnp.asarray(block_sparse(rng, (4 * side, 2 * side), (side, side)), dtype)
    k = gpu.PallasBlockKernel.fromdense(np.asarray(w), (side, side), split=split)
    x = jnp.ones((37, 4 * side), dtype)
    lowered = jax.jit(matmul).trace(x, k).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "triton" in text.lower()  # the Triton lowering, not Mosaic GPU
    assert "prunejax_block_matmul" in text


def test_launch_settings_reach_triton():
    w = block_sparse(np.random.default_rng(0), (64, 32), (16, 16))
    k = gpu.PallasBlockKernel.fromdense(w, (16, 16), num_warps=1, num_stages=2)
    text = jax.jit(matmul).trace(jnp.ones((1, 64)), k).lower(lowering_platforms=("cuda",)).as_text()
    assert "num_warps = 1" in text and "num_stages = 2" in text


def test_inside_a_model_and_through_pytree_utilities():
    rng = np.random.default_rng(5)
    dims = (64, 48, 32, 16)
    params = {
        f"Dense_{i}": {
            "kernel": block_sparse(rng, (a, b), (16, 16)),
            "bias": rng.standard_normal(b).astype(np.float32),
        }
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))
    }
    sparse = jax.tree_util.tree_map(lambda a: a, params)
    for layer in sparse.values():
        layer["kernel"] = gpu.PallasBlockKernel.fromdense(layer["kernel"], interpret=True)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    fwd = jax.jit(lambda p, x: mlp_apply(p, x, activation=jax.nn.relu))
    ref = mlp_apply(jax.tree_util.tree_map(jnp.asarray, params), x, activation=jax.nn.relu)
    assert rel_err(fwd(sparse, x), np.asarray(ref)) <= FP32_TOL
    assert format_of(sparse["Dense_0"]["kernel"]) == "pallas_block"
    back = densify(sparse)
    np.testing.assert_array_equal(back["Dense_1"]["kernel"], params["Dense_1"]["kernel"])
    leaves, treedef = jax.tree_util.tree_flatten(sparse["Dense_0"]["kernel"])
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (
        again.shape == (64, 48) and again.interpret and again.nnz == sparse["Dense_0"]["kernel"].nnz
    )


def test_sizes_and_repr():
    w = np.zeros((64, 32), np.float32)
    w[16:32, 0:16] = 1.0  # one block
    k = gpu.PallasBlockKernel.fromdense(w, (16, 16))
    assert (k.nnz, k.nse, k.max_count, k.block) == (256, 256, 1, (16, 16))
    assert k.nbytes == 256 * 4 + 1 * 4 + 3 * 4  # blocks, block rows, column pointers
    assert "pallas_block" in repr(k) and "(64, 32)" in repr(k)


def test_bad_input_is_named():
    w = np.ones((48, 32), np.float32)
    with pytest.raises(ValueError, match="'layer1'.*BLOCK_SIZES|layer1.*sides"):
        gpu.PallasBlockKernel.fromdense(w, (24, 24), "layer1")
    with pytest.raises(ValueError, match="'layer1'.*not divisible into \\(32, 32\\)"):
        gpu.PallasBlockKernel.fromdense(w, (32, 32), "layer1")
    with pytest.raises(ValueError, match="needs 2-D"):
        gpu.PallasBlockKernel.fromdense(np.ones((16, 16, 1), np.float32), (16, 16))
    with pytest.raises(TypeError, match="needs floats"):
        gpu.PallasBlockKernel.fromdense(np.ones((16, 16), np.int32), (16, 16))
    k = gpu.PallasBlockKernel.fromdense(w, (16, 16))
    with pytest.raises(ValueError, match="48 input features"):
        _ = np.ones((2, 47), np.float32) @ k


def test_batch_tile_and_split():
    assert [gpu.batch_tile(b) for b in (1, 16, 17, 33, 100, 4096)] == [16, 16, 32, 64, 128, 128]
    # batch 1, 256 block columns, 26 blocks each: 2 programs per column reach 4 x 132 SMs
    assert gpu.default_split(1, 256, 26) == 3
    assert gpu.default_split(4096, 256, 26) == 1  # 32 batch tiles: enough programs
    assert gpu.default_split(1, 4, 3) == 1  # fewer than 4 blocks per share: no split


# ----------------------------------------------------------------------------- candidates


def test_candidates_block_structured_on_h200():
    rng = np.random.default_rng(1)
    w64 = block_sparse(rng, (256, 128), (64, 64), sparsity=0.75)
    assert gpu.gpu_candidates(w64, 1, "NVIDIA H200", cusparse=False) == {
        "dense": {},
        "pallas_block": {"block": (64, 64)},
    }
    w16 = block_sparse(rng, (256, 128), (16, 16), sparsity=0.9)
    cands = gpu.gpu_candidates(w16, 256, "NVIDIA H200", cusparse=True)
    assert cands == {
        "dense": {},
        "bcoo": {},
        "bcsr_t": {},
        "pallas_block": {"block": (16, 16)},
    }


def test_candidates_unstructured_and_nm():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    un = np.where(magnitude_masks({"k": w}, 0.9)["k"], w, 0)
    assert gpu.gpu_candidates(un, 1, "NVIDIA H200", cusparse=False) == {"dense": {}}
    assert set(gpu.gpu_candidates(un, 1, "NVIDIA H200", cusparse=True)) == {
        "dense",
        "bcoo",
        "bcsr_t",
    }
    nm = np.where(nm_masks({"k": w}, 2, 4)["k"], w, 0)  # 50% dense: cuSPARSE not proposed
    assert gpu.gpu_candidates(nm, 32, "NVIDIA H200", cusparse=True) == {"dense": {}}


def test_candidates_off_nvidia_and_bad_input():
    w = np.eye(32, dtype=np.float32)
    assert gpu.gpu_candidates(w, 1, "cpu") == {}
    assert gpu.gpu_candidates(w, 1, "TPU v5 lite") == {}
    assert gpu.is_nvidia("NVIDIA H200") and gpu.is_nvidia("Tesla V100-SXM2-16GB")
    with pytest.raises(ValueError, match="batch_size"):
        gpu.gpu_candidates(w, 0, "NVIDIA H200")
    with pytest.raises(ValueError, match="batch_size"):
        gpu.gpu_candidates(w, True, "NVIDIA H200")
    with pytest.raises(ValueError, match="2-D"):
        gpu.gpu_candidates(np.ones((2, 2, 2), np.float32), 1, "NVIDIA H200")
    k = gpu.PallasBlockKernel.fromdense(block_sparse(np.random.default_rng(0), (64, 64), (16, 16)))
    assert "pallas_block" in gpu.gpu_candidates(k, 1, "NVIDIA H200", cusparse=False)


def test_every_gpu_format_computes_x_at_w():
    rng = np.random.default_rng(4)
    w = block_sparse(rng, (64, 48), (16, 16), sparsity=0.75)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    for fmt in gpu.GPU_FORMATS:
        obj = gpu.gpu_format(w, fmt, **({"block": (16, 16)} if fmt == "pallas_block" else {}))
        assert rel_err(jit_matmul(x, obj), x.astype(np.float64) @ w) <= FP32_TOL, fmt
    with pytest.raises(ValueError, match="unknown GPU format 'csc'"):
        gpu.gpu_format(w, "csc")


def fake_timer(table):
    """A timer reading the seconds of the candidate's format from ``table``."""

    def timer(fn, args):
        return table[format_of(args[1])]

    return timer


def test_choose_keeps_dense_unless_measured_faster():
    w = block_sparse(np.random.default_rng(6), (64, 32), (16, 16), sparsity=0.75)
    cands = {"dense": {}, "bcoo": {}, "pallas_block": {"block": (16, 16)}}
    fmt, opts, times = gpu.choose_gpu_format(
        w, 1, cands, timer=fake_timer({"dense": 1.0, "bcoo": 0.9, "pallas_block": 0.5})
    )
    assert (fmt, opts) == ("pallas_block", {"block": (16, 16)})
    assert times == {"dense": 1.0, "bcoo": 0.9, "pallas_block": 0.5}
    fmt, _, _ = gpu.choose_gpu_format(
        w, 1, cands, timer=fake_timer({"dense": 1.0, "bcoo": 0.97, "pallas_block": 0.99})
    )
    assert fmt == "dense"  # within the margin: not worth the risk


def test_choose_skips_a_failing_candidate():
    w = np.ones((48, 32), np.float32)  # 48 is not divisible into 32x32 blocks
    fmt, _, times = gpu.choose_gpu_format(
        w,
        2,
        {"pallas_block": {"block": (32, 32)}},
        timer=fake_timer({"dense": 1.0, "pallas_block": 0.1}),
    )
    assert fmt == "dense" and times["pallas_block"] == float("inf")


def test_sparsify_auto_on_a_gpu_backend_times_the_gpu_candidates(monkeypatch):
    """On a GPU backend ``sparsify(..., "auto")`` takes the GPU branch: candidates proposed for
    the device kind, a measured choice, and the chosen form built (here forced by the timer)."""
    from prunejax.sparse import convert, gpu

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w[:, 16:] = 0.0  # half the 16x16 blocks empty
    w[16:48, :16] = 0.0
    params = {"Dense_0": {"kernel": w, "bias": np.zeros(32, np.float32)}}
    seen = {}

    def fake_choose(w_, b, candidates, **kw):
        seen["candidates"] = dict(candidates)
        seen["batch"] = b
        return "pallas_block", candidates["pallas_block"], {}

    monkeypatch.setattr(convert.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(gpu, "choose_gpu_format", fake_choose)

    class _Dev:
        device_kind = "NVIDIA H200"

    monkeypatch.setattr(convert.jax, "devices", lambda *a: [_Dev()])
    out = pj.sparsify(params, "auto", batch_size=4)
    kernel = out["Dense_0"]["kernel"]
    assert seen["batch"] == 4
    assert "dense" in seen["candidates"] and "pallas_block" in seen["candidates"]
    assert pj.format_of(kernel) == "pallas_block"
    x = rng.standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(x @ kernel), x @ w, rtol=1e-5, atol=1e-5)
