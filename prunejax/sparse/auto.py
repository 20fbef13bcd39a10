"""The cost model behind ``format="auto"`` (calibrated on CPU) and the choice it makes.

``predict_times`` gives the model's cost of each candidate form of one kernel at a batch size;
``auto_format`` picks the form for one kernel: a sparse form only where it is predicted at most
``0.7`` of dense and stores at most half the dense entries, else dense (``"dense_t"`` for layer
kernels at batch 1 with the compiled CPU kernels).  Elsewhere than fp32 on CPU it keeps dense.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from prunejax._util import KERNEL_NAMES, PyTree, dense_layers, last_key
from prunejax.sparse import ffi
from prunejax.sparse.kernels import DENSE_T_MAX_BATCH

__all__ = ["auto_format", "dense_fallback", "layer_kernels", "predict_times"]

# Cost model in microseconds of one CPU core, calibrated (process CPU time, one XLA thread,
# median of 7) on a 2-core AMD EPYC Zen 4 (AVX-512) with jax 0.10.2, fp32, 4096x4096 at 10%
# density and LeNet-300-100 layers.  All large kernels scale alike with cores, so the ratios that
# decide are those of one core; the fixed costs (wall-clock minimum of a call on 100x10 to
# 784x300 layers) are what small layers pay.
_CPU = {
    "dense_call_us": 12.0,  # fixed cost of XLA's dot (wall-clock minimum, tiny layers)
    "kernel_call_us": 7.0,  # fixed cost of one compiled-kernel custom call
    "dense_weight_ns": 0.18,  # per weight streamed from DRAM (kernel > 8 MB), batch 1
    "dense_weight_cached_ns": 0.08,  # per weight when the kernel stays in cache (<= 8 MB)
    "dense_mac_ns": 0.0204,  # per multiply-add at large batch (~98 GFLOP/s per core)
    "csr_gather_ns": 0.45,  # per nonzero and batch row, gather-dot kernel (batch < 8)
    "csr_tile16_ns": 1.2,  # per nonzero and 16-row tile of x (8 <= batch < 32)
    "csr_tile32_ns": 2.0,  # per nonzero and 32-row tile of x (batch >= 32)
    "csr_transpose_ns": 0.3,  # per element of x, building the transposed tiles
    "block_b1_ns": 0.07,  # per stored block entry at batch 1 (streams the blocks)
    "block_mac_ns": 0.035,  # per stored block entry and batch row (~57 GFLOP/s per core)
    "bcsr_t_call_us": 40.0,  # jax.experimental.sparse BCSR (Eigen) fixed cost
    "bcsr_t_ns": 0.15,  # per nonzero and batch row
    "gather_call_us": 20.0,  # pure-JAX gather forms (ell, block without the compiled kernel)
    "ell_ns": 1.2,  # per stored ELL entry and batch row
    "block_pure_ns": 0.3,  # per stored block entry and batch row
}
_CACHED_BYTES = 8 << 20
# A sparse form is chosen only when predicted at most this fraction of dense, so that the
# model's error does not make "auto" slower than dense.
_AUTO_MARGIN = 0.7
# ... and only when it stores at most this fraction of the dense kernel's entries.
_AUTO_MAX_STORED = 0.5


def predict_times(
    shape: tuple[int, int],
    nnz: int,
    batch_size: int,
    *,
    block_nse: int | None = None,
    ell_nse: int | None = None,
    compiled: bool | None = None,
) -> dict[str, float]:
    """Predicted cost (microseconds of one CPU core) of ``x @ W`` per format: ``"auto"``'s model.

    What bounds each form: dense streams ``4 * in * out`` bytes (batch 1) or runs at the matmul
    FLOP rate (large batch), costs add; ``csr`` is one gather per nonzero and batch row below
    batch 8 (the ~6 bytes per nonzero are read faster than gathers issue), then one 16/32-wide
    FMA per nonzero and tile of x (load/FMA bound, plus transposing x into tiles); ``block``
    streams its blocks at batch 1 and runs dense 16-wide FMAs on stored block entries at larger
    batch; the pure-JAX forms pay XLA's gather/scatter per entry and batch row.

    Args:
      shape: ``(in, out)`` of the kernel.
      nnz: its nonzeros.
      batch_size: rows of ``x``.
      block_nse: stored entries of its block form (``None``: no block candidate).
      ell_nse: stored entries of its ELL form (default ``nnz``).
      compiled: whether the compiled kernels are available (default:
        ``prunejax.sparse.ffi.available()``).

    Returns:
      ``{format: microseconds}`` for ``"dense"`` and each candidate sparse format.
    """
    c = _CPU
    n_in, n_out = shape
    b = int(batch_size)
    size = n_in * n_out
    if compiled is None:
        compiled = ffi.available()
    per_weight = c["dense_weight_ns"] if 4 * size > _CACHED_BYTES else c["dense_weight_cached_ns"]
    ns = 1e-3
    t = {"dense": c["dense_call_us"] + size * per_weight * ns + b * size * c["dense_mac_ns"] * ns}
    if compiled:
        if b < ffi.CSR_TILED_FROM:
            csr = b * nnz * c["csr_gather_ns"]
        else:
            tile, per = (32, c["csr_tile32_ns"]) if b >= 32 else (16, c["csr_tile16_ns"])
            csr = math.ceil(b / tile) * nnz * per + b * n_in * c["csr_transpose_ns"]
        t["csr"] = c["kernel_call_us"] + csr * ns
        if block_nse is not None:
            per = c["block_b1_ns"] if b == 1 else b * c["block_mac_ns"]
            t["block"] = c["kernel_call_us"] + block_nse * per * ns
    else:
        t["bcsr_t"] = c["bcsr_t_call_us"] + b * nnz * c["bcsr_t_ns"] * ns
        if b <= 8:
            ell = nnz if ell_nse is None else ell_nse
            t["ell"] = c["gather_call_us"] + b * ell * c["ell_ns"] * ns
        if block_nse is not None:
            t["block"] = c["gather_call_us"] + b * block_nse * c["block_pure_ns"] * ns
    return t


def layer_kernels(params: PyTree, paths: list[str]) -> set[str]:
    """Paths of the 2-D leaves that are dense-layer kernels: named ``kernel``/``weight``/``w``,
    or followed by their bias (Keras lists).  Other 2-D leaves (embedding tables, ...) that
    "auto" keeps dense stay plain arrays.

    Args:
      params: the pytree being sparsified.
      paths: its leaf paths (``prunejax._util.flatten`` order).

    Returns:
      The set of layer-kernel paths.
    """
    return {
        paths[d.kernel]
        for d in dense_layers(params)
        if d.bias is not None or last_key(paths[d.kernel]) in KERNEL_NAMES
    }


def auto_format(
    w: np.ndarray, batch_size: int, block: tuple[int, int], *, layer_kernel: bool
) -> str:
    """The format ``sparsify(..., "auto")`` gives one kernel.

    Args:
      w: the concrete ``(in, out)`` kernel.
      batch_size: the inference batch size.
      block: the block shape of the ``"block"`` candidate.
      layer_kernel: whether ``w`` is a dense-layer kernel (see :func:`layer_kernels`); a layer
        kernel that stays dense becomes ``dense_fallback(batch_size)``, any other 2-D leaf
        ``"dense"``.

    Returns:
      One of ``"dense"``, ``"dense_t"``, ``"csr"``, ``"bcsr_t"``, ``"ell"``, ``"block"``.
    """
    dense = dense_fallback(batch_size) if layer_kernel else "dense"
    return _auto_choice(w, batch_size, block, dense)


def _block_nse(w: np.ndarray, block: tuple[int, int]) -> int | None:
    bh, bw = block
    r, c = w.shape
    if r % bh or c % bw:
        return None
    keep = (w.reshape(r // bh, bh, c // bw, bw) != 0).any(axis=(1, 3))
    return int(keep.sum()) * bh * bw


def _auto_choice(
    w: np.ndarray, batch_size: int, block: tuple[int, int], dense: str = "dense"
) -> str:
    """The format "auto" gives one kernel; ``dense`` is what it returns when dense wins."""
    if w.dtype != np.float32 or jax.default_backend() != "cpu":
        # the model is calibrated for fp32 on CPU; elsewhere dense is the safe choice
        return "dense"
    nz = w != 0
    ell_nse = int(nz.sum(axis=0).max(initial=0)) * w.shape[1]
    t = predict_times(
        w.shape, int(nz.sum()), batch_size, block_nse=_block_nse(w, block), ell_nse=ell_nse
    )
    size = w.size
    stored = {"csr": int(nz.sum()), "bcsr_t": int(nz.sum()), "ell": ell_nse}
    stored["block"] = _block_nse(w, block) or size
    # Inside one jitted model a dense dot fuses with its neighbours, so its stand-alone call
    # overhead is not saved by replacing it: compare the per-entry costs only, and keep layers
    # whose dense product is cheaper than a kernel call dense.  And a form that
    # stores more than _AUTO_MAX_STORED of the dense entries is never chosen: near-dense
    # patterns are where the model's error could make "auto" slower than dense.
    fixed = {f: _CPU["dense_call_us"] if f == "dense" else _fixed_us(f) for f in t}
    var = {f: t[f] - fixed[f] for f in t}
    cands = {f: v for f, v in var.items() if f != "dense" and stored[f] <= _AUTO_MAX_STORED * size}
    if not cands or var["dense"] < _fixed_us(min(cands, key=cands.get)):
        # a layer whose whole dense product costs less than one kernel call stays dense
        return dense
    best = min(cands, key=cands.get)
    return best if cands[best] <= _AUTO_MARGIN * var["dense"] else dense


def dense_fallback(batch_size: int) -> str:
    """What "auto" runs a layer kernel it keeps dense as.

    Args:
      batch_size: the inference batch size.

    Returns:
      ``"dense_t"`` up to ``DENSE_T_MAX_BATCH`` with the compiled CPU kernels, else ``"dense"``.
    """
    # At batch 1 "auto" runs the layer kernels it keeps dense as "dense_t" (compiled row-dot
    # kernel) rather than XLA's dot.  Measured on LeNet-300-100 at 90% (2-core EPYC, jax 0.10):
    # all XLA dense ~69 µs, csr then XLA dense ~31 µs, csr then dense_t ~22 µs; compacted
    # 4096-2048-2048-4096 unpruned: XLA 3.6 ms, dense_t 1.9 ms.
    return "dense_t" if batch_size <= DENSE_T_MAX_BATCH and ffi.available() else "dense"


def _fixed_us(fmt: str) -> float:
    if fmt == "bcsr_t":
        return _CPU["bcsr_t_call_us"]
    if fmt in ("csr", "block") and ffi.available():
        return _CPU["kernel_call_us"]
    return _CPU["gather_call_us"]
