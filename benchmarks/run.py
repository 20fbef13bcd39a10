#!/usr/bin/env python
"""prunejax benchmark suite: pruned-MLP inference and training speed, as ratios to dense.

One command runs everything and writes, under ``--out`` (default: this folder):

* ``results.json``  every cell, machine-readable;
* ``RESULTS.md``    header (machine, CPU, cores, JAX, date), targets, key ratios, full tables;
* ``plots/*.png``   speedup vs sparsity, one figure per model and granularity, one panel per batch.

Method (DESIGN.md section 5):

* Every figure is a ratio to the dense baseline measured in the same process: in a cell
  (model, granularity, sparsity, batch) the dense forward and every candidate format are timed in
  round robin (dense, f1, f2, ..., dense, f1, ...), and each format's ratio is the median over
  rounds of ``t_dense / t_format`` from the same round,
  which cancels drift and load from other processes.
* Median of ``--runs`` (default 20) timed calls after ``--warmup`` calls, each ended by
  ``jax.block_until_ready``; the timed callable is the AOT-compiled executable.
* The dense baseline is ``x @ W + b`` with W stored ``(in, out)`` and jitted (the layout XLA CPU
  runs without a transpose; ``x @ W.T`` with W stored ``(out, in)`` is ~14x slower at batch 1 and
  would inflate every sparse speedup).  The harness checks the layout before timing.
* Every format's output is checked against the masked dense output before it is timed; a format
  that disagrees is reported as WRONG, not timed.
* Runaway guards: a compiled executable whose temporary buffer (XLA memory analysis) exceeds
  ``--mem-limit-gb`` is not run; a format whose single call would overrun ``--cell-budget`` gets
  fewer runs (down to ``--min-runs``) and is marked ``capped``.
* The physical bound of each cell: ``1/(2d)`` for index formats at batch 1 (memory-bound: 8 bytes
  per nonzero vs 4 per dense weight), ``1/d`` (FLOPs) otherwise and for block/N:M/compacted formats.

Formats are pluggable entries (``FORMATS``: name -> builder).  ``pj.<name>`` entries come from
``prunejax.sparse.sparsify(params, format=<name>, batch_size=..., block=(16, 16))`` for every format
that module offers; a format (or a prunejax module) that does not exist yet is skipped with a note.

Run ``python benchmarks/run.py --help`` for the options; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- configuration

MODELS: dict[str, tuple[int, ...]] = {
    # LeNet-300-100 (Han et al. 2015): 784-300-100-10.
    "lenet": (784, 300, 100, 10),
    # Wide MLP: three 4096x4096 weight matrices (4096-4096-4096-4096), ReLU between layers.
    "wide": (4096, 4096, 4096, 4096),
    # One 4096x4096 layer, the shape DESIGN.md section 4 measured.
    "layer": (4096, 4096),
    # Toy sizes for the smoke test (multiples of 16 so every granularity applies).
    "toy": (64, 48, 32, 16),
}

GRANULARITIES = ("unstructured", "unit", "2:4", "block16")
SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
BATCHES = (1, 32, 256)
# Han et al. 2015, Table 4: LeNet-300-100 keeps 8% / 9% / 26% of fc1 / fc2 / fc3.
HAN_LENET_DENSITY = (0.08, 0.09, 0.26)
# Default grid restrictions per model (overridden by explicit --sparsities / --granularities).
MODEL_DEFAULT_SPARSITIES: dict[str, tuple[float, ...]] = {"layer": (0.9, 0.99)}
MODEL_DEFAULT_GRANULARITIES: dict[str, tuple[str, ...]] = {"layer": ("unstructured", "block16")}

BLOCK = (16, 16)


class Skip(Exception):
    """A format does not apply to a cell (or does not exist yet): reported with its note."""


@dataclasses.dataclass
class Built:
    """A runnable format: ``fn(*args)`` computes the forward; ``jitted`` when fn is a jax.jit."""

    fn: Callable[..., Any]
    args: tuple
    jitted: bool = True
    nbytes: int | None = None  # bytes of the stored kernels (+ biases)
    kind: str = "index"  # "dense" | "index" | "block" | "compact" | "auto": picks the bound
    note: str = ""


@dataclasses.dataclass
class Ctx:
    """Everything a builder may use for one (model, granularity, sparsity, batch) cell."""

    model: str
    dims: tuple[int, ...]
    granularity: str
    sparsity_label: str
    params: dict  # dense NumPy params, Flax layout {"Dense_i": {"kernel": (in,out), "bias"}}
    masks: dict  # bool NumPy masks, same structure
    pruned: dict  # params * masks (NumPy)
    batch: int
    x: np.ndarray
    cache: dict  # per (model, granularity, sparsity) cache shared across batches


# ----------------------------------------------------------------------------- small utilities


def _optional(modname: str) -> Any | None:
    """Import ``modname`` or return None when it does not exist (yet)."""
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and (e.name == modname or modname.startswith(e.name + ".")):
            return None
        raise


def _layer_names(dims: Sequence[int]) -> list[str]:
    return [f"Dense_{i}" for i in range(len(dims) - 1)]


def _tree_nbytes(tree: Any) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    return int(sum(int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize for a in leaves))


def _atomic_write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def init_params(dims: Sequence[int], seed: int) -> dict:
    """Glorot-normal MLP params in the Flax layout, kernels stored ``(in, out)``."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, (i, o) in zip(_layer_names(dims), zip(dims[:-1], dims[1:], strict=True), strict=True):
        std = math.sqrt(2.0 / (i + o))
        params[name] = {
            "kernel": (rng.standard_normal((i, o), dtype=np.float32) * std),
            "bias": (rng.standard_normal(o, dtype=np.float32) * 0.01),
        }
    return params


def _kernels(params: dict) -> list[np.ndarray]:
    return [params[k]["kernel"] for k in sorted(params, key=lambda s: int(s.split("_")[1]))]


def _biases(params: dict) -> list[np.ndarray]:
    return [params[k]["bias"] for k in sorted(params, key=lambda s: int(s.split("_")[1]))]


def check_dense_layout(params: dict, dims: Sequence[int]) -> None:
    """The dense baseline must run ``x @ W`` with W stored (in, out) (DESIGN.md's layout trap)."""
    for k, (i, o) in zip(_kernels(params), zip(dims[:-1], dims[1:], strict=True), strict=True):
        if k.shape != (i, o):
            raise AssertionError(f"dense baseline kernel has shape {k.shape}, expected (in, out)")
        if not k.flags.c_contiguous:
            raise AssertionError("dense baseline kernel is not C-contiguous (in, out)")


# ----------------------------------------------------------------------------- masks


def _np_magnitude(w: np.ndarray, s: float) -> np.ndarray:
    k = int(round(s * w.size))
    order = np.argsort(np.abs(w).ravel(), kind="stable")
    m = np.ones(w.size, bool)
    m[order[:k]] = False
    return m.reshape(w.shape)


def _np_units(w: np.ndarray, s: float) -> np.ndarray:
    k = int(round(s * w.shape[1]))
    order = np.argsort(np.linalg.norm(w, axis=0), kind="stable")
    cols = np.ones(w.shape[1], bool)
    cols[order[:k]] = False
    return cols


def _np_nm(w: np.ndarray, n: int, m: int) -> np.ndarray:
    i, o = w.shape
    if i % m:
        raise ValueError(f"in dimension {i} is not a multiple of {m}")
    g = np.abs(w).reshape(i // m, m, o)
    order = np.argsort(-g, axis=1, kind="stable")
    keep = np.zeros_like(g, bool)
    np.put_along_axis(keep, order[:, :n, :], True, axis=1)
    return keep.reshape(i, o)


def _np_block(w: np.ndarray, s: float, block: tuple[int, int]) -> np.ndarray:
    bh, bw = block
    i, o = w.shape
    if i % bh or o % bw:
        raise ValueError(f"shape {w.shape} is not a multiple of the block {block}")
    norms = np.linalg.norm(w.reshape(i // bh, bh, o // bw, bw), axis=(1, 3))
    keep = _np_magnitude(norms, s)
    return np.repeat(np.repeat(keep, bh, axis=0), bw, axis=1)


def magnitude_masks_ranked(params: dict, sparsity: float | dict, order_cache: dict) -> dict:
    """Layer-scope magnitude masks from a cached stable ranking of ``|w|`` (one argsort per layer
    for the whole sparsity sweep).  Same semantics as ``prunejax.masks.magnitude_masks``:
    ``round(s * n)`` (half-to-even) smallest entries pruned, ties broken by flat index."""
    masks = {}
    for name in sorted(params, key=lambda s: int(s.split("_")[1])):
        w = params[name]["kernel"]
        if name not in order_cache:
            order_cache[name] = np.argsort(np.abs(w).ravel(), kind="stable")
        s = sparsity[name] if isinstance(sparsity, dict) else sparsity
        m = np.ones(w.size, bool)
        m[order_cache[name][: int(round(s * w.size))]] = False
        masks[name] = {
            "kernel": m.reshape(w.shape),
            "bias": np.ones(params[name]["bias"].shape, bool),
        }
    return masks


def build_masks(
    params: dict, granularity: str, sparsity: float | dict, order_cache: dict | None = None
) -> tuple[dict, str]:
    """Masks for one cell: ``prunejax.masks`` builders when present, else a NumPy fallback.

    Unstructured masks come from ``magnitude_masks_ranked`` when ``order_cache`` is given (the
    sweep ranks each layer once; the smoke test checks it equals ``prunejax.masks``).  Unit
    pruning leaves the last layer's output units alone (a classifier's outputs cannot be
    removed).  Returns ``(masks, source)``.
    """
    if granularity == "unstructured" and order_cache is not None:
        return magnitude_masks_ranked(
            params, sparsity, order_cache
        ), "ranked once per layer (same semantics as prunejax.masks.magnitude_masks)"
    pm = _optional("prunejax.masks")
    names = sorted(params, key=lambda s: int(s.split("_")[1]))
    last = names[-1]

    def not_last(path: str, leaf: Any) -> bool:
        return np.ndim(leaf) >= 2 and not path.startswith(last + "/")

    if pm is not None:
        if granularity == "unstructured":
            m = pm.magnitude_masks(params, sparsity, scope="layer")
        elif granularity == "unit":
            m = pm.unit_masks(params, sparsity, where=not_last)
        elif granularity == "2:4":
            m = pm.nm_masks(params, 2, 4)
        elif granularity == "block16":
            m = pm.block_masks(params, sparsity, block=BLOCK)
        else:
            raise ValueError(f"unknown granularity {granularity!r}")
        return jax.tree_util.tree_map(lambda a: np.asarray(a, bool), m), "prunejax.masks"

    masks: dict = {}
    for name in names:
        w = params[name]["kernel"]
        s = sparsity[name] if isinstance(sparsity, dict) else sparsity
        bias = np.ones(params[name]["bias"].shape, bool)
        if granularity == "unstructured":
            km = _np_magnitude(w, s)
        elif granularity == "unit":
            if name == last:
                km = np.ones(w.shape, bool)
            else:
                cols = _np_units(w, s)
                km = np.broadcast_to(cols, w.shape).copy()
                bias = cols.copy()
        elif granularity == "2:4":
            km = _np_nm(w, 2, 4)
        elif granularity == "block16":
            km = _np_block(w, s, BLOCK)
        else:
            raise ValueError(f"unknown granularity {granularity!r}")
        masks[name] = {"kernel": km, "bias": bias}
    return masks, "numpy fallback in benchmarks/run.py"


def apply_masks_np(params: dict, masks: dict) -> dict:
    return jax.tree_util.tree_map(lambda p, m: np.where(m, p, np.float32(0)), params, masks)


def density(masks: dict) -> float:
    ks = _kernels(masks)
    return float(sum(int(k.sum()) for k in ks) / sum(k.size for k in ks))


# ----------------------------------------------------------------------------- forward passes


def _forward(kernels_matmul: Callable[[int, jax.Array], jax.Array], biases, x, n: int):
    h = x
    for i in range(n):
        h = kernels_matmul(i, h)
        if biases is not None:
            h = h + biases[i]
        if i < n - 1:
            h = jax.nn.relu(h)
    return h


def _dense_forward(params: dict, x: jax.Array) -> jax.Array:
    """The dense baseline: ``x @ W + b`` per layer, W stored (in, out), ReLU between layers."""
    ks, bs = _kernels(params), _biases(params)
    return _forward(lambda i, h: h @ ks[i], bs, x, len(ks))


dense_forward = jax.jit(_dense_forward)


@jax.jit
def dense_x_mask_forward(params: dict, masks: dict, x: jax.Array) -> jax.Array:
    """Dense with the mask multiplied in at every call (what mask-only tools execute)."""
    ks, bs = _kernels(params), _biases(params)
    ms, mbs = _kernels(masks), _biases(masks)
    bms = [b * m for b, m in zip(bs, mbs, strict=True)]
    return _forward(lambda i, h: h @ (ks[i] * ms[i]), bms, x, len(ks))


@jax.jit
def _bcoo_forward(kernels: list, biases: list, x: jax.Array) -> jax.Array:
    return _forward(lambda i, h: h @ kernels[i], biases, x, len(kernels))


@jax.jit
def _bcsr_left_forward(kernels_t: list, biases: list, x: jax.Array) -> jax.Array:
    # W^T stored as BCSR (out, in) on the LEFT: the only BCSR product JAX implements, and the one
    # that reaches the Eigen CSR x dense kernel on CPU.
    return _forward(lambda i, h: (kernels_t[i] @ h.T).T, biases, x, len(kernels_t))


@jax.jit
def _mlp_apply_forward(params: Any, x: jax.Array) -> jax.Array:
    from prunejax.models import mlp_apply

    return mlp_apply(params, x, activation=jax.nn.relu)


# ----------------------------------------------------------------------------- format builders


def build_dense(ctx: Ctx) -> Built:
    p = jax.device_put(ctx.pruned)
    return Built(dense_forward, (p, jnp.asarray(ctx.x)), nbytes=_tree_nbytes(p), kind="dense")


def build_dense_aa(ctx: Ctx) -> Built:
    """A/A control: the dense baseline again (own buffers, own executable), timed as a candidate.

    Its ratio is the noise floor of the cell: how far from 1.00 an identical computation lands.
    """
    p = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), jax.device_put(ctx.pruned))
    return Built(
        jax.jit(_dense_forward),
        (p, jnp.asarray(ctx.x)),
        nbytes=_tree_nbytes(p),
        kind="dense",
        note="A/A control: dense timed as a candidate (noise floor)",
    )


def build_dense_x_mask(ctx: Ctx) -> Built:
    p, m = jax.device_put(ctx.params), jax.device_put(ctx.masks)
    return Built(
        dense_x_mask_forward,
        (p, m, jnp.asarray(ctx.x)),
        nbytes=_tree_nbytes(p) + _tree_nbytes(m),
        kind="dense",
    )


def build_jsp_bcoo(ctx: Ctx) -> Built:
    from jax.experimental import sparse as jsparse

    if "jsp.bcoo" not in ctx.cache:
        ks = []
        for k in _kernels(ctx.pruned):
            rows, cols = np.nonzero(k)  # row-major: sorted, unique
            idx = np.stack([rows, cols], axis=1).astype(np.int32)
            ks.append(
                jsparse.BCOO(
                    (jnp.asarray(k[rows, cols]), jnp.asarray(idx)),
                    shape=k.shape,
                    indices_sorted=True,
                    unique_indices=True,
                )
            )
        ctx.cache["jsp.bcoo"] = ks
    ks = ctx.cache["jsp.bcoo"]
    bs = [jnp.asarray(b) for b in _biases(ctx.pruned)]
    return Built(_bcoo_forward, (ks, bs, jnp.asarray(ctx.x)), nbytes=_tree_nbytes((ks, bs)))


def build_jsp_bcsr(ctx: Ctx) -> Built:
    from jax.experimental import sparse as jsparse

    if "jsp.bcsr" not in ctx.cache:
        ks = []
        for k in _kernels(ctx.pruned):
            kt = np.ascontiguousarray(k.T)
            nz = kt != 0
            indptr = np.concatenate([[0], np.cumsum(nz.sum(axis=1))]).astype(np.int32)
            rows, cols = np.nonzero(kt)
            ks.append(
                jsparse.BCSR(
                    (
                        jnp.asarray(kt[rows, cols]),
                        jnp.asarray(cols.astype(np.int32)),
                        jnp.asarray(indptr),
                    ),
                    shape=kt.shape,
                    indices_sorted=True,
                    unique_indices=True,
                )
            )
        ctx.cache["jsp.bcsr"] = ks
    ks = ctx.cache["jsp.bcsr"]
    bs = [jnp.asarray(b) for b in _biases(ctx.pruned)]
    return Built(
        _bcsr_left_forward,
        (ks, bs, jnp.asarray(ctx.x)),
        nbytes=_tree_nbytes((ks, bs)),
        note="W^T as BCSR on the left (Eigen CSR kernel on CPU)",
    )


def build_scipy_csr(ctx: Ctx) -> Built:
    try:
        import scipy.sparse as ssp
    except ModuleNotFoundError:
        raise Skip("scipy is not installed") from None
    if "scipy.csr" not in ctx.cache:
        ctx.cache["scipy.csr"] = [
            ssp.csr_matrix(np.ascontiguousarray(k.T)) for k in _kernels(ctx.pruned)
        ]
    ks = ctx.cache["scipy.csr"]
    bs = _biases(ctx.pruned)
    n = len(ks)

    def fwd(x: np.ndarray) -> np.ndarray:
        h = x
        for i in range(n):
            h = (ks[i] @ h.T).T + bs[i]
            if i < n - 1:
                h = np.maximum(h, 0)
        return h

    nb = sum(k.data.nbytes + k.indices.nbytes + k.indptr.nbytes for k in ks) + _tree_nbytes(bs)
    return Built(
        fwd,
        (np.asarray(ctx.x),),
        jitted=False,
        nbytes=nb,
        note="SciPy CSR (W^T) x dense, NumPy, outside jit (reference)",
    )


def harness_compact(pruned: dict, masks: dict) -> dict:
    """Remove dead hidden units by slicing (used when ``prunejax.compact`` is missing).

    A hidden unit is dead when its kernel column and bias are all pruned (ReLU(0) = 0) or when its
    outgoing row of the next kernel is all zero; its column and the next layer's row are dropped.
    """
    names = sorted(pruned, key=lambda s: int(s.split("_")[1]))
    ks = [np.asarray(pruned[n]["kernel"]) for n in names]
    bs = [np.asarray(pruned[n]["bias"]) for n in names]
    for i in range(len(ks) - 1):
        col_alive = np.any(ks[i] != 0, axis=0) | (bs[i] != 0)
        row_alive = np.any(ks[i + 1] != 0, axis=1)
        if np.any(~np.any(ks[i] != 0, axis=0) & (bs[i] != 0) & row_alive):
            raise Skip("a unit with zero weights but a nonzero bias: needs bias folding")
        keep = col_alive & row_alive
        ks[i] = np.ascontiguousarray(ks[i][:, keep])
        bs[i] = bs[i][keep]
        ks[i + 1] = np.ascontiguousarray(ks[i + 1][keep, :])
    return {n: {"kernel": k, "bias": b} for n, k, b in zip(names, ks, bs, strict=True)}


def build_compact(ctx: Ctx) -> Built:
    if "compact" not in ctx.cache:
        pc = _optional("prunejax.compact")
        if pc is not None and hasattr(pc, "compact"):
            small = pc.compact(ctx.pruned, activation=jax.nn.relu)
            small = getattr(small, "params", small)
            src = "prunejax.compact"
        else:
            small = harness_compact(ctx.pruned, ctx.masks)
            src = "harness slicing (prunejax.compact missing)"
        small = jax.tree_util.tree_map(lambda a: np.ascontiguousarray(np.asarray(a)), small)
        ctx.cache["compact"] = (small, src)
    small, src = ctx.cache["compact"]
    shapes = "-".join(
        [str(_kernels(small)[0].shape[0])] + [str(k.shape[1]) for k in _kernels(small)]
    )
    p = jax.device_put(small)
    return Built(
        dense_forward,
        (p, jnp.asarray(ctx.x)),
        nbytes=_tree_nbytes(p),
        kind="compact",
        note=f"{src}; dims {shapes}",
    )


def build_compact_auto(ctx: Ctx) -> Built:
    """The compacted network run the way prunejax runs it: ``sparsify(..., "auto")``.

    At batch 1 that is the row-dot layout (``"dense_t"``) for every layer.  Its gain over
    ``compact`` is partly the layout alone, which ``pj.dense_t`` on the unpruned model (the 0%
    cells) shows.
    """
    ps = _optional("prunejax.sparse")
    if ps is None or not hasattr(ps, "sparsify"):
        raise Skip("prunejax.sparse.sparsify is not present")
    build_compact(ctx)  # fills the cache
    small, src = ctx.cache["compact"]
    key = f"compact.auto@{ctx.batch}"
    if key not in ctx.cache:
        ctx.cache[key] = ps.sparsify(jax.device_put(small), "auto", batch_size=ctx.batch)
    sp = ctx.cache[key]
    return Built(
        _mlp_apply_forward,
        (sp, jnp.asarray(ctx.x)),
        nbytes=_tree_nbytes(sp),
        kind="compact",
        note=f"{src} + sparsify auto; chose {_describe_kernels(sp)}",
    )


# prunejax.sparse formats: discovered at run time.
_PJ_DEFAULT_CANDIDATES = ("bcoo", "bcsr", "ell", "bcsr_left", "block", "nm", "auto")
# Formats whose construction depends on batch_size (rebuilt per batch; others are built once per
# sparsity and reused).
PJ_BATCH_DEPENDENT = {"auto"}
PJ_KIND_HINTS = (("block", "block"), ("nm", "block"), ("auto", "auto"))


def discover_pj_formats() -> tuple[list[str], str]:
    """Names of ``prunejax.sparse`` formats, and a note on how they were found."""
    ps = _optional("prunejax.sparse")
    if ps is None or not hasattr(ps, "sparsify"):
        return [], "prunejax.sparse (sparsify) not present"
    for attr in ("FORMATS", "AVAILABLE_FORMATS", "available_formats", "formats", "_FORMATS"):
        obj = getattr(ps, attr, None)
        if obj is None:
            continue
        names = obj() if callable(obj) else obj
        names = list(names.keys()) if isinstance(names, dict) else list(names)
        if names and all(isinstance(n, str) for n in names):
            if "auto" not in names:
                names.append("auto")
            return [n for n in names if n != "dense"], f"prunejax.sparse.{attr}"
    return list(_PJ_DEFAULT_CANDIDATES), "default candidate list (prunejax.sparse lists none)"


def _pj_kind(name: str) -> str:
    for key, kind in PJ_KIND_HINTS:
        if key in name:
            return kind
    return "index"


def make_pj_builder(fmt: str) -> Callable[[Ctx], Built]:
    def build(ctx: Ctx) -> Built:
        ps = _optional("prunejax.sparse")
        if ps is None or not hasattr(ps, "sparsify"):
            raise Skip("prunejax.sparse.sparsify is not present")
        key = f"pj.{fmt}" + (f"@{ctx.batch}" if fmt in PJ_BATCH_DEPENDENT else "")
        if key not in ctx.cache:
            try:
                sp = ps.sparsify(
                    jax.device_put(ctx.pruned), format=fmt, batch_size=ctx.batch, block=BLOCK
                )
            except (ValueError, TypeError, NotImplementedError) as e:
                ctx.cache[key] = Skip(f"sparsify refused: {type(e).__name__}: {e}"[:300])
            else:
                ctx.cache[key] = sp
        sp = ctx.cache[key]
        if isinstance(sp, Skip):
            raise sp
        note = ""
        if fmt == "auto":
            note = "chose " + _describe_kernels(sp)
        return Built(
            _mlp_apply_forward,
            (sp, jnp.asarray(ctx.x)),
            nbytes=_tree_nbytes(sp),
            kind=_pj_kind(fmt),
            note=note,
        )

    return build


def _describe_kernels(sp: Any) -> str:
    from prunejax._util import is_matrix_object

    leaves = jax.tree_util.tree_leaves(sp, is_leaf=is_matrix_object)
    kinds = []
    for leaf in leaves:
        if is_matrix_object(leaf):
            kinds.append(getattr(leaf, "format", None) or type(leaf).__name__)
        elif np.ndim(leaf) == 2:
            kinds.append("dense")
    return "/".join(str(k) for k in kinds)


# name -> (builder, granularities it applies to by default (None = all))
FORMATS: dict[str, tuple[Callable[[Ctx], Built], set[str] | None]] = {
    "dense.aa": (build_dense_aa, None),
    # Its cost does not depend on the mask's pattern: measured on unstructured masks only.
    "dense_x_mask": (build_dense_x_mask, {"unstructured"}),
    "jsp.bcoo": (build_jsp_bcoo, {"unstructured", "2:4"}),
    "jsp.bcsr": (build_jsp_bcsr, {"unstructured", "2:4", "block16"}),
    "scipy.csr": (build_scipy_csr, {"unstructured", "2:4", "block16"}),
    "compact": (build_compact, {"unit"}),
    "compact.auto": (build_compact_auto, {"unit"}),
}
REFERENCE_FORMATS = {"dense.aa", "dense_x_mask", "jsp.bcoo", "jsp.bcsr", "scipy.csr"}


# Which granularities a prunejax format runs on by default (others: index formats).
PJ_GRANULARITIES: dict[str, set[str] | None] = {
    "auto": None,
    "block": {"block16"},
    "nm": {"2:4"},
    "bcoo": {"unstructured", "2:4"},
    "bcsr": {"unstructured"},
    "ell": {"unstructured", "2:4"},
}
# Formats not run by default on kernels larger than this many entries (slow to build there,
# and a known loss): pj.bcsr (BCSR on the right of x @ W: gather/scatter, ~30 s to build per
# 4096x4096 sparsity level, 0.01-0.1x of dense on LeNet already).
MAX_ENTRIES = {"pj.bcsr": 1_000_000}
# Pairs of identical computations (same matrix format, same product) are not run twice by
# default: name -> the equivalent that runs instead.  ``jsp.bcoo`` (built from NumPy indices)
# is kept over ``pj.bcoo`` (``BCOO.fromdense``, slow to build at 4096^2); ``pj.bcsr_t`` over
# ``jsp.bcsr`` (both: W^T as BCSR on the left).
DUPLICATES = {"pj.bcoo": "jsp.bcoo", "jsp.bcsr": "pj.bcsr_t"}


def register_pj_formats(names: Sequence[str]) -> None:
    for n in names:
        grans = PJ_GRANULARITIES.get(n, {"unstructured", "2:4", "block16"})
        FORMATS[f"pj.{n}"] = (make_pj_builder(n), grans)


# ----------------------------------------------------------------------------- timing


def _timed(fn: Callable, args: tuple, calls: int = 1) -> float:
    """Latency: seconds per call of ``calls`` back-to-back calls, each one waited for.

    Every call is blocked on (``jax.block_until_ready``), so this is the latency of one request,
    not the throughput of pipelined asynchronous dispatch (which, for a ~60 µs LeNet call at
    batch 1, is ~3x lower and hides the kernel behind dispatch).
    """
    t0 = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / calls


# A timed sample is a burst of back-to-back calls lasting at least this long: steady-state
# inference (a server answering request after request) rather than one call after the other
# formats of the round ran, whose cold caches and sleeping thread pool (tens of µs) would swamp
# sub-100 µs models.
BURST_S = 2e-3
MAX_BURST = 64
SMALL_CELL_S = 1e-3
SMALL_CELL_ROUNDS = 3


def _burst(t1: float) -> int:
    return int(min(MAX_BURST, max(1, math.ceil(BURST_S / max(t1, 1e-9)))))


@dataclasses.dataclass
class Candidate:
    name: str
    built: Built
    call: Callable
    runs: int
    times: list
    ratios: list
    temp_bytes: int | None = None
    compile_s: float | None = None
    status: str = "ok"
    t1: float = 0.0  # one warm call, seconds
    burst: int = 1  # calls per timed sample (see _burst)
    notes: list = dataclasses.field(default_factory=list)


def _compile(built: Built) -> tuple[Callable, int | None, float]:
    if not built.jitted:
        return built.fn, None, 0.0
    t0 = time.perf_counter()
    compiled = built.fn.lower(*built.args).compile()
    dt = time.perf_counter() - t0
    temp = None
    try:
        ma = compiled.memory_analysis()
        if ma is not None:
            temp = int(ma.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory analysis is optional on some backends
        temp = None
    return compiled, temp, dt


def _bound(kind: str, d: float, batch: int, bytes_ratio: float | None) -> float | None:
    """Physical bound on the speedup over dense at density ``d``.

    Batch 1 is memory-bound: the bound is dense bytes / format bytes (1/(2d) for CSR with int32
    indices, ~1/(1.5d) with uint16 indices, ~1/d for blocks), never above 1/d.  Larger batches
    are compute-bound: 1/d of the FLOPs.  Dense-kind formats (dense x mask) are bound by 1
    (or their byte ratio at batch 1).
    """
    if d <= 0:
        return None
    flop = 1.0 if kind == "dense" else 1.0 / d
    if batch == 1 and bytes_ratio:
        return min(flop, bytes_ratio)
    return flop


def run_cell(ctx: Ctx, fmt_names: Sequence[str], opts: argparse.Namespace, log) -> list[dict]:
    """Build, check and time dense + every format of one cell in round robin."""
    dense = build_dense(ctx)
    dense_call, dense_temp, _ = _compile(dense)
    ref = np.asarray(dense_call(*dense.args))
    scale = float(np.max(np.abs(ref))) + 1.0
    d = density(ctx.masks)
    cands: list[Candidate] = []
    rows: list[dict] = []

    def row(name: str, **kw) -> dict:
        r = {
            "model": ctx.model,
            "granularity": ctx.granularity,
            "sparsity": ctx.sparsity_label,
            "density": d,
            "batch": ctx.batch,
            "format": name,
        }
        r.update(kw)
        return r

    for name in fmt_names:
        builder, _ = FORMATS[name]
        t0 = time.perf_counter()
        try:
            built = builder(ctx)
        except Skip as e:
            rows.append(row(name, status="skipped", note=str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - a broken format must not stop the suite
            rows.append(row(name, status="error", note=f"build: {type(e).__name__}: {e}"[:300]))
            log(f"    {name}: build error {e!r}"[:200])
            continue
        build_s = time.perf_counter() - t0
        try:
            call, temp, comp_s = _compile(built)
        except Exception as e:  # noqa: BLE001
            rows.append(row(name, status="error", note=f"compile: {type(e).__name__}: {e}"[:300]))
            log(f"    {name}: compile error {e!r}"[:200])
            continue
        c = Candidate(name, built, call, opts.runs, [], [], temp, comp_s)
        c.notes.append(f"build {build_s:.2f}s")
        if temp is not None and temp > opts.mem_limit_gb * 2**30:
            rows.append(
                row(
                    name,
                    status="skipped-memory",
                    temp_bytes=temp,
                    nbytes=built.nbytes,
                    kind=built.kind,
                    note=f"compiled temporary {temp / 2**30:.2f} GiB > "
                    f"--mem-limit-gb {opts.mem_limit_gb}; not run",
                )
            )
            continue
        try:
            t0 = time.perf_counter()
            out = call(*built.args)
            jax.block_until_ready(out)
            t_first = time.perf_counter() - t0
            out = np.asarray(out)
        except Exception as e:  # noqa: BLE001
            rows.append(row(name, status="error", note=f"run: {type(e).__name__}: {e}"[:300]))
            log(f"    {name}: run error {e!r}"[:200])
            continue
        if out.shape != ref.shape or not np.allclose(out, ref, rtol=1e-3, atol=1e-4 * scale):
            err = float(np.max(np.abs(out - ref))) if out.shape == ref.shape else float("nan")
            rows.append(
                row(
                    name,
                    status="WRONG",
                    note=f"output differs from masked dense "
                    f"(max abs err {err:.3g}, shape {out.shape})",
                )
            )
            log(f"    {name}: WRONG output")
            continue
        t1 = _timed(call, built.args) if t_first <= opts.max_call else t_first
        if t1 <= opts.max_call:
            for _ in range(max(0, opts.warmup - 2)):
                t1 = min(t1, _timed(call, built.args))
        if build_s + comp_s > 5:
            log(f"    {name}: build {build_s:.1f}s, compile {comp_s:.1f}s")
        if t1 * opts.runs > opts.cell_budget:
            c.runs = max(opts.min_runs, int(opts.cell_budget // max(t1, 1e-9)))
            if t1 > opts.max_call:
                c.runs = opts.min_runs
            if c.runs < opts.runs:
                c.status = "capped"
                c.notes.append(f"single call {t1 * 1e3:.0f} ms: {c.runs} runs")
        c.t1 = t1
        c.burst = _burst(t1)
        cands.append(c)

    # The reference output above was the dense executable's first call.
    t_dense = min(_timed(dense_call, dense.args) for _ in range(max(1, opts.warmup - 1)))
    dense_burst = _burst(t_dense)
    dense_times: list[float] = []
    n_rounds = opts.runs
    if t_dense < SMALL_CELL_S:
        # sub-millisecond cells: scheduling noise is a large part of a call, so take more rounds
        n_rounds = opts.runs * SMALL_CELL_ROUNDS
        for c in cands:
            if c.runs == opts.runs:
                c.runs = n_rounds
    # Cell budget: the rounds' predicted time stays within cell_budget x (1 + formats).
    t_round = t_dense * dense_burst + sum(
        min(c.t1 * _burst(c.t1), opts.cell_budget / max(c.runs, 1)) for c in cands
    )
    max_rounds = int(opts.cell_budget * (1 + len(cands)) // max(t_round, 1e-9))
    if max_rounds < n_rounds:
        n_rounds = max(opts.min_runs, max_rounds)
        for c in cands:
            if c.runs > n_rounds:
                c.runs = n_rounds
                c.status = "capped"
                c.notes.append(f"cell budget: {n_rounds} rounds")
    # The order inside a round is shuffled (fixed seed): for short calls the position in the
    # round matters (thread-pool wake-up, caches), and a fixed order would bias every ratio.
    order_rng = np.random.default_rng(opts.seed)
    for r in range(n_rounds):
        active = [c for c in cands if r < c.runs]
        slots: list[Candidate | None] = [None, *active]
        t_round: dict[int, float] = {}
        for k in order_rng.permutation(len(slots)):
            c = slots[k]
            t_round[k] = (
                _timed(dense_call, dense.args, dense_burst)
                if c is None
                else _timed(c.call, c.built.args, c.burst)
            )
        td = t_round[0]
        dense_times.append(td)
        for k, c in enumerate(slots[1:], start=1):
            c.times.append(t_round[k])
            c.ratios.append(td / t_round[k])

    dense_med = statistics.median(dense_times)
    rows.insert(
        0,
        row(
            "dense",
            status="ok" if n_rounds >= opts.runs else "capped",
            time_us=dense_med * 1e6,
            dense_us=dense_med * 1e6,
            ratio=1.0,
            runs=len(dense_times),
            temp_bytes=dense_temp,
            nbytes=dense.nbytes,
            kind="dense",
            bound=1.0,
            frac_bound=1.0,
            note="",
        ),
    )
    for c in cands:
        ratio = statistics.median(c.ratios)
        bratio = (dense.nbytes / c.built.nbytes) if c.built.nbytes else None
        b = _bound(c.built.kind, d, ctx.batch, bratio)
        if c.built.kind == "compact":
            b = _flop_ratio(ctx, c)
        rows.append(
            row(
                c.name,
                status=c.status,
                time_us=statistics.median(c.times) * 1e6,
                dense_us=statistics.median(dense_times[: c.runs]) * 1e6,
                ratio=ratio,
                runs=c.runs,
                ratio_iqr=_iqr(c.ratios),
                temp_bytes=c.temp_bytes,
                nbytes=c.built.nbytes,
                compile_s=c.compile_s,
                kind=c.built.kind,
                bound=b,
                frac_bound=(ratio / b) if b else None,
                note="; ".join([c.built.note] + c.notes if c.built.note else c.notes),
            )
        )
    return rows


def _flop_ratio(ctx: Ctx, c: Candidate) -> float:
    small = c.built.args[0]
    dense_flops = sum(k.size for k in _kernels(ctx.params))
    small_flops = sum(int(np.prod(k.shape)) for k in _kernels(small))
    return dense_flops / max(small_flops, 1)


def _iqr(xs: list[float]) -> list[float] | None:
    if len(xs) < 4:
        return None
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


# ----------------------------------------------------------------------------- training


def _masked_tx(inner, masks):
    po = _optional("prunejax.transforms")
    if po is not None and hasattr(po, "masked"):
        return po.masked(inner, masks), "prunejax.transforms.masked"
    import optax

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, m: u * m, updates, masks), state

    return optax.chain(
        inner, optax.GradientTransformation(init, update)
    ), "optax.adam + update mask multiply (prunejax.transforms missing)"


def _train_step_fns(masks, lr: float = 1e-3, put=jax.device_put):
    import optax

    def loss_fn(p, x, y):
        logits = _dense_forward(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def make(tx):
        def step(p, s, x, y):
            loss, g = jax.value_and_grad(loss_fn)(p, x, y)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        return tx, step

    dense_tx, dense_step = make(optax.adam(lr))
    mtx, src = _masked_tx(optax.adam(lr), put(masks))
    masked_tx, masked_step = make(mtx)
    return (dense_tx, dense_step), (masked_tx, masked_step), src


def bench_train(model: str, dims, opts, log, *, shardings=None) -> dict:
    """Masked train step vs dense train step (adam), interleaved; ratio = masked / dense time."""
    params = init_params(dims, opts.seed)
    masks, msrc = build_masks(params, "unstructured", 0.9)
    pruned = apply_masks_np(params, masks)
    rng = np.random.default_rng(opts.seed + 1)
    batch = opts.train_batch
    x = rng.standard_normal((batch, dims[0]), dtype=np.float32)
    y = rng.integers(0, dims[-1], batch).astype(np.int32)
    if shardings is not None:
        rep, data = shardings
        put_p = lambda t: jax.device_put(t, rep)  # noqa: E731
        x, y = jax.device_put(x, data), jax.device_put(y, data)
    else:
        put_p = jax.device_put
        x, y = jnp.asarray(x), jnp.asarray(y)
    (dtx, dstep), (mtx, mstep), src = _train_step_fns(masks, put=put_p)
    states = {}
    for name, tx, step in (("dense", dtx, dstep), ("masked", mtx, mstep)):
        p = put_p(pruned)
        s = tx.init(p)
        f = jax.jit(step, donate_argnums=(0, 1))
        states[name] = [f, p, s]
    times: dict[str, list[float]] = {"dense": [], "masked": []}
    n = opts.runs
    r = 0
    while r < opts.warmup + n:
        for name in ("dense", "masked"):
            f, p, s = states[name]
            t0 = time.perf_counter()
            p, s, loss = f(p, s, x, y)
            jax.block_until_ready((p, s, loss))
            dt = time.perf_counter() - t0
            states[name][1:] = [p, s]
            if r >= opts.warmup:
                times[name].append(dt)
        if r == opts.warmup:  # first timed round: cap the runs like an inference cell
            t_round = times["dense"][0] + times["masked"][0]
            n = min(n, max(opts.min_runs, int(opts.cell_budget * 3 // max(t_round, 1e-9))))
        r += 1
    # Correctness: pruned entries stay exactly zero under the masked optimizer.
    pm = states["masked"][1]
    leaked = sum(int(np.sum(np.asarray(pm[k]["kernel"])[~masks[k]["kernel"]] != 0)) for k in pm)
    ratios = [m / d for m, d in zip(times["masked"], times["dense"], strict=True)]
    res = {
        "model": model,
        "batch": batch,
        "sparsity": 0.9,
        "optimizer": "adam",
        "masked_source": src,
        "mask_source": msrc,
        "dense_us": statistics.median(times["dense"]) * 1e6,
        "masked_us": statistics.median(times["masked"]) * 1e6,
        "ratio": statistics.median(ratios),
        "runs": n,
        "pruned_entries_nonzero": leaked,
        "devices": 1 if shardings is None else len(jax.devices()),
    }
    log(
        f"  train {model}: masked/dense = {res['ratio']:.3f} ({res['dense_us'] / 1e3:.1f} ms dense)"
    )
    return res


def _multidevice_worker(opts) -> None:
    """Runs inside a subprocess with 2 host devices: data-parallel train steps, JSON on stdout."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devs = jax.devices()
    if len(devs) < 2:
        print(json.dumps({"error": f"only {len(devs)} device(s)"}))
        return
    mesh = Mesh(np.array(devs[:2]), ("data",))
    sh = (NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data")))
    out = [bench_train(m, MODELS[m], opts, lambda s: None, shardings=sh) for m in opts.models]
    print("@@MULTIDEVICE@@" + json.dumps(out))


def bench_multidevice(opts, log) -> list[dict] | dict:
    if jax.default_backend() != "cpu":
        return {"note": "multi-device subprocess uses forced host devices; CPU backend only"}
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_multidevice-worker",
        "--models",
        ",".join(opts.models),
        "--runs",
        str(opts.runs),
        "--warmup",
        str(opts.warmup),
        "--train-batch",
        str(opts.train_batch),
        "--seed",
        str(opts.seed),
    ]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=opts.md_timeout)
    except subprocess.TimeoutExpired:
        return {"note": f"multi-device subprocess exceeded {opts.md_timeout}s"}
    for line in p.stdout.splitlines():
        if line.startswith("@@MULTIDEVICE@@"):
            res = json.loads(line[len("@@MULTIDEVICE@@") :])
            for r in res:
                log(f"  train 2-device {r['model']}: masked/dense = {r['ratio']:.3f}")
            return res
    return {
        "note": f"multi-device subprocess failed (rc {p.returncode}): "
        f"{(p.stderr or p.stdout)[-400:]}"
    }


# ----------------------------------------------------------------------------- machine info


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(importlib.import_module("jaxlib"), "__version__", "?"),
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in jax.devices()],
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "bcoo_cusparse_lowering": bool(getattr(jax.config, "jax_bcoo_cusparse_lowering", False)),
    }
    try:
        import scipy

        info["scipy"] = scipy.__version__
    except ModuleNotFoundError:
        info["scipy"] = None
    return info


# ----------------------------------------------------------------------------- the suite


def _sparsity_points(model: str, opts) -> list[tuple[str, Any]]:
    pts = []
    sps = (
        opts.sparsities
        if opts.sparsities is not None
        else MODEL_DEFAULT_SPARSITIES.get(model, SPARSITIES)
    )
    for s in sps:
        pts.append((f"{round(s * 100, 2):g}%", float(s)))
    if model == "lenet" and opts.han:
        names = _layer_names(MODELS["lenet"])
        han = {n: round(1 - d, 4) for n, d in zip(names, HAN_LENET_DENSITY, strict=True)}
        pts.append(("han", han))
    return pts


def select_formats(gran: str, opts) -> list[str]:
    names = []
    for name, (_, grans) in FORMATS.items():
        if opts.formats is not None:
            if not (name in opts.formats or name.split(".", 1)[-1] in opts.formats):
                continue
        elif name in DUPLICATES and DUPLICATES[name] in FORMATS and not opts.all_pairs:
            continue
        if opts.all_pairs or grans is None or gran in grans:
            names.append(name)
    return names


def run_suite(opts, log=print) -> dict:
    t_start = time.perf_counter()
    if opts.cusparse:
        jax.config.update("jax_bcoo_cusparse_lowering", True)
    pj_names, pj_src = discover_pj_formats()
    register_pj_formats(pj_names)
    info = machine_info()
    log(
        f"jax {info['jax']} on {info['backend']} ({info['cpu']}, {info['cores']} cores); "
        f"prunejax.sparse formats: {pj_names or 'none'} ({pj_src})"
    )
    if opts.formats is not None:
        unknown = [
            f
            for f in opts.formats
            if f not in FORMATS and not any(n.split(".", 1)[-1] == f for n in FORMATS)
        ]
    else:
        unknown = []
    cells: list[dict] = []
    notes: list[str] = []
    for f in unknown:
        notes.append(f"format {f!r} is not available (not in prunejax.sparse / harness): skipped")
        log(f"  format {f!r} not available: skipped")
    mask_sources = set()
    for model in opts.models:
        dims = MODELS[model]
        params = init_params(dims, opts.seed)
        check_dense_layout(params, dims)
        grans = (
            opts.granularities
            if opts.granularities is not None
            else MODEL_DEFAULT_GRANULARITIES.get(model, GRANULARITIES)
        )
        order_cache: dict = {}
        rng = np.random.default_rng(opts.seed + 7)
        xs = {b: rng.standard_normal((b, dims[0]), dtype=np.float32) for b in opts.batches}
        for gran in grans:
            fmts = select_formats(gran, opts)
            for label, s in _sparsity_points(model, opts):
                if gran == "2:4" and (label == "han" or abs(s - 0.5) > 1e-9):
                    continue
                if gran != "unstructured" and label == "han":
                    continue
                t_m = time.perf_counter()
                try:
                    masks, msrc = build_masks(params, gran, s, order_cache)
                except (ValueError, TypeError) as e:
                    if "divisible" in str(e):  # a shape problem: same at every sparsity
                        notes.append(f"{model} {gran}: skipped, masks not built ({e})")
                        log(f"  {model} {gran}: skipped, masks not built: {e}")
                        break
                    notes.append(f"{model} {gran} {label}: masks not built ({e})")
                    log(f"  {model} {gran} {label}: masks not built: {e}")
                    continue
                mask_sources.add(msrc)
                big = max(k.size for k in _kernels(params))
                cell_fmts = [
                    f
                    for f in fmts
                    if opts.all_pairs
                    or opts.formats is not None
                    or f not in MAX_ENTRIES
                    or big <= MAX_ENTRIES[f] // (1000 if opts.quick else 1)
                ]
                if s == 0.0 and big > opts.zero_sparsity_max:
                    # A sparse format at 0% stores every entry: a known loss whose conversion
                    # of millions of entries would dominate the suite's time.
                    cell_fmts = [
                        f
                        for f in cell_fmts
                        if f in ("dense.aa", "dense_x_mask", "pj.auto", "pj.dense_t")
                    ]
                log(f"  {model} {gran} {label}: masks in {time.perf_counter() - t_m:.1f}s")
                pruned = apply_masks_np(params, masks)
                cache: dict = {}
                for b in opts.batches:
                    ctx = Ctx(model, dims, gran, label, params, masks, pruned, b, xs[b], cache)
                    t0 = time.perf_counter()
                    rows = run_cell(ctx, cell_fmts, opts, log)
                    cells.extend(rows)
                    log(
                        f"  {model:5s} {gran:12s} {label:>5s} b={b:<4d} "
                        f"({time.perf_counter() - t0:5.1f}s) " + _brief(rows)
                    )
                del cache
    train, multi = [], None
    if opts.train:
        # --quick: the wide model's train step is seconds per call; LeNet shows the path.
        for model in [m for m in opts.models if not (opts.quick and m == "wide")]:
            train.append(bench_train(model, MODELS[model], opts, log))
        if opts.multidevice:
            multi = bench_multidevice(opts, log)
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["wall_s"] = time.perf_counter() - t_start
    info["command"] = "python benchmarks/run.py " + " ".join(opts.argv)
    info["note"] = opts.note
    info["prunejax_formats"] = pj_names
    info["prunejax_formats_source"] = pj_src
    info["mask_sources"] = sorted(mask_sources)
    info["settings"] = {
        k: getattr(opts, k)
        for k in (
            "runs",
            "warmup",
            "min_runs",
            "cell_budget",
            "max_call",
            "mem_limit_gb",
            "train_batch",
            "seed",
            "zero_sparsity_max",
        )
    }
    return {
        "info": info,
        "cells": cells,
        "train": train,
        "train_multidevice": multi,
        "notes": notes,
    }


def _brief(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if r["format"] == "dense":
            parts.append(f"dense {r['time_us'] / 1e3:.2f}ms")
        elif r.get("ratio") is not None:
            parts.append(
                f"{r['format']} {r['ratio']:.2f}x" + ("*" if r["status"] == "capped" else "")
            )
        elif r["status"] != "skipped":
            parts.append(f"{r['format']} {r['status']}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------- reporting


def _cell(cells, **kw) -> list[dict]:
    return [c for c in cells if all(c.get(k) == v for k, v in kw.items())]


def _best(rows: list[dict], prefer_pj: bool = True) -> tuple[dict | None, str]:
    ok = [r for r in rows if r.get("ratio") is not None and r["format"] != "dense"]
    pj = [r for r in ok if r["format"].startswith(("pj.", "compact"))]
    pool, scope = (
        (pj, "prunejax")
        if (prefer_pj and pj)
        else (
            [r for r in ok if r["format"] not in REFERENCE_FORMATS or r["format"] == "jsp.bcsr"],
            "harness",
        )
    )
    if not pool:
        return None, scope
    return max(pool, key=lambda r: r["ratio"]), scope


def compute_targets(res: dict) -> list[dict]:
    cells = res["cells"]
    out: list[dict] = []

    def target(name, measured, goal, met, detail):
        out.append(
            {"target": name, "measured": measured, "goal": goal, "met": met, "detail": detail}
        )

    def best_target(label, model, gran, sp, batch, goal):
        rows = _cell(cells, model=model, granularity=gran, sparsity=sp, batch=batch)
        if not rows:
            target(label, None, goal, None, "not measured in this run")
            return
        b, scope = _best(rows)
        auto = [r for r in rows if r["format"] == "pj.auto" and r.get("ratio") is not None]
        extra = f"; auto {auto[0]['ratio']:.2f}x" if auto else ""
        if b is None:
            target(label, None, goal, False, "no format ran")
            return
        met = b["ratio"] >= goal
        target(
            label,
            b["ratio"],
            goal,
            met,
            f"best {scope} format {b['format']} {b['ratio']:.2f}x "
            f"({'+' if met else ''}{(b['ratio'] / goal - 1) * 100:.0f}% vs goal){extra}",
        )

    best_target("wide 90% unstructured, batch 1 >= 3x", "wide", "unstructured", "90%", 1, 3.0)
    best_target("wide 90% unstructured, batch 256 >= 1.5x", "wide", "unstructured", "90%", 256, 1.5)
    best_target("wide 90% 16x16 blocks, batch 1 >= 8x", "wide", "block16", "90%", 1, 8.0)
    best_target("wide 90% 16x16 blocks, batch 256 >= 5x", "wide", "block16", "90%", 256, 5.0)

    comp_name = "wide 50% units removed (compact), every batch >= 0.9 x FLOP ratio"
    comp = {
        r["batch"]: r
        for r in _cell(cells, model="wide", granularity="unit", sparsity="50%", format="compact")
        if r.get("frac_bound") is not None
    }
    if comp:
        # Judged on `compact`: the compacted network run exactly like the baseline (XLA's dot,
        # (in, out) layout), so the ratio is what removing the units buys.  `compact.auto` adds
        # prunejax's batch-1 row-dot layout, which speeds up even the unpruned model (pj.dense_t
        # at 0%): reported beside it, with that layout gain, not counted.
        parts = []
        for b in sorted(comp):
            r = comp[b]
            txt = f"b={b}: compact {r['ratio']:.2f}x of {r['bound']:.2f}x ({r['frac_bound']:.2f})"
            ca = [
                c
                for c in _cell(cells, model="wide", granularity="unit", sparsity="50%", batch=b)
                if c["format"] == "compact.auto" and c.get("ratio") is not None
            ]
            lay = [
                c
                for c in _cell(
                    cells, model="wide", granularity="unstructured", sparsity="0%", batch=b
                )
                if c["format"] == "pj.dense_t" and c.get("ratio") is not None
            ]
            if ca:
                txt += f"; compact.auto {ca[0]['ratio']:.2f}x ({ca[0]['note'].split('; build')[0]})"
                if lay and "dense_t" in ca[0]["note"]:
                    same_layout = ca[0]["ratio"] / lay[0]["ratio"]
                    txt += (
                        f", of which the layout alone gives {lay[0]['ratio']:.2f}x on the "
                        f"unpruned model (compaction in that layout: {same_layout:.2f}x)"
                    )
            parts.append(txt)
        worst = min(comp.values(), key=lambda r: r["frac_bound"])
        target(
            comp_name,
            worst["frac_bound"],
            0.9,
            worst["frac_bound"] >= 0.9,
            "; ".join(parts),
        )
    else:
        target(comp_name, None, 0.9, None, "not measured in this run")

    for b in (1, 256):
        best_target(
            f"LeNet at Han's 8/9/26% density, batch {b} >= 1.5x",
            "lenet",
            "unstructured",
            "han",
            b,
            1.5,
        )

    # BCOO crossover: lowest sparsity where BCOO >= dense, per model and batch (unstructured).
    for fmt in ("jsp.bcoo", "pj.bcoo"):
        rows = [r for r in cells if r["format"] == fmt and r["granularity"] == "unstructured"]
        if not rows:
            continue
        parts = []
        for model in dict.fromkeys(r["model"] for r in rows):
            for b in sorted({r["batch"] for r in rows if r["model"] == model}):
                rs = [r for r in rows if r["model"] == model and r["batch"] == b]
                won = sorted((1 - r["density"]) for r in rs if (r.get("ratio") or 0) >= 1.0)
                best = max((r.get("ratio") or 0 for r in rs), default=0)
                parts.append(
                    f"{model} b={b}: "
                    + (f"wins from {won[0] * 100:.0f}%" if won else f"never (best {best:.2f}x)")
                )
        target(
            f"BCOO ({fmt}) reported honestly, with its crossover sparsity",
            None,
            None,
            None,
            "; ".join(parts),
        )

    for t in res.get("train", []):
        target(
            f"masked train step <= 1.10x dense ({t['model']}, batch {t['batch']})",
            t["ratio"],
            1.10,
            t["ratio"] <= 1.10,
            f"{t['masked_us'] / 1e3:.2f} ms vs {t['dense_us'] / 1e3:.2f} ms ({t['masked_source']})",
        )
    if isinstance(res.get("train_multidevice"), list):
        for t in res["train_multidevice"]:
            target(
                f"masked train step <= 1.10x dense, 2 devices ({t['model']})",
                t["ratio"],
                1.10,
                t["ratio"] <= 1.10,
                f"{t['masked_us'] / 1e3:.2f} ms vs {t['dense_us'] / 1e3:.2f} ms",
            )

    auto_all = [r for r in cells if r["format"] == "pj.auto" and r.get("ratio") is not None]
    # Where auto kept XLA's dense dot for every layer it runs the baseline's own computation
    # (same compiled HLO): such a cell cannot be slower than dense, and its ratio measures only
    # timing noise, like the A/A control.  It is listed, not judged.
    same = [r for r in auto_all if _auto_is_baseline(r)]
    auto = [r for r in auto_all if not _auto_is_baseline(r)]
    if auto:
        worst = min(auto, key=lambda r: r["ratio"])
        bad = [r for r in auto if r["ratio"] < 0.95]

        def aa(r):
            hit = _cell(
                cells,
                model=r["model"],
                granularity=r["granularity"],
                sparsity=r["sparsity"],
                batch=r["batch"],
                format="dense.aa",
            )
            return f" (A/A {hit[0]['ratio']:.2f})" if hit and hit[0].get("ratio") else ""

        det = (
            f"worst {worst['model']} {worst['granularity']} {worst['sparsity']} "
            f"b={worst['batch']}: {worst['ratio']:.2f}x{aa(worst)}; {len(bad)} of {len(auto)} "
            "cells below 0.95x"
            + (
                ": "
                + ", ".join(
                    f"{r['model']}/{r['granularity']}/{r['sparsity']}/b{r['batch']} "
                    f"{r['ratio']:.2f}x{aa(r)}"
                    for r in bad[:16]
                )
                if bad
                else ""
            )
        )
        if same:
            lo = min(same, key=lambda r: r["ratio"])
            det += (
                f". Not judged: {len(same)} cells where auto kept XLA's dense dot for every "
                "layer, i.e. ran the baseline's own computation; their ratios span "
                f"{lo['ratio']:.2f}x ({lo['model']}/{lo['granularity']}/{lo['sparsity']}/"
                f"b{lo['batch']}{aa(lo)}) to {max(r['ratio'] for r in same):.2f}x, the timing "
                "noise of identical executables"
            )
        target(
            'format="auto" never > 5% slower than dense (every cell >= 0.95x)',
            worst["ratio"],
            0.95,
            not bad,
            det,
        )
    else:
        target(
            'format="auto" never > 5% slower than dense (every cell >= 0.95x)',
            None,
            0.95,
            None,
            "prunejax.sparse auto not available in this run",
        )
    return out


def _auto_is_baseline(r: dict) -> bool:
    """Whether a ``pj.auto`` cell chose plain (XLA) dense for every layer (note ``chose ...``)."""
    note = r.get("note") or ""
    if not note.startswith("chose "):
        return False
    kinds = note[len("chose ") :].split(";")[0].strip().split("/")
    return bool(kinds) and all(k == "dense" for k in kinds)


def _fmt_ratio(r: dict | None) -> str:
    if r is None:
        return ""
    if r.get("ratio") is None:
        return {"skipped": "–", "skipped-memory": "mem", "WRONG": "WRONG", "error": "err"}.get(
            r["status"], r["status"]
        )
    s = f"{r['ratio']:.2f}"
    return s + ("*" if r["status"] == "capped" else "")


def render_markdown(res: dict) -> str:
    info, cells = res["info"], res["cells"]
    L: list[str] = []
    L.append("# prunejax benchmark results\n")
    L.append(f"- Date: {info['date_utc']}; wall time {info['wall_s'] / 60:.1f} min")
    L.append(f"- Machine: `{info['host']}`, {info['platform']}")
    L.append(
        f"- CPU: {info['cpu']}, {info['cores']} cores; backend `{info['backend']}` "
        f"({', '.join(sorted(set(info['devices'])))})"
    )
    L.append(
        f"- Versions: Python {info['python']}, JAX {info['jax']} (jaxlib {info['jaxlib']}), "
        f"NumPy {info['numpy']}, SciPy {info['scipy']}"
    )
    la0, la1 = info.get("loadavg_start"), info.get("loadavg_end")
    if la0 and la1:
        L.append(f"- Load average at start {la0[0]:.2f}, at end {la1[0]:.2f} (1-min)")
    if info.get("note"):
        L.append(f"- Note: {info['note']}")
    L.append(f"- Command: `{info['command']}`")
    st = info["settings"]
    L.append(
        f"- Method: ratio = median over rounds of t_dense / t_format, dense re-timed in "
        f"every round with every format of the cell (order shuffled per round) in the same "
        f"process; `dense.aa` is an A/A control (dense timed as a candidate: its distance "
        f"from 1.00 is the cell's noise floor); {st['runs']} runs "
        f"after {st['warmup']} warm-up calls, `jax.block_until_ready`, AOT-compiled "
        f"executables; each run is a burst of back-to-back calls, each waited for, lasting "
        f">= {BURST_S * 1e3:.0f} ms (at most {MAX_BURST} calls; one call for slow formats): "
        f"time = burst time / calls, the steady-state latency of one request; cells whose "
        f"dense call is under {SMALL_CELL_S * 1e3:.0f} ms take {SMALL_CELL_ROUNDS}x the runs. "
        f"Runaway guard: per-format timed budget {st['cell_budget']} s per cell "
        f"(fewer runs, down to {st['min_runs']}, marked `*`), executables with a compiled "
        f"temporary above {st['mem_limit_gb']} GiB are not run (`mem`). At 0% sparsity on "
        f"kernels above {st['zero_sparsity_max']:,} entries only dense_x_mask, auto and "
        "dense_t run."
    )
    L.append(
        "- Dense baseline: `x @ W + b`, W stored (in, out), jitted (checked by the harness). "
        "Models: LeNet-300-100 = 784-300-100-10; wide = 4096-4096-4096-4096 (three 4096x4096 "
        "weight matrices, ReLU between); layer = one 4096x4096 matmul."
    )
    L.append(
        f"- prunejax.sparse formats: {', '.join(info['prunejax_formats']) or 'none'} "
        f"({info['prunejax_formats_source']}); masks from "
        f"{', '.join(info['mask_sources']) or '-'}; `cusparse` lowering "
        f"{'on' if info['bcoo_cusparse_lowering'] else 'off'}."
    )
    L.append(
        "- Every format's output was checked against the masked dense output before timing "
        "(`WRONG` = mismatch, not timed).\n"
    )

    over = [c for c in cells if (c.get("frac_bound") or 0) > 1.05 and c["format"] != "dense"]
    if over:
        n_meas = sum(1 for c in cells if c.get("ratio") and c["format"] != "dense")
        L.append(
            f"**Caveat**: {len(over)} of {n_meas} measured "
            "cells exceed their physical bound by more than 5% (frac > 1.05 in the details). "
            "The bound assumes the dense baseline runs at the machine's limit; above it, "
            "either XLA's dense dot runs below that limit at this shape (a tuned kernel then "
            "beats 1/d) or competing processes slowed the multithreaded dense baseline more "
            "than the format (compare the cell's `dense.aa` A/A control, and the load "
            "averages above).\n"
        )
    L.append("## Targets\n")
    L.append("| target | measured | goal | status | detail |")
    L.append("| --- | --- | --- | --- | --- |")
    for t in compute_targets(res):
        m = "" if t["measured"] is None else f"{t['measured']:.2f}"
        g = "" if t["goal"] is None else f"{t['goal']:g}"
        s = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        L.append(f"| {t['target']} | {m} | {g} | {s} | {t['detail']} |")
    L.append("")

    L.append("## Key ratios (speedup over dense, same process; `*` = capped runs)\n")
    key = [
        ("wide", "unstructured", "0%"),
        ("wide", "unstructured", "90%"),
        ("wide", "block16", "90%"),
        ("wide", "unit", "50%"),
        ("wide", "2:4", "50%"),
        ("wide", "unstructured", "99%"),
        ("lenet", "unstructured", "han"),
        ("lenet", "unstructured", "90%"),
        ("lenet", "unit", "90%"),
        ("layer", "unstructured", "90%"),
        ("layer", "block16", "90%"),
    ]
    fmts_all = list(dict.fromkeys(c["format"] for c in cells if c["format"] != "dense"))
    hdr_done = False
    rows_out = []
    used_fmts: list[str] = []
    for model, gran, sp in key:
        for b in sorted({c["batch"] for c in cells}):
            rs = _cell(cells, model=model, granularity=gran, sparsity=sp, batch=b)
            if not rs:
                continue
            rows_out.append((model, gran, sp, b, rs))
            for r in rs:
                if (
                    r.get("ratio") is not None
                    and r["format"] != "dense"
                    and r["format"] not in used_fmts
                ):
                    used_fmts.append(r["format"])
    used_fmts = [f for f in fmts_all if f in used_fmts]
    for model, gran, sp, b, rs in rows_out:
        if not hdr_done:
            L.append(
                "| model | granularity | sparsity | batch | dense µs | "
                + " | ".join(used_fmts)
                + " |"
            )
            L.append("| --- " * (5 + len(used_fmts)) + "|")
            hdr_done = True
        dense = [r for r in rs if r["format"] == "dense"][0]
        by = {r["format"]: r for r in rs}
        L.append(
            f"| {model} | {gran} | {sp} | {b} | {dense['time_us']:.0f} | "
            + " | ".join(_fmt_ratio(by.get(f)) for f in used_fmts)
            + " |"
        )
    L.append("")

    if res.get("train"):
        L.append("## Training step (adam, 90% unstructured masks; ratio = masked / dense time)\n")
        L.append(
            "| model | devices | batch | dense ms | masked ms | ratio | masked via | "
            "pruned entries nonzero after steps |"
        )
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        tr = list(res["train"])
        if isinstance(res.get("train_multidevice"), list):
            tr += res["train_multidevice"]
        for t in tr:
            L.append(
                f"| {t['model']} | {t['devices']} | {t['batch']} | {t['dense_us'] / 1e3:.2f} "
                f"| {t['masked_us'] / 1e3:.2f} | {t['ratio']:.3f} | {t['masked_source']} | "
                f"{t['pruned_entries_nonzero']} |"
            )
        if isinstance(res.get("train_multidevice"), dict):
            L.append(f"\nMulti-device: {res['train_multidevice'].get('note')}")
        else:
            L.append(
                "\nRows with 2 devices: data-parallel over the batch on 2 XLA host devices "
                "forced onto the same cores (`--xla_force_host_platform_device_count=2`), "
                "params, optimizer state and masks replicated. They show the masked step "
                "runs sharded; their times are not a multi-device speedup."
            )
        L.append("")

    L.append("## All cells, by model and granularity\n")
    L.append(
        "Ratio = speedup over dense (higher is better); `–` = not applicable (see the "
        "details' note), `mem` = not run, compiled temporary above the limit. bound = "
        "physical bound at that density: batch 1 is memory-bound, dense bytes / format "
        "bytes (1/(2d) for CSR with int32 indices, ~1/d for blocks), capped at 1/d; larger "
        "batches 1/d of the FLOPs; compacted: its FLOP ratio. frac = ratio / bound (above 1 "
        "means the dense baseline ran below the machine's limit, or was slowed more than "
        "the format by other processes; see the caveat above). temp = XLA compiled "
        "temporary buffer (peak scratch beyond arguments and outputs), bytes = stored "
        "kernels and biases.\n"
    )
    groups = list(dict.fromkeys((c["model"], c["granularity"]) for c in cells))
    for model, gran in groups:
        gc = [c for c in cells if c["model"] == model and c["granularity"] == gran]
        fm = list(dict.fromkeys(c["format"] for c in gc if c["format"] != "dense"))
        L.append(f"### {model}, {gran}\n")
        L.append("| sparsity | batch | dense µs | " + " | ".join(fm) + " |")
        L.append("| --- " * (3 + len(fm)) + "|")
        for sp in dict.fromkeys(c["sparsity"] for c in gc):
            for b in sorted({c["batch"] for c in gc}):
                rs = [c for c in gc if c["sparsity"] == sp and c["batch"] == b]
                if not rs:
                    continue
                by = {r["format"]: r for r in rs}
                L.append(
                    f"| {sp} | {b} | {by['dense']['time_us']:.0f} | "
                    + " | ".join(_fmt_ratio(by.get(f)) for f in fm)
                    + " |"
                )
        L.append("")
        L.append(
            "<details><summary>details (µs, bound, fraction of bound, memory, notes)</summary>\n"
        )
        L.append(
            "| sparsity | batch | format | status | µs | ratio | bound | frac | temp MB | "
            "bytes MB | runs | note |"
        )
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in gc:

            def f(v, fmt):
                return "" if v is None else format(v, fmt)

            L.append(
                f"| {r['sparsity']} | {r['batch']} | {r['format']} | {r['status']} | "
                f"{f(r.get('time_us'), '.0f')} | {f(r.get('ratio'), '.2f')} | "
                f"{f(r.get('bound'), '.1f')} | {f(r.get('frac_bound'), '.2f')} | "
                f"{f(None if r.get('temp_bytes') is None else r['temp_bytes'] / 2**20, '.1f')} | "
                f"{f(None if r.get('nbytes') is None else r['nbytes'] / 2**20, '.2f')} | "
                f"{r.get('runs', '')} | {str(r.get('note', '')).replace('|', '/')} |"
            )
        L.append("\n</details>\n")
    if res.get("notes"):
        L.append("## Notes\n")
        L.extend(f"- {n}" for n in res["notes"])
        L.append("")
    return "\n".join(L) + "\n"


def render_plots(res: dict, outdir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = res["cells"]
    written = []
    groups = list(dict.fromkeys((c["model"], c["granularity"]) for c in cells))
    for model, gran in groups:
        gc = [
            c
            for c in cells
            if c["model"] == model and c["granularity"] == gran and c["sparsity"] != "han"
        ]
        batches = sorted({c["batch"] for c in gc})
        if not gc or len({c["sparsity"] for c in gc}) < 1:
            continue
        fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
        fmts = list(dict.fromkeys(c["format"] for c in gc if c["format"] != "dense"))
        for ax, b in zip(axes[0], batches, strict=True):
            for fm in fmts:
                rs = sorted(
                    [
                        c
                        for c in gc
                        if c["batch"] == b and c["format"] == fm and c.get("ratio") is not None
                    ],
                    key=lambda c: 1 - c["density"],
                )
                if rs:
                    ax.plot(
                        [100 * (1 - r["density"]) for r in rs],
                        [r["ratio"] for r in rs],
                        marker="o",
                        ms=3,
                        label=fm,
                    )
            if gran == "unit":
                # Unit pruning: the bound is the compacted network's FLOP ratio (rows of the next
                # layer go too), not 1/d of the weights.
                rs = sorted(
                    [
                        c
                        for c in gc
                        if c["batch"] == b and c["format"] == "compact" and c.get("bound")
                    ],
                    key=lambda c: 1 - c["density"],
                )
                if rs:
                    ax.plot(
                        [100 * (1 - r["density"]) for r in rs],
                        [r["bound"] for r in rs],
                        "k:",
                        lw=1,
                        label="FLOP-ratio bound (compact)",
                    )
            else:
                bs = sorted(
                    {(1 - c["density"]) for c in gc if c["batch"] == b and c["density"] > 0}
                )
                if bs:
                    ax.plot(
                        [100 * s for s in bs],
                        [1 / (1 - s) for s in bs],
                        "k:",
                        lw=1,
                        label="1/d bound",
                    )
                    if b == 1:
                        ax.plot(
                            [100 * s for s in bs],
                            [1 / (2 * (1 - s)) for s in bs],
                            "k--",
                            lw=0.8,
                            label="1/(2d) bound",
                        )
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_yscale("log")
            ax.set_title(f"{model}, {gran}, batch {b}")
            ax.set_xlabel(
                "weight sparsity (%)" + (" (last layer's units kept)" if gran == "unit" else "")
            )
            ax.set_ylabel("speedup over dense")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        fn = os.path.join(outdir, "plots", f"speedup_{model}_{gran.replace(':', 'of')}.png")
        os.makedirs(os.path.dirname(fn), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(fn), prefix=".tmp-", suffix=".png")
        os.close(fd)
        fig.savefig(tmp, dpi=90)
        os.chmod(tmp, 0o644)
        os.replace(tmp, fn)
        plt.close(fig)
        written.append(fn)
    return written


def write_outputs(res: dict, outdir: str, *, plots: bool = True) -> list[str]:
    os.makedirs(outdir, exist_ok=True)
    res = dict(res)
    res["targets"] = compute_targets(res)
    paths = [os.path.join(outdir, "results.json"), os.path.join(outdir, "RESULTS.md")]
    _atomic_write(paths[0], json.dumps(res, indent=1, default=_json_default) + "\n")
    _atomic_write(paths[1], render_markdown(res))
    if plots:
        paths += render_plots(res, outdir)
    return paths


def _json_default(o):
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, set):
        return sorted(o)
    raise TypeError(type(o).__name__)


# ----------------------------------------------------------------------------- CLI


def _csv(typ):
    def parse(s: str):
        return [typ(v) for v in s.split(",") if v.strip()]

    return parse


def _sparsity_list(s: str) -> list[float]:
    out = []
    for v in s.split(","):
        f = float(v)
        f = f / 100 if f > 1 else f
        if not 0 <= f <= 1:
            raise argparse.ArgumentTypeError(f"sparsity {v} is not in [0, 1] (or 0-100 %)")
        out.append(f)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (< 2 min on 2 idle cores): sparsity 90%%, batch 1/256, "
        "unstructured/unit/block16, 5 runs, LeNet train step only, no "
        "multi-device, no pj.bcsr",
    )
    p.add_argument(
        "--models",
        type=_csv(str),
        default=None,
        help=f"comma list of {sorted(MODELS)} (default: lenet,wide)",
    )
    p.add_argument(
        "--granularities", type=_csv(str), default=None, help=f"comma list of {list(GRANULARITIES)}"
    )
    p.add_argument(
        "--sparsities",
        type=_sparsity_list,
        default=None,
        help="comma list, fractions or percent (default 0,50,80,90,95,98,99)",
    )
    p.add_argument("--batches", type=_csv(int), default=None, help="default 1,32,256")
    p.add_argument(
        "--formats",
        type=_csv(str),
        default=None,
        help="comma list of format names (e.g. jsp.bcoo,pj.ell,auto), run where they "
        "apply to the granularity (see --all-pairs); default: all",
    )
    p.add_argument(
        "--all-pairs",
        action="store_true",
        help="run every format on every granularity (ignore the applicability table)",
    )
    p.add_argument(
        "--no-han",
        dest="han",
        action="store_false",
        help="skip the LeNet point at Han et al.'s 8/9/26%% density",
    )
    p.add_argument("--runs", type=int, default=None, help="timed runs per format (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 3)")
    p.add_argument("--min-runs", type=int, default=3)
    p.add_argument(
        "--cell-budget",
        type=float,
        default=None,
        help="seconds of timed calls per format per cell before runs are cut (default 2)",
    )
    p.add_argument(
        "--max-call",
        type=float,
        default=1.0,
        help="a single call slower than this gets --min-runs runs",
    )
    p.add_argument(
        "--mem-limit-gb",
        type=float,
        default=1.0,
        help="do not run executables whose compiled temporary exceeds this",
    )
    p.add_argument(
        "--zero-sparsity-max",
        type=int,
        default=1_000_000,
        help="at 0%% sparsity, only dense_x_mask, auto and dense_t run on kernels larger than "
        "this many entries",
    )
    p.add_argument("--no-train", dest="train", action="store_false")
    p.add_argument("--no-multidevice", dest="multidevice", action="store_false")
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--md-timeout", type=float, default=600)
    p.add_argument(
        "--cusparse",
        action="store_true",
        help="set jax_bcoo_cusparse_lowering=True (GPU: BCOO/BCSR via cuSPARSE; no "
        "effect on CPU). Run once with and once without to compare.",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text for the RESULTS.md header")
    p.add_argument("--out", default=HERE, help="output folder (default: benchmarks/)")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument(
        "--from-json",
        default=None,
        metavar="PATH",
        help="measure nothing: re-render RESULTS.md and the plots from a results.json",
    )
    p.add_argument(
        "--_multidevice-worker", dest="md_worker", action="store_true", help=argparse.SUPPRESS
    )
    opts = p.parse_args(argv)
    opts.argv = list(sys.argv[1:] if argv is None else argv)
    q = opts.quick
    if opts.models is None:
        opts.models = ["lenet", "wide"]
    for m in opts.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r} (choose from {sorted(MODELS)})")
    if opts.granularities is not None:
        for g in opts.granularities:
            if g not in GRANULARITIES:
                p.error(f"unknown granularity {g!r} (choose from {list(GRANULARITIES)})")
    if opts.sparsities is None and q:
        opts.sparsities = [0.5, 0.9] if opts.granularities == ["2:4"] else [0.9]
        if opts.granularities is None:
            opts.granularities = ["unstructured", "unit", "block16"]
    if opts.batches is None:
        opts.batches = [1, 256] if q else list(BATCHES)
    if any(b < 1 for b in opts.batches):
        p.error("batches must be >= 1")
    if opts.runs is None:
        opts.runs = 5 if q else 20
    if opts.warmup is None:
        opts.warmup = 2 if q else 3
    if opts.cell_budget is None:
        opts.cell_budget = 1.0 if q else 2.0
    if opts.runs < 1 or opts.min_runs < 1:
        p.error("--runs and --min-runs must be >= 1")
    opts.min_runs = min(opts.min_runs, opts.runs)
    if q:
        opts.multidevice = False
    if opts.formats is not None:
        opts.formats = ["pj.auto" if f == "auto" else f for f in opts.formats]
    return opts


def main(argv: Sequence[str] | None = None) -> dict:
    opts = parse_args(argv)
    if opts.md_worker:
        _multidevice_worker(opts)
        return {}
    if opts.from_json:
        with open(opts.from_json) as f:
            res = json.load(f)
        res.pop("targets", None)
        paths = write_outputs(res, opts.out, plots=opts.plots)
        print(f"re-rendered {len(paths)} files under {opts.out} from {opts.from_json}")
        return res
    if jax.default_backend() == "cpu" and opts.cusparse:
        print("note: --cusparse has no effect on the CPU backend")
    t0 = time.perf_counter()
    res = run_suite(opts)
    paths = write_outputs(res, opts.out, plots=opts.plots)
    print(f"wrote {len(paths)} files under {opts.out} in {time.perf_counter() - t0:.0f} s")
    return res


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
