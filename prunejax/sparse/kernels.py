"""The kernel objects of ``prunejax.sparse``: one registered pytree class per stored form of ``W``.

Each class stores a kernel ``W`` of shape ``(in, out)`` in its own layout and implements
``x @ W`` (``__rmatmul__``) for ``x`` of shape ``(..., in)``, inside and outside ``jax.jit``:
with the compiled CPU kernels of :mod:`prunejax.sparse.ffi` where they apply (fp32, lowering
for CPU, kernels available) and with pure JAX otherwise.  Each class but ``BCSRKernel`` (a
``jax.experimental.sparse.BCSR`` that adds ``x @ W``) has ``shape``, ``dtype``, ``nnz``,
``nse``, ``nbytes``, ``format``, ``todense()`` and a ``fromdense`` constructor; its arrays are
its pytree children, its metadata (shape, counts) static.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from prunejax.sparse import ffi

__all__ = [
    "DENSE_T_MAX_BATCH",
    "block_nse",
    "BCSRKernel",
    "BlockKernel",
    "CsrKernel",
    "DenseTKernel",
    "EllKernel",
    "NMKernel",
]


# ----------------------------------------------------------------------------- helpers


def block_nse(w: np.ndarray, block: tuple[int, int]) -> int | None:
    """Entries a block-sparse form of ``w`` stores: its nonzero ``block``-shaped blocks, whole.

    Args:
      w: a dense ``(in, out)`` kernel.
      block: ``(bh, bw)``.

    Returns:
      The stored entries, or ``None`` when ``w``'s shape does not divide into blocks.
    """
    bh, bw = block
    r, c = w.shape
    if r % bh or c % bw:
        return None
    keep = (w.reshape(r // bh, bh, c // bw, bw) != 0).any(axis=(1, 3))
    return int(keep.sum()) * bh * bw


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
    return all(jnp.dtype(d) == jnp.float32 for d in dtypes) and ffi.available()


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
                return ffi.csr_matmul(x2, p, i, v, n_out)

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
DENSE_T_MAX_BATCH = 1


def _dense_t_xla(x: jax.Array, wt: jax.Array) -> jax.Array:
    """``x @ wt.T`` with XLA's dot (``x`` of any rank, contracting its last axis)."""
    dt = jnp.result_type(x.dtype, wt.dtype)
    return jax.lax.dot_general(x.astype(dt), wt.astype(dt), (((x.ndim - 1,), (1,)), ((), ())))


@jax.custom_batching.custom_vmap
def _dense_t_kernel(x2: jax.Array, wt: jax.Array) -> jax.Array:
    return _on_cpu_else((x2, wt), ffi.dense_rows_matmul, _dense_t_xla)


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
    dot with the transposed operand.  Unlike the compiled sparse kernels (``csr``, ``block``) it
    is differentiable (a custom JVP through XLA's dot), and under ``jax.vmap`` the batch-1 calls
    become one XLA dot (a custom vmap rule).
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
        if x2.shape[0] <= DENSE_T_MAX_BATCH and _use_compiled(x2.dtype, self.dtype):
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
                return ffi.block_matmul(x2, colptr, rowb, blocks, n_out)

            def pure(x2, colptr, rowb, colb, blocks):  # noqa: ANN001, ANN202
                return BlockKernel(colptr, rowb, colb, blocks, self.shape)._pure(x2)

            args = (x2, self.colptr, self.rowb, self.colb, self.blocks)
            y = _on_cpu_else(args, compiled, pure)
        else:
            y = self._pure(x2)
        return back(y)
