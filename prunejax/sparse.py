"""Conversion of pruned kernels to sparse formats that really run faster, and back.

``sparsify`` turns each selected kernel (by default every 2-D leaf; kernels are ``(in, out)`` and
used as ``x @ W``) into a kernel object that supports ``x @ W`` inside and outside ``jax.jit``,
so model code written for dense kernels (``prunejax.models.mlp_apply``) runs unchanged.

Formats (``FORMATS``):

``"dense"``
    the plain array (what ``"auto"`` falls back to when no sparse form wins).
``"dense_t"``
    the dense kernel stored transposed, ``(out, in)``: a layout, not a sparse form.  At batch 1
    on CPU it runs a compiled row-dot kernel that streams ``W`` once (faster than XLA's batch-1
    dot on ``(in, out)``: LeNet-300-100 ~3x, 4096-wide layers ~1.3x); at other batches and
    elsewhere XLA's dot with the transposed operand.  ``"auto"`` uses it for layers
    that stay dense at batch 1; it is also the fastest way to run compacted layers at batch 1.
``"bcoo"``, ``"bcsr"``
    ``jax.experimental.sparse`` matrices of ``W`` (int32 indices, sorted).  Reference forms: on
    CPU their ``x @ W`` is gather -> multiply -> scatter-add and loses to dense almost everywhere.
    On GPU they reach cuSPARSE only with ``jax.config.update("jax_bcoo_cusparse_lowering", True)``
    (a global setting this library never touches).
``"csr"``
    CSR of ``W.T`` (one row per output unit; uint16 column indices when ``in <= 65536``).  On CPU
    with fp32 it runs a compiled kernel (``prunejax._kernels_cpu``): batch < 8 gather-dot, bound
    by the ~6 bytes read per nonzero; batch >= 8 x-tiled 16-wide FMAs, bound by FMA/load rate.
    Elsewhere (GPU, other dtypes, no compiler) it runs as ``"bcsr_t"``.
``"bcsr_t"``
    the same CSR of ``W.T`` run as ``(W_T @ x.T).T`` with ``jax.experimental.sparse.BCSR`` on the
    LEFT, the only placement that reaches XLA CPU's multithreaded Eigen CSR kernel (and cuSPARSE
    on GPU with the flag above).  Wins on CPU at batch >= ~32 and density <= 10%.
``"ell"``
    padded-row ELL of ``W.T``: ``(out, K)`` indices and values, ``y = sum(x[..., idx] * val)``.
    Pure JAX gather; a batch-1 form (its temporary grows as ``batch * out * K``).
``"block"``
    dense ``(bh, bw)`` blocks (``block=`` argument, default 16x16) grouped by block column.
    Compiled kernel on CPU (blocks in registers, no scatter); elsewhere gather + batched matmul +
    sorted ``segment_sum``.  For masks from ``prunejax.masks.block_masks``.
``"nm"``
    N:M sparsity along the input axis (``nm_masks(params, n, m, axis=0)``): the kept values of
    ``W.T`` with uint8 offsets inside each group of ``m`` inputs, run as a compressed gather.
``"auto"``
    per layer the form predicted fastest for ``batch_size`` by a cost model calibrated on CPU
    (see ``predict_times``), dense when nothing is predicted to beat dense by a margin: at
    batch 1 with the compiled CPU kernels a layer kernel that stays dense is ``"dense_t"``
    (faster than XLA's batch-1 dot), elsewhere the plain array.

Every prunejax kernel object has ``shape``, ``dtype``, ``nnz`` (nonzeros), ``nse`` (stored
entries, padding included), ``nbytes``, ``format``, ``todense()`` and ``__rmatmul__``; it is a
registered pytree whose arrays are its children, so it passes through ``jax.jit`` as an argument.
``format_of`` / ``formats_of`` report the format of a leaf / of every kernel of a tree.

Kernel objects are for inference: the compiled kernels define no derivatives, so train and
fine-tune with dense masked kernels (``prunejax.optim``) and sparsify afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from prunejax import _kernels_cpu
from prunejax._util import (
    KERNEL_NAMES,
    PyTree,
    Where,
    check_block,
    dense_layers,
    flatten,
    is_matrix_object,
    is_traced,
    last_key,
    select,
)

__all__ = [
    "FORMATS",
    "BCSRKernel",
    "BlockKernel",
    "CsrKernel",
    "DenseTKernel",
    "EllKernel",
    "NMKernel",
    "densify",
    "format_of",
    "formats_of",
    "predict_times",
    "sparsify",
]

FORMATS = ("auto", "dense", "dense_t", "bcoo", "bcsr", "csr", "bcsr_t", "ell", "block", "nm")


# ----------------------------------------------------------------------------- helpers


def _as_2d(x: Any, n_in: int) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """Reshape ``x`` of shape ``(..., in)`` to 2-D; return it and the inverse reshape."""
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[-1] != n_in:
        raise ValueError(
            f"x @ W: x has shape {x.shape}, but W has {n_in} input features (x.shape[-1])"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), n_in)

    def back(y: jax.Array) -> jax.Array:
        return y.reshape(*lead, y.shape[-1])

    return x2, back


def _use_compiled(*dtypes: Any) -> bool:
    return all(jnp.dtype(d) == jnp.float32 for d in dtypes) and _kernels_cpu.available()


def _on_cpu_else(args: tuple, cpu: Callable, default: Callable) -> jax.Array:
    """``cpu(*args)`` when lowering for CPU, ``default(*args)`` on any other platform."""
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


class _Kernel:
    """Shared behaviour of prunejax kernel objects (one pytree leaf for prunejax's utilities)."""

    __prunejax_kernel__ = True
    __array_ufunc__ = None  # make ``numpy_array @ W`` defer to ``W.__rmatmul__``
    format: str = ""
    shape: tuple[int, int]

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        """Bytes of all stored arrays (values, indices, pointers)."""
        return int(sum(np.dtype(c.dtype).itemsize * math.prod(c.shape) for c in self._arrays()))

    def _arrays(self) -> tuple:
        return self.tree_flatten()[0]  # type: ignore[attr-defined]

    @classmethod
    def tree_unflatten(cls, aux: tuple, children: tuple) -> Any:
        # every kernel's constructor takes its arrays (tree_flatten's children), then its aux
        return cls(*children, *aux)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(format={self.format!r}, shape={self.shape}, "
            f"dtype={self.dtype}, nnz={self.nnz})"  # type: ignore[attr-defined]
        )


# ----------------------------------------------------------------------------- BCSR of W


@jax.tree_util.register_pytree_node_class
class BCSRKernel(jsparse.BCSR):
    """``jax.experimental.sparse.BCSR`` of ``W`` (in, out) that also supports ``x @ W``.

    ``BCSR`` itself implements only ``BCSR @ dense``; ``x @ W`` here goes through the equivalent
    BCOO product (gather, multiply, scatter-add).  A reference form: for speed use ``"csr"`` or
    ``"bcsr_t"``, which keep CSR of ``W.T`` on the left of the product.
    """

    def __rmatmul__(self, other: Any) -> jax.Array:
        return jnp.asarray(other) @ self.to_bcoo()


# ----------------------------------------------------------------------------- CSR of W.T


@jax.tree_util.register_pytree_node_class
class CsrKernel(_Kernel):
    """``W`` (in, out) stored as CSR of ``W.T``: ``ptr`` (out+1,), ``idx`` (nnz,), ``val`` (nnz,).

    ``format`` is ``"csr"`` (compiled CPU kernel where possible) or ``"bcsr_t"`` (always
    ``jax.experimental.sparse.BCSR`` on the left: ``(W_T @ x.T).T``).
    """

    def __init__(self, ptr: Any, idx: Any, val: Any, shape: tuple[int, int], fmt: str = "csr"):
        self.ptr, self.idx, self.val = ptr, idx, val
        self.shape = tuple(shape)
        self.format = fmt

    def tree_flatten(self) -> tuple[tuple, tuple]:
        return (self.ptr, self.idx, self.val), (self.shape, self.format)

    @classmethod
    def fromdense(cls, w: np.ndarray, fmt: str = "csr") -> CsrKernel:
        wt = np.ascontiguousarray(np.asarray(w).T)
        nz = wt != 0
        ptr = np.zeros(wt.shape[0] + 1, np.int32)
        np.cumsum(nz.sum(axis=1), out=ptr[1:])
        # bcsr_t hands the indices to jax.experimental.sparse, which wants int32
        small = wt.shape[1] <= np.iinfo(np.uint16).max + 1 and fmt == "csr"
        idx = np.nonzero(nz)[1].astype(np.uint16 if small else np.int32)
        return cls(jnp.asarray(ptr), jnp.asarray(idx), jnp.asarray(wt[nz]), w.shape, fmt)

    @property
    def dtype(self) -> Any:
        return self.val.dtype

    @property
    def nnz(self) -> int:
        return int(self.val.shape[0])

    nse = nnz

    def todense(self) -> jax.Array:
        n_in, n_out = self.shape
        rows = jnp.repeat(
            jnp.arange(n_out), jnp.diff(self.ptr), total_repeat_length=self.val.shape[0]
        )
        return jnp.zeros((n_out, n_in), self.dtype).at[rows, self.idx].set(self.val).T

    def _bcsr_left(self, x2: jax.Array) -> jax.Array:
        n_in, n_out = self.shape
        dt = jnp.result_type(x2.dtype, self.dtype)
        if self.nnz == 0:
            return jnp.zeros((x2.shape[0], n_out), dt)
        wt = jsparse.BCSR(
            (self.val.astype(dt), self.idx.astype(jnp.int32), self.ptr),
            shape=(n_out, n_in),
            indices_sorted=True,
        )
        return (wt @ x2.astype(dt).T).T

    def __rmatmul__(self, x: Any) -> jax.Array:
        x2, back = _as_2d(x, self.shape[0])
        if self.format == "csr" and _use_compiled(x2.dtype, self.dtype):
            n_out = self.shape[1]

            def compiled(x2: jax.Array, p: jax.Array, i: jax.Array, v: jax.Array) -> jax.Array:
                return _kernels_cpu.csr_matmul(x2, p, i, v, n_out)

            def pure(x2: jax.Array, p: jax.Array, i: jax.Array, v: jax.Array) -> jax.Array:
                return CsrKernel(p, i, v, self.shape, "bcsr_t")._bcsr_left(x2)

            y = _on_cpu_else((x2, self.ptr, self.idx, self.val), compiled, pure)
        else:
            y = self._bcsr_left(x2)
        return back(y)


# ----------------------------------------------------------------------------- dense W.T

# The compiled row-dot kernel runs up to this batch size.  Measured (2-core EPYC, jax 0.10,
# against XLA's dot, whole MLPs): batch 1 LeNet 67 -> 23 µs, compacted 4096-2048-2048-4096
# 3.6 -> 1.9 ms; batch 4 LeNet 51 -> 95 µs and batch 7 wide 13.0 -> 15.3 ms, so only batch 1.
_DENSE_T_MAX_BATCH = 1


def _dense_t_xla(x: jax.Array, wt: jax.Array) -> jax.Array:
    """``x @ wt.T`` with XLA's dot (``x`` of any rank, contracting its last axis)."""
    dt = jnp.result_type(x.dtype, wt.dtype)
    return jax.lax.dot_general(x.astype(dt), wt.astype(dt), (((x.ndim - 1,), (1,)), ((), ())))


@jax.custom_batching.custom_vmap
def _dense_t_kernel(x2: jax.Array, wt: jax.Array) -> jax.Array:
    return _on_cpu_else((x2, wt), _kernels_cpu.dense_rows_matmul, _dense_t_xla)


@_dense_t_kernel.def_vmap
def _dense_t_kernel_vmap(axis_size: int, in_batched: list, x2: jax.Array, wt: jax.Array):
    # vmapped, the batch-1 products form a larger batch: one XLA dot, not a loop of kernel calls
    x_batched, w_batched = in_batched
    if w_batched:
        y = jax.vmap(_dense_t_xla, in_axes=(0 if x_batched else None, 0))(x2, wt)
    else:
        if not x_batched:
            x2 = jnp.broadcast_to(x2, (axis_size, *x2.shape))
        y = _dense_t_xla(x2, wt)
    return y, True


@jax.custom_jvp
def _dense_t_b1(x2: jax.Array, wt: jax.Array) -> jax.Array:
    """Batch-1 ``x2 @ wt.T`` by the compiled row-dot kernel, differentiable and batchable."""
    return _dense_t_kernel(x2, wt)


@_dense_t_b1.defjvp
def _dense_t_b1_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    (x2, wt), (dx, dw) = primals, tangents
    return _dense_t_b1(x2, wt), _dense_t_xla(dx, wt) + _dense_t_xla(x2, dw)


@jax.tree_util.register_pytree_node_class
class DenseTKernel(_Kernel):
    """A dense ``W`` (in, out) stored transposed, ``wt`` of shape ``(out, in)``.

    A layout, not a sparse format: at batch 1 on CPU (fp32) ``x @ W`` runs the compiled
    row-dot kernel (one contiguous dot product per output, ``W`` streamed once front to back),
    which beats XLA's batch-1 dot on an ``(in, out)`` kernel.  Larger batches (where it measured
    slower than XLA's dot: 0.5-0.85x at batch 4-7), other dtypes and other platforms use XLA's
    dot with the transposed operand.  Unlike the sparse kernels it is differentiable (the
    derivative uses XLA's dot), and under ``jax.vmap`` the batch-1 calls become one XLA dot.
    ``"auto"`` picks it for layer kernels that stay dense at batch 1, and it is how compacted
    layers (``prunejax.compact``) run fastest at batch 1.
    """

    format = "dense_t"

    def __init__(self, wt: Any, shape: tuple[int, int], nnz: int):
        self.wt = wt
        self.shape = tuple(shape)
        self.nnz = int(nnz)

    def tree_flatten(self) -> tuple[tuple, tuple]:
        return (self.wt,), (self.shape, self.nnz)

    @classmethod
    def fromdense(cls, w: np.ndarray) -> DenseTKernel:
        w = np.asarray(w)
        return cls(jnp.asarray(np.ascontiguousarray(w.T)), w.shape, int(np.count_nonzero(w)))

    @property
    def dtype(self) -> Any:
        return self.wt.dtype

    @property
    def nse(self) -> int:
        return int(math.prod(self.wt.shape))

    def todense(self) -> jax.Array:
        return self.wt.T

    def __rmatmul__(self, x: Any) -> jax.Array:
        x2, back = _as_2d(x, self.shape[0])
        if x2.shape[0] <= _DENSE_T_MAX_BATCH and _use_compiled(x2.dtype, self.dtype):
            y = _dense_t_b1(x2, self.wt)
        else:
            y = _dense_t_xla(x2, self.wt)
        return back(y)


# ----------------------------------------------------------------------------- ELL of W.T


@jax.tree_util.register_pytree_node_class
class EllKernel(_Kernel):
    """Padded-row ELL of ``W.T``: ``idx``/``val`` of shape ``(out, K)``, K = max row nonzeros.

    ``x @ W`` is ``sum(x[..., idx] * val, -1)``: one gather of ``x`` per stored entry and a dense
    multiply-reduce, no scatter.  Padding entries point at input 0 with value 0.
    """

    format = "ell"

    def __init__(self, idx: Any, val: Any, shape: tuple[int, int], nnz: int):
        self.idx, self.val = idx, val
        self.shape = tuple(shape)
        self.nnz = int(nnz)

    def tree_flatten(self) -> tuple[tuple, tuple]:
        return (self.idx, self.val), (self.shape, self.nnz)

    @classmethod
    def fromdense(cls, w: np.ndarray) -> EllKernel:
        wt = np.asarray(w).T
        nz = wt != 0
        counts = nz.sum(axis=1)
        k = int(counts.max()) if counts.size else 0
        # stable sort puts each row's nonzeros first, in column order
        order = np.argsort(~nz, axis=1, kind="stable")[:, :k]
        val = np.take_along_axis(wt, order, axis=1)
        idx = np.where(val != 0, order, 0).astype(np.int32)
        return cls(jnp.asarray(idx), jnp.asarray(val), w.shape, int(nz.sum()))

    @property
    def dtype(self) -> Any:
        return self.val.dtype

    @property
    def nse(self) -> int:
        return int(math.prod(self.val.shape))

    def todense(self) -> jax.Array:
        n_in, n_out = self.shape
        rows = jnp.broadcast_to(jnp.arange(n_out)[:, None], self.idx.shape)
        return jnp.zeros((n_out, n_in), self.dtype).at[rows, self.idx].add(self.val).T

    def __rmatmul__(self, x: Any) -> jax.Array:
        x2, back = _as_2d(x, self.shape[0])
        return back(_gather_rows(x2, self.idx, self.val))


def _gather_rows(x2: jax.Array, idx: jax.Array, val: jax.Array) -> jax.Array:
    """``y[b, j] = sum_k x2[b, idx[j, k]] * val[j, k]``, one batch row at a time past 8 rows."""
    dt = jnp.result_type(x2.dtype, val.dtype)
    x2 = x2.astype(dt)
    val = val.astype(dt)

    def one(xr: jax.Array) -> jax.Array:
        return jnp.sum(xr[idx] * val, axis=-1)

    if x2.shape[0] <= 8:
        return jax.vmap(one)(x2)
    return jax.lax.map(one, x2, batch_size=8)


# ----------------------------------------------------------------------------- N:M


@jax.tree_util.register_pytree_node_class
class NMKernel(_Kernel):
    """N:M sparsity along the input axis: of every ``m`` consecutive inputs of an output unit at
    most ``n`` are nonzero.  ``val`` (out, in/m*n) holds them, ``off`` (uint8) their offsets
    inside the group; the gather index is ``group * m + off`` (Mishra et al. 2021, "Accelerating
    Sparse Deep Neural Networks")."""

    format = "nm"

    def __init__(self, off: Any, val: Any, shape: tuple[int, int], n: int, m: int, nnz: int):
        self.off, self.val = off, val
        self.shape = tuple(shape)
        self.n, self.m, self.nnz = int(n), int(m), int(nnz)

    def tree_flatten(self) -> tuple[tuple, tuple]:
        return (self.off, self.val), (self.shape, self.n, self.m, self.nnz)

    @classmethod
    def fromdense(cls, w: np.ndarray, n: int, m: int, path: str) -> NMKernel:
        n_in, n_out = w.shape
        if n_in % m:
            raise ValueError(
                f"leaf {path!r} of shape {w.shape}: input dimension {n_in} is not divisible by "
                f"m={m} for the 'nm' format"
            )
        g = np.asarray(w).T.reshape(n_out, n_in // m, m)
        nz = g != 0
        worst = int(nz.sum(axis=-1).max()) if nz.size else 0
        if worst > n:
            raise ValueError(
                f"leaf {path!r} is not {n}:{m} sparse along its input axis: a group of {m} "
                f"inputs has {worst} nonzeros (use prunejax.masks.nm_masks(params, {n}, {m}))"
            )
        order = np.sort(np.argsort(~nz, axis=-1, kind="stable")[..., :n], axis=-1)
        val = np.take_along_axis(g, order, axis=-1)
        off = np.where(val != 0, order, 0).astype(np.uint8)
        return cls(
            jnp.asarray(off.reshape(n_out, -1)),
            jnp.asarray(val.reshape(n_out, -1)),
            w.shape,
            n,
            m,
            int(nz.sum()),
        )

    @property
    def dtype(self) -> Any:
        return self.val.dtype

    @property
    def nse(self) -> int:
        return int(math.prod(self.val.shape))

    def _index(self) -> jax.Array:
        k = self.off.shape[1]
        base = (jnp.arange(k, dtype=jnp.int32) // self.n) * self.m
        return base[None, :] + self.off.astype(jnp.int32)

    def todense(self) -> jax.Array:
        n_in, n_out = self.shape
        rows = jnp.broadcast_to(jnp.arange(n_out)[:, None], self.off.shape)
        return jnp.zeros((n_out, n_in), self.dtype).at[rows, self._index()].add(self.val).T

    def __rmatmul__(self, x: Any) -> jax.Array:
        x2, back = _as_2d(x, self.shape[0])
        return back(_gather_rows(x2, self._index(), self.val))


# ----------------------------------------------------------------------------- blocks


@jax.tree_util.register_pytree_node_class
class BlockKernel(_Kernel):
    """Block-sparse ``W`` (in, out): the nonzero ``(bh, bw)`` blocks, grouped by block column.

    ``blocks`` (nb, bh, bw), ``rowb``/``colb`` (nb,) block row/column, ``colptr`` (out/bw + 1,)
    so that ``colptr[j]:colptr[j+1]`` are the blocks of block column ``j`` (Gray et al. 2017,
    "GPU Kernels for Block-Sparse Weights").
    """

    format = "block"

    def __init__(self, colptr: Any, rowb: Any, colb: Any, blocks: Any, shape: tuple[int, int]):
        self.colptr, self.rowb, self.colb, self.blocks = colptr, rowb, colb, blocks
        self.shape = tuple(shape)

    def tree_flatten(self) -> tuple[tuple, tuple]:
        return (self.colptr, self.rowb, self.colb, self.blocks), (self.shape,)

    @classmethod
    def fromdense(cls, w: np.ndarray, block: tuple[int, int], path: str) -> BlockKernel:
        bh, bw = block
        r, c = w.shape
        if r % bh or c % bw:
            raise ValueError(
                f"leaf {path!r} of shape {w.shape} is not divisible into {block} blocks "
                "for the 'block' format"
            )
        g = np.asarray(w).reshape(r // bh, bh, c // bw, bw).transpose(2, 0, 1, 3)  # (cb, rb, ..)
        keep = (g != 0).any(axis=(2, 3))
        colb, rowb = np.nonzero(keep)  # column-major order: grouped by block column
        colptr = np.zeros(c // bw + 1, np.int32)
        np.cumsum(keep.sum(axis=1), out=colptr[1:])
        return cls(
            jnp.asarray(colptr),
            jnp.asarray(rowb.astype(np.int32)),
            jnp.asarray(colb.astype(np.int32)),
            jnp.asarray(np.ascontiguousarray(g[colb, rowb])),
            w.shape,
        )

    @property
    def block(self) -> tuple[int, int]:
        return tuple(self.blocks.shape[1:])

    @property
    def dtype(self) -> Any:
        return self.blocks.dtype

    @property
    def nse(self) -> int:
        return int(math.prod(self.blocks.shape))

    @property
    def nnz(self) -> int:
        """Stored block entries (zeros inside a kept block count: they are multiplied)."""
        return self.nse

    def todense(self) -> jax.Array:
        r, c = self.shape
        bh, bw = self.block
        g = jnp.zeros((r // bh, c // bw, bh, bw), self.dtype)
        g = g.at[self.rowb, self.colb].set(self.blocks)
        return g.transpose(0, 2, 1, 3).reshape(r, c)

    def _pure(self, x2: jax.Array) -> jax.Array:
        r, c = self.shape
        bh, bw = self.block
        dt = jnp.result_type(x2.dtype, self.dtype)
        xb = x2.astype(dt).reshape(x2.shape[0], r // bh, bh)
        part = jnp.einsum("bnk,nkw->nbw", xb[:, self.rowb], self.blocks.astype(dt))
        y = jax.ops.segment_sum(part, self.colb, num_segments=c // bw, indices_are_sorted=True)
        return y.transpose(1, 0, 2).reshape(x2.shape[0], c)

    def __rmatmul__(self, x: Any) -> jax.Array:
        x2, back = _as_2d(x, self.shape[0])
        if _use_compiled(x2.dtype, self.dtype):
            n_out = self.shape[1]

            def compiled(x2, colptr, rowb, colb, blocks):  # noqa: ANN001, ANN202
                return _kernels_cpu.block_matmul(x2, colptr, rowb, blocks, n_out)

            def pure(x2, colptr, rowb, colb, blocks):  # noqa: ANN001, ANN202
                return BlockKernel(colptr, rowb, colb, blocks, self.shape)._pure(x2)

            args = (x2, self.colptr, self.rowb, self.colb, self.blocks)
            y = _on_cpu_else(args, compiled, pure)
        else:
            y = self._pure(x2)
        return back(y)


# ----------------------------------------------------------------------------- public API


def format_of(leaf: Any) -> str:
    """The format of one leaf: ``"dense"`` for arrays, else the kernel object's format name."""
    if isinstance(leaf, jsparse.BCOO):
        return "bcoo"
    if isinstance(leaf, jsparse.BCSR):
        return "bcsr"
    if hasattr(leaf, "__prunejax_kernel__"):
        return str(leaf.format)
    return "dense"


def formats_of(params: PyTree) -> dict[str, str]:
    """``{path: format}`` for every kernel of ``params`` (2-D arrays and kernel objects)."""
    paths, leaves, _ = flatten(params)
    return {
        p: format_of(leaf)
        for p, leaf in zip(paths, leaves, strict=True)
        if is_matrix_object(leaf) or np.ndim(leaf) == 2
    }


def densify(params: PyTree) -> PyTree:
    """Turn every sparse kernel object of ``params`` back into a dense ``(in, out)`` array.

    Args:
      params: a pytree possibly holding ``jax.experimental.sparse`` matrices or prunejax kernels.

    Returns:
      The same pytree with dense JAX arrays in their place (other leaves untouched).
    """
    paths, leaves, treedef = flatten(params)
    out = [leaf.todense() if is_matrix_object(leaf) else leaf for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_nm(nm: Any) -> tuple[int, int]:
    if (
        not isinstance(nm, tuple | list)
        or len(nm) != 2
        or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in nm)
        or not 1 <= nm[0] <= nm[1] <= 255
    ):
        raise ValueError(f"nm must be a pair of ints (n, m) with 1 <= n <= m <= 255, got {nm!r}")
    return int(nm[0]), int(nm[1])


def _to_format(
    w: np.ndarray, fmt: str, path: str, block: tuple[int, int], nm: tuple[int, int]
) -> Any:
    if fmt == "dense":
        return jnp.asarray(w)
    if fmt == "dense_t":
        return DenseTKernel.fromdense(w)
    if fmt == "bcoo":
        return jsparse.BCOO.fromdense(jnp.asarray(w), index_dtype=jnp.int32)
    if fmt == "bcsr":
        m = jsparse.BCSR.fromdense(jnp.asarray(w), index_dtype=jnp.int32)
        return BCSRKernel((m.data, m.indices, m.indptr), shape=m.shape, indices_sorted=True)
    if fmt in ("csr", "bcsr_t"):
        return CsrKernel.fromdense(w, fmt)
    if fmt == "ell":
        return EllKernel.fromdense(w)
    if fmt == "block":
        return BlockKernel.fromdense(w, block, path)
    if fmt == "nm":
        return NMKernel.fromdense(w, *nm, path)
    raise AssertionError(fmt)


def sparsify(
    params: PyTree,
    format: str = "bcoo",  # noqa: A002 - the natural name of the argument
    *,
    batch_size: int | None = None,
    where: Where | None = None,
    block: tuple[int, int] = (16, 16),
    nm: tuple[int, int] = (2, 4),
) -> PyTree:
    """Turn each selected kernel into a sparse kernel object that supports ``x @ W`` in jit.

    Han et al. (2015), "Learning both Weights and Connections for Efficient Neural Networks",
    store pruned layers in CSR; this function does the same with formats measured to run fast
    on XLA (see the module docstring and ``FORMATS``).

    Args:
      params: any pytree of arrays; kernels are ``(in, out)`` and used as ``x @ W``.  Leaves that
        already are sparse kernel objects are converted from their dense form.
      format: one of ``FORMATS``.
      batch_size: the inference batch size; required by ``"auto"``, ignored otherwise.
      where: ``(path, leaf) -> bool`` selecting the leaves to convert (default: 2-D leaves and
        sparse kernel objects).  Selected leaves must be 2-D.
      block: ``(bh, bw)`` block shape for ``"block"`` (and the block candidate of ``"auto"``).
      nm: ``(n, m)`` for ``"nm"``: at most ``n`` nonzeros in every ``m`` consecutive inputs.

    Returns:
      ``params`` with each selected kernel replaced by its sparse form.  ``"dense"`` gives a
      plain ``jax.Array``; so does ``"auto"`` where dense wins, except at batch 1 with the
      compiled CPU kernels (fp32), where a layer kernel (a ``kernel``/``weight``/``w`` leaf, or
      a 2-D leaf followed by its bias) that stays dense becomes ``"dense_t"``.  Unselected
      leaves are untouched.

    Raises:
      ValueError: unknown format; a selected leaf that is not 2-D, holds NaN/inf, or does not fit
        the format (block divisibility, N:M pattern); ``"auto"`` without a positive batch_size.
      TypeError: a traced leaf (sparsify needs concrete values; call it outside ``jax.jit``).
    """
    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"unknown sparse format {format!r}; valid formats: {', '.join(FORMATS)}")
    block = check_block(block)
    nm = _check_nm(nm)
    if format == "auto":
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int | np.integer)
            or batch_size < 1
        ):
            raise ValueError(f'format="auto" needs batch_size=, a positive int, got {batch_size!r}')
    paths, leaves, treedef = flatten(params)

    def default(path: str, leaf: Any) -> bool:
        return is_matrix_object(leaf) or np.ndim(leaf) >= 2

    selected = select(paths, leaves, where if where is not None else default)
    layer_kernels = _layer_kernels(params, paths) if format == "auto" else set()
    out = []
    for p, leaf, s in zip(paths, leaves, selected, strict=True):
        if not s:
            out.append(leaf)
            continue
        w = _concrete_kernel(p, leaf)
        if format == "auto":
            b = int(batch_size)  # type: ignore[arg-type]
            fmt = _auto_choice(w, b, block, _dense_fallback(b) if p in layer_kernels else "dense")
        else:
            fmt = format
        out.append(_to_format(w, fmt, p, block, nm))
    return jax.tree_util.tree_unflatten(treedef, out)


def _layer_kernels(params: PyTree, paths: list[str]) -> set[str]:
    """Paths of the 2-D leaves that are dense-layer kernels: named ``kernel``/``weight``/``w``,
    or followed by their bias (Keras lists).  Other 2-D leaves (embedding tables, ...) that
    "auto" keeps dense stay plain arrays."""
    return {
        paths[d.kernel]
        for d in dense_layers(params)
        if d.bias is not None or last_key(paths[d.kernel]) in KERNEL_NAMES
    }


def _concrete_kernel(path: str, leaf: Any) -> np.ndarray:
    if is_matrix_object(leaf):
        leaf = leaf.todense()
    if is_traced(leaf):
        raise TypeError(
            f"leaf {path!r} is traced: sparsify needs concrete values (the sparsity pattern "
            "decides the shapes), so call it outside jax.jit"
        )
    w = np.asarray(leaf)
    if w.ndim != 2:
        raise ValueError(
            f"leaf {path!r} has shape {w.shape}: only 2-D (in, out) kernels can be sparsified; "
            "exclude it with where="
        )
    if w.dtype.kind not in "fc" and w.dtype != jnp.bfloat16:
        raise TypeError(f"leaf {path!r} has dtype {w.dtype}; sparsify expects a float kernel")
    finite = np.isfinite(w.astype(np.float32) if w.dtype == jnp.bfloat16 else w)
    if not finite.all():
        raise ValueError(
            f"leaf {path!r} has {int(w.size - finite.sum())} non-finite value(s) (NaN or inf); "
            "a sparse kernel would silently change them"
        )
    return w


# ----------------------------------------------------------------------------- auto: cost model

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
      compiled: whether the compiled kernels are available (default: ask ``_kernels_cpu``).

    Returns:
      ``{format: microseconds}`` for ``"dense"`` and each candidate sparse format.
    """
    c = _CPU
    n_in, n_out = shape
    b = int(batch_size)
    size = n_in * n_out
    if compiled is None:
        compiled = _kernels_cpu.available()
    per_weight = c["dense_weight_ns"] if 4 * size > _CACHED_BYTES else c["dense_weight_cached_ns"]
    ns = 1e-3
    t = {"dense": c["dense_call_us"] + size * per_weight * ns + b * size * c["dense_mac_ns"] * ns}
    if compiled:
        if b < _kernels_cpu.CSR_TILED_FROM:
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


def _dense_fallback(batch_size: int) -> str:
    # At batch 1 "auto" runs the layer kernels it keeps dense as "dense_t" (compiled row-dot
    # kernel) rather than XLA's dot.  Measured on LeNet-300-100 at 90% (2-core EPYC, jax 0.10):
    # all XLA dense ~69 µs, csr then XLA dense ~31 µs, csr then dense_t ~22 µs; compacted
    # 4096-2048-2048-4096 unpruned: XLA 3.6 ms, dense_t 1.9 ms.
    return "dense_t" if batch_size <= _DENSE_T_MAX_BATCH and _kernels_cpu.available() else "dense"


def _fixed_us(fmt: str) -> float:
    if fmt == "bcsr_t":
        return _CPU["bcsr_t_call_us"]
    if fmt in ("csr", "block") and _kernels_cpu.available():
        return _CPU["kernel_call_us"]
    return _CPU["gather_call_us"]
