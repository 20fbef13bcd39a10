"""The choice behind ``format="auto"``: a cost model calibrated on this machine, or measurement.

``predict_times`` gives the model's cost of each candidate form of one kernel at a batch size,
with the constants measured on this machine on first use (``prunejax.sparse.tuning``);
``auto_format`` picks the form for one kernel: a sparse form only where it is predicted at most
``0.7`` of dense (a gain of at least 1.43x, the safety margin for the model's error) and stores
at most half the dense entries, else dense (``"dense_t"`` for layer kernels at batch 1 with the
compiled CPU kernels).  With ``tune=True`` it measures instead (``tune_format``): every
candidate form of the layer at the user's batch size, timed in this process in the same rounds
as dense (like FFTW's ``FFTW_MEASURE`` and cuDNN's autotuner), the times cached per layer shape,
pattern class, batch size, dtype and machine; a sparse form (or ``"dense_t"``) is chosen only
where measured at least ``TUNE_MARGIN`` (1.1x) faster than dense.  Elsewhere than fp32 on CPU
both keep dense.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from prunejax._util import KERNEL_NAMES, PyTree, dense_layers, last_key
from prunejax.sparse import ffi, tuning
from prunejax.sparse.kernels import DENSE_T_MAX_BATCH, block_nse

__all__ = [
    "TUNE_MARGIN",
    "TUNE_ROUNDS",
    "auto_format",
    "choose_measured",
    "dense_fallback",
    "layer_kernels",
    "measurement_key",
    "predict_times",
    "tune_format",
]

_CACHED_BYTES = 8 << 20
# Eigen's CSR kernel ("bcsr_t") is a candidate from this batch size on: below it its cost does
# not follow batch * nnz (2048x2048 at 10%, 2-core EPYC Zen 5, AVX-512, load ~5, fastest of 5:
# batch 1 3.8 ms, batch 8 1.5 ms, batch 32 1.6 ms, against XLA dense 0.56 ms at batch 1), and
# it never wins there.
_BCSR_T_FROM = 32
# A sparse form is chosen only when predicted at most this fraction of dense, so that the
# model's error does not make "auto" slower than dense.
_AUTO_MARGIN = 0.7
# ... and only when it stores at most this fraction of the dense kernel's entries.
_AUTO_MAX_STORED = 0.5
# tune=True: a form other than dense is chosen only when measured this much faster than dense
# (median over rounds of t_dense / t_form, and the median times themselves).
TUNE_MARGIN = 1.1
# tune=True: measurement rounds per layer.
TUNE_ROUNDS = 7


def predict_times(
    shape: tuple[int, int],
    nnz: int,
    batch_size: int,
    *,
    block_nse: int | None = None,
    ell_nse: int | None = None,
    compiled: bool | None = None,
    constants: Mapping[str, float] | None = None,
    measured: bool = False,
    block: tuple[int, int] = (16, 16),
) -> dict[str, Any]:
    """Predicted cost (microseconds) of ``x @ W`` per format: ``"auto"``'s model.

    What bounds each form: dense streams ``4 * in * out`` bytes (batch 1) or runs at the matmul
    FLOP rate (large batch), costs add; ``csr`` is one gather per nonzero and batch row below
    batch 8 (the ~6 bytes per nonzero are read faster than gathers issue), then one 16/32-wide
    FMA per nonzero and tile of x (load/FMA bound, plus transposing x into tiles); ``block``
    streams its blocks at batch 1 and runs dense 16-wide FMAs on stored block entries at larger
    batch; ``bcsr_t`` (Eigen's CSR kernel, a candidate from batch 32 on) and the pure-JAX forms
    pay per entry and batch row.
    The constants are this machine's (``prunejax.sparse.tuning.constants``: measured on
    first use, then cached).

    Args:
      shape: ``(in, out)`` of the kernel.
      nnz: its nonzeros.
      batch_size: rows of ``x``.
      block_nse: stored entries of its block form (``None``: no block candidate).
      ell_nse: stored entries of its ELL form (default ``nnz``).
      compiled: whether the compiled kernels are available (default:
        ``prunejax.sparse.ffi.available()``).
      constants: the model's constants (default: this machine's calibrated ones).
      measured: also report what ``sparsify(..., "auto", tune=True)`` measured for a fp32
        kernel of this shape, nonzeros, block occupancy (``block_nse`` at ``block``) and batch
        size on this machine.
      block: the block shape ``block_nse`` counts (only for ``measured``).

    Returns:
      ``{format: microseconds}`` for ``"dense"`` and each candidate sparse format; with
      ``measured=True``, ``{format: {"predicted": µs or None, "measured": µs or None}}`` for
      every format predicted or measured (``None`` where there is no such number).
    """
    c = tuning.constants() if constants is None else constants
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
        if b <= 8:
            ell = nnz if ell_nse is None else ell_nse
            t["ell"] = c["gather_call_us"] + b * ell * c["ell_ns"] * ns
        if block_nse is not None:
            t["block"] = c["gather_call_us"] + b * block_nse * c["block_pure_ns"] * ns
    if b >= _BCSR_T_FROM:
        t["bcsr_t"] = c["bcsr_t_call_us"] + b * nnz * c["bcsr_t_ns"] * ns
    if not measured:
        return t
    key = measurement_key(shape, nnz, b, block, block_nse, "float32")
    rec = tuning.lookup_measurement(key) or {"times_us": {}}
    return {
        f: {"predicted": t.get(f), "measured": rec["times_us"].get(f)}
        for f in (*t, *(f for f in rec["times_us"] if f not in t))
    }


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
    w: np.ndarray,
    batch_size: int,
    block: tuple[int, int],
    *,
    layer_kernel: bool,
    tune: bool = False,
    build: Callable[[str], Any] | None = None,
) -> str:
    """The format ``sparsify(..., "auto")`` gives one kernel.

    Args:
      w: the concrete ``(in, out)`` kernel.
      batch_size: the inference batch size.
      block: the block shape of the ``"block"`` candidate.
      layer_kernel: whether ``w`` is a dense-layer kernel (see :func:`layer_kernels`); a layer
        kernel that stays dense becomes ``dense_fallback(batch_size)``, any other 2-D leaf
        ``"dense"`` (with ``tune``: ``"dense_t"`` only where measured faster).
      tune: measure the candidates (:func:`tune_format`) instead of predicting them.
      build: ``format -> kernel object`` of ``w`` (needed by ``tune``).

    Returns:
      One of ``"dense"``, ``"dense_t"``, ``"csr"``, ``"bcsr_t"``, ``"ell"``, ``"block"``.
    """
    if w.dtype != np.float32 or jax.default_backend() != "cpu":
        # the model is calibrated for fp32 on CPU; elsewhere dense is the safe choice
        return "dense"
    if tune:
        if build is None:
            raise ValueError("auto_format(tune=True) needs build=")
        return tune_format(w, batch_size, block, layer_kernel=layer_kernel, build=build)
    dense = dense_fallback(batch_size) if layer_kernel else "dense"
    return _auto_choice(w, batch_size, block, dense)


def _auto_choice(
    w: np.ndarray, batch_size: int, block: tuple[int, int], dense: str = "dense"
) -> str:
    """The format the model gives one kernel; ``dense`` is what it returns when dense wins."""
    c = tuning.constants()
    nz = w != 0
    ell_nse = int(nz.sum(axis=0).max(initial=0)) * w.shape[1]
    bnse = block_nse(w, block)
    t = predict_times(
        w.shape, int(nz.sum()), batch_size, block_nse=bnse, ell_nse=ell_nse, constants=c
    )
    size = w.size
    stored = _stored(w, block)
    # Inside one jitted model a dense dot fuses with its neighbours, so its stand-alone call
    # overhead is not saved by replacing it: compare the per-entry costs only, and keep layers
    # whose dense product is cheaper than a kernel call dense.  And a form that
    # stores more than _AUTO_MAX_STORED of the dense entries is never chosen: near-dense
    # patterns are where the model's error could make "auto" slower than dense.
    fixed = {f: c["dense_call_us"] if f == "dense" else _fixed_us(f, c) for f in t}
    var = {f: t[f] - fixed[f] for f in t}
    cands = {f: v for f, v in var.items() if f != "dense" and stored[f] <= _AUTO_MAX_STORED * size}
    if not cands or var["dense"] < _fixed_us(min(cands, key=cands.get), c):
        # a layer whose whole dense product costs less than one kernel call stays dense
        return dense
    best = min(cands, key=cands.get)
    return best if cands[best] <= _AUTO_MARGIN * var["dense"] else dense


def dense_fallback(batch_size: int) -> str:
    """What "auto" (without ``tune``) runs a layer kernel it keeps dense as.

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


def _fixed_us(fmt: str, c: Mapping[str, float]) -> float:
    if fmt == "bcsr_t":
        return c["bcsr_t_call_us"]
    if fmt in ("csr", "block") and ffi.available():
        return c["kernel_call_us"]
    return c["gather_call_us"]


# ----------------------------------------------------------------------------- tune=True


def measurement_key(
    shape: tuple[int, int],
    nnz: int,
    batch_size: int,
    block: tuple[int, int],
    block_nse: int | None,
    dtype: str,
) -> str:
    """The key of a ``tune=True`` measurement on one machine: what the kernels' speed depends on.

    The pattern class is the nonzero count and the block occupancy (stored entries of the
    ``block`` form, ``None`` when the shape does not divide into blocks).

    Args:
      shape: ``(in, out)``.
      nnz: nonzeros.
      batch_size: rows of ``x``.
      block: the block candidate's shape.
      block_nse: stored entries of the block form.
      dtype: the kernel's dtype name.

    Returns:
      ``"<in>x<out>/nnz=<nnz>/block=<bh>x<bw>:<block_nse>/batch=<b>/<dtype>"``.
    """
    n_in, n_out = shape
    bh, bw = block
    return f"{n_in}x{n_out}/nnz={nnz}/block={bh}x{bw}:{block_nse}/batch={batch_size}/{dtype}"


def choose_measured(rec: Mapping[str, Any], *, layer_kernel: bool) -> str:
    """The format a ``tune=True`` measurement record decides for: the fastest form measured at
    least ``TUNE_MARGIN`` faster than dense, else dense.

    Faster means both: the median over rounds of the paired ratio of net times (dense / form)
    and the ratio of the median net times reach the margin, a net time being the measured time
    less the time of launching an executable (measured in the same rounds: a model pays it
    once, not per layer).  A form chosen is therefore also faster than dense in raw times.

    Args:
      rec: the record (``{"times_us", "launch_us", "ratios", ...}``, see :func:`tune_format`).
      layer_kernel: whether ``"dense_t"`` may be chosen (layer kernels only).

    Returns:
      The format; ``"dense"`` when nothing beats dense by the margin in its own measurements.
    """
    times, ratios, launch = rec["times_us"], rec["ratios"], rec["launch_us"]
    ok = {
        f: r
        for f, r in ratios.items()
        if (f != "dense_t" or layer_kernel)
        and r >= TUNE_MARGIN
        and (times[f] - launch) * TUNE_MARGIN <= times["dense"] - launch
    }
    return max(ok, key=ok.get) if ok else "dense"


def _stored(w: np.ndarray, block: tuple[int, int]) -> dict[str, int]:
    """Entries each candidate form of ``w`` stores (padding included)."""
    nz = w != 0
    nnz = int(nz.sum())
    ell = int(nz.sum(axis=0).max(initial=0)) * w.shape[1]
    return {"csr": nnz, "bcsr_t": nnz, "ell": ell, "block": block_nse(w, block) or w.size}


def _candidates(w: np.ndarray, batch_size: int, block: tuple[int, int]) -> list[str]:
    """The forms ``tune`` measures: the model's candidates that store at most
    ``_AUTO_MAX_STORED`` of the dense entries, and ``"dense_t"`` at small batch."""
    t = predict_times(w.shape, 1, batch_size, block_nse=block_nse(w, block), constants=tuning.PRIOR)
    stored = _stored(w, block)
    out = [f for f in t if f != "dense" and stored[f] <= _AUTO_MAX_STORED * w.size]
    if batch_size <= DENSE_T_MAX_BATCH and ffi.available():
        out.append("dense_t")
    return out


def tune_format(
    w: np.ndarray,
    batch_size: int,
    block: tuple[int, int],
    *,
    layer_kernel: bool,
    build: Callable[[str], Any],
) -> str:
    """Measure ``x @ W`` for every candidate form of ``w`` and dense, choose, cache the times.

    The forms (the model's candidates that store at most half the dense entries, plus
    ``"dense_t"`` at batch 1 with the compiled kernels) and XLA's dense dot are AOT-compiled
    and timed on a random fp32 ``x`` of ``batch_size`` rows, all in the same ``TUNE_ROUNDS``
    rounds in shuffled order (``prunejax.sparse.tuning.time_interleaved``), together with the
    launch of a trivial executable (``x * 2``), whose cost a jitted model pays once rather than
    per layer.  The record (median µs per form and of the launch, median over rounds of the
    net-time ratio dense / form) is cached under :func:`measurement_key` and this machine's
    key; a later call with the same key reuses it.  The decision is :func:`choose_measured`.

    Args:
      w: the concrete fp32 ``(in, out)`` kernel.
      batch_size: the inference batch size.
      block: the block candidate's shape.
      layer_kernel: whether ``"dense_t"`` may be chosen.
      build: ``format -> kernel object`` of ``w``.

    Returns:
      The chosen format.
    """
    bnse = block_nse(w, block)
    nnz = int(np.count_nonzero(w))
    key = measurement_key(w.shape, nnz, batch_size, block, bnse, str(w.dtype))
    cands = _candidates(w, batch_size, block)
    rec = tuning.lookup_measurement(key)
    if rec is None or not set(cands) <= set(rec["times_us"]):
        kernels = {"dense": jax.numpy.asarray(w), **{f: build(f) for f in cands}}
        rec = _measure(kernels, batch_size, w.shape[0])
        tuning.store_measurement(key, rec)
    # A record may hold forms measured for another layer of the same key (e.g. ELL, whose
    # padding depends on the column counts, not on nnz): choose among this layer's candidates.
    keep = {"dense", *cands}
    rec = {
        **rec,
        "times_us": {f: t for f, t in rec["times_us"].items() if f in keep},
        "ratios": {f: r for f, r in rec["ratios"].items() if f in keep},
    }
    return choose_measured(rec, layer_kernel=layer_kernel)


def _measure(kernels: dict[str, Any], batch_size: int, n_in: int) -> dict[str, Any]:
    """Time ``x @ k`` for every kernel and an executable launch in the same rounds."""
    x = np.random.default_rng(0).standard_normal((batch_size, n_in)).astype(np.float32)
    calls = {f: tuning.matmul_call(x, k) for f, k in kernels.items()}
    calls["launch"] = tuning.launch_call(x)
    times = {f: np.asarray(v) for f, v in tuning.time_interleaved(calls, TUNE_ROUNDS).items()}
    launch = times.pop("launch")

    def net(f: str) -> np.ndarray:  # at least a tenth of the measured time stays
        return np.maximum(times[f] - launch, times[f] / 10)

    return {
        "times_us": {f: float(np.median(v)) for f, v in times.items()},
        "launch_us": float(np.median(launch)),
        "ratios": {f: float(np.median(net("dense") / net(f))) for f in times if f != "dense"},
        "rounds": TUNE_ROUNDS,
        "margin": TUNE_MARGIN,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
