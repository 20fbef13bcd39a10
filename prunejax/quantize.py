"""Weight sharing: k-means and uniform quantization of (pruned) weights, and centroid fine-tuning.

Deep Compression (Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with
Pruning, Trained Quantization and Huffman Coding", ICLR 2016, section 3) replaces the kept weights
of each layer by ``2**b`` shared values (a *codebook* of centroids, found by 1-D k-means with
linear initialisation between the smallest and largest kept weight) and stores one ``b``-bit
*code* per kept weight.  The centroids are then fine-tuned: the gradient of every weight that
shares a centroid is summed into it, while the codes and the pruning masks stay fixed.

A quantized leaf is a ``Quantized`` pytree node: ``codes`` (``uint8``/``uint16``, the weight's
shape), ``codebook`` (``float32``, ``(K,)``), ``mask`` (``bool``, the weight's shape: True = kept)
and the weight's ``dtype``.  Pruned entries (``mask`` False) dequantize to an exact ``0``; they
are not a codebook entry and their codes are ``0``.  ``kmeans_quantize`` and ``uniform_quantize``
(plain symmetric/affine ``int8``/``int4`` grids, for comparison; the grid is the codebook) turn
the selected leaves of a params tree into ``Quantized`` nodes and leave the others alone;
``dequantize`` gives the plain params back.  ``prunejax.fileformat.save`` stores ``Quantized``
leaves as codes and codebooks (entropy-coded), and ``load`` gives back exactly these values.

Centroid fine-tuning is ordinary optax on the tree ``codebooks(q)`` (each ``Quantized`` node
replaced by its codebook; other leaves, e.g. biases, stay trainable as they are)::

    import jax, jax.numpy as jnp, numpy as np, optax
    import prunejax as pj

    rng = np.random.default_rng(0)
    params = {"Dense_0": {"kernel": rng.normal(size=(8, 4)).astype(np.float32),
                          "bias": np.zeros(4, np.float32)}}
    masks = pj.magnitude_masks(params, sparsity=0.5)
    q = pj.kmeans_quantize(params, bits=2, masks=masks)      # Quantized kernel, bias unchanged
    x, y = rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 4))

    def loss(theta):                                        # theta = codebooks + free leaves
        p = pj.dequantize(pj.with_codebooks(q, theta))      # differentiable in the codebooks
        return jnp.mean((pj.mlp_apply(p, x) - y) ** 2)

    theta = pj.codebooks(q)
    tx = optax.adam(1e-2)
    state = tx.init(theta)
    for _ in range(10):
        grads = jax.grad(loss)(theta)                       # summed over each centroid's weights
        updates, state = tx.update(grads, state, theta)
        theta = optax.apply_updates(theta, updates)
    q = pj.with_codebooks(q, theta)                         # codes and masks are unchanged

``codebook_grads(q, dense_grads)`` does the same reduction explicitly (gradients with respect to
the dequantized weights -> gradients with respect to ``codebooks(q)``), for training loops that
differentiate the dense params.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunejax._util import (
    PyTree,
    Where,
    check_finite,
    check_int,
    check_same_structure,
    flatten,
    is_jax,
    is_traced,
    per_leaf_values,
    select,
)

__all__ = [
    "MAX_CODEBOOK",
    "Quantized",
    "codebook_grads",
    "codebooks",
    "dequantize",
    "is_quantized",
    "kmeans_codebook",
    "kmeans_quantize",
    "nearest_codes",
    "uniform_quantize",
    "with_codebooks",
]

#: The largest codebook a ``Quantized`` leaf may have (codes are at most ``uint16``).
MAX_CODEBOOK = 2**16


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A weight stored as codes into a shared codebook (Han et al. 2016, section 3).

    Attributes:
      codes: integer codes (``uint8`` for up to 256 centroids, else ``uint16``), the weight's
        shape; ``0`` at pruned entries.
      codebook: the shared values (``float32``, shape ``(K,)``).
      mask: ``bool``, the weight's shape: True where the weight is kept.  Pruned entries
        dequantize to an exact ``0`` whatever the codebook holds.
      dtype: the dtype name of the weight (``dequantize`` casts to it).
      kind: how the codebook was made: ``"kmeans"`` or ``"uniform"`` (informative only).

    A registered pytree node: ``codes``, ``codebook`` and ``mask`` are its children, ``dtype`` and
    ``kind`` static.  NumPy in gives NumPy out, JAX in gives JAX out.
    """

    codes: Any
    codebook: Any
    mask: Any
    dtype: str = "float32"
    kind: str = "kmeans"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.codes))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def bits(self) -> int:
        """Bits of a fixed-width code: ``ceil(log2(K))`` (0 for a one-entry codebook)."""
        return (int(np.shape(self.codebook)[0]) - 1).bit_length()

    def dequantize(self) -> Any:
        """The weight: ``codebook[codes]`` where kept, exact ``0`` elsewhere, in ``dtype``."""
        return dequantize_leaf(self)


jax.tree_util.register_dataclass(
    Quantized, data_fields=["codes", "codebook", "mask"], meta_fields=["dtype", "kind"]
)


def is_quantized(x: Any) -> bool:
    """True for a ``Quantized`` leaf (use as ``is_leaf=`` in ``jax.tree_util`` maps)."""
    return isinstance(x, Quantized)


def _code_dtype(k: int) -> np.dtype:
    return np.dtype(np.uint8 if k <= 256 else np.uint16)


def _dequantize_numpy(q: Quantized, dtype: np.dtype, chunk: int = 2**16) -> np.ndarray:
    """``dequantize_leaf`` of NumPy parts, in chunks: besides the result, memory stays at one
    chunk's indices (NumPy widens index arrays to ``intp``)."""
    codes, mask = np.asarray(q.codes), np.asarray(q.mask)
    with np.errstate(over="ignore"):
        cb = np.asarray(q.codebook).astype(dtype)
    out = np.empty(codes.shape, dtype)
    flat_c, flat_m, flat_o = codes.reshape(-1), mask.reshape(-1), out.reshape(-1)
    zero = np.zeros((), dtype)
    for s in range(0, flat_o.size, chunk):
        e = s + chunk
        flat_o[s:e] = np.where(flat_m[s:e], cb[flat_c[s:e]], zero)
    return out


def dequantize_leaf(q: Quantized) -> Any:
    """One ``Quantized`` leaf as a plain array (NumPy if its parts are NumPy, else JAX).

    Args:
      q: the leaf.

    Returns:
      ``where(mask, codebook[codes], 0)`` cast to ``q.dtype``; differentiable with respect to
      ``q.codebook`` when that is a JAX array or tracer.
    """
    dtype = jnp.dtype(q.dtype)
    if not any(is_jax(a) for a in (q.codes, q.codebook, q.mask)):
        return _dequantize_numpy(q, np.dtype(dtype))
    values = jnp.take(jnp.asarray(q.codebook), jnp.asarray(q.codes).astype(jnp.int32), mode="clip")
    return jnp.where(jnp.asarray(q.mask), values, jnp.zeros((), values.dtype)).astype(dtype)


def dequantize(tree: PyTree) -> PyTree:
    """Replace every ``Quantized`` leaf of ``tree`` by its plain weight (other leaves unchanged).

    Args:
      tree: a params tree holding ``Quantized`` leaves (or none).

    Returns:
      The params: kept entries hold their centroid, pruned entries an exact ``0``, each leaf in
      its original dtype.  Differentiable with respect to the codebooks (codes and masks fixed):
      the gradient of a centroid is the sum of the gradients of the weights that share it.
    """
    return jax.tree_util.tree_map(
        lambda x: dequantize_leaf(x) if is_quantized(x) else x, tree, is_leaf=is_quantized
    )


def codebooks(tree: PyTree) -> PyTree:
    """The trainable part of a quantized tree: each ``Quantized`` node replaced by its codebook.

    Args:
      tree: a params tree holding ``Quantized`` leaves.

    Returns:
      A tree of the same structure (``Quantized`` nodes as ``(K,)`` arrays; other leaves, such as
      biases, as they are) to hand to optax; ``with_codebooks`` puts it back.
    """
    return jax.tree_util.tree_map(
        lambda x: x.codebook if is_quantized(x) else x, tree, is_leaf=is_quantized
    )


def with_codebooks(tree: PyTree, new: PyTree) -> PyTree:
    """``tree`` with its codebooks (and other leaves) taken from ``new`` (codes and masks kept).

    Args:
      tree: a params tree holding ``Quantized`` leaves.
      new: a tree like ``codebooks(tree)`` (e.g. after an optax update).

    Returns:
      The quantized tree with the new codebooks and free leaves.

    Raises:
      ValueError: the trees do not match or a codebook's shape changed.
    """

    def put(q: Any, c: Any) -> Any:
        if not is_quantized(q):
            return c
        if np.shape(c) != np.shape(q.codebook):
            raise ValueError(
                f"codebook of shape {np.shape(c)} for a Quantized leaf whose codebook has shape "
                f"{np.shape(q.codebook)}"
            )
        return dataclasses.replace(q, codebook=c)

    return jax.tree_util.tree_map(put, tree, new, is_leaf=is_quantized)


def codebook_grads(tree: PyTree, grads: PyTree) -> PyTree:
    """Map gradients with respect to the dequantized weights to gradients of ``codebooks(tree)``.

    Han et al. 2016, section 3.1: the gradient of a centroid is the sum of the gradients of the
    kept weights that share it (pruned entries contribute nothing).

    Args:
      tree: a params tree holding ``Quantized`` leaves.
      grads: gradients of the loss with respect to ``dequantize(tree)`` (same structure).

    Returns:
      A tree like ``codebooks(tree)``: ``float32`` ``(K,)`` gradients for quantized leaves, the
      given gradients for the others.
    """

    def reduce(q: Any, g: Any) -> Any:
        if not is_quantized(q):
            return g
        k = int(np.shape(q.codebook)[0])
        kept = jnp.where(jnp.asarray(q.mask), jnp.asarray(g, jnp.float32), 0.0)
        return jax.ops.segment_sum(
            kept.reshape(-1), jnp.asarray(q.codes).reshape(-1).astype(jnp.int32), num_segments=k
        )

    return jax.tree_util.tree_map(reduce, tree, grads, is_leaf=is_quantized)


# ----------------------------------------------------------------------------- k-means


def nearest_codes(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """The index of the nearest codebook entry of every value (ties to the smaller centroid).

    Args:
      values: the weights (any shape, real).
      codebook: the centroids (1-D, non-empty, any order: an unsorted codebook is searched in
        sorted order and the codes name its own entries).

    Returns:
      Codes of ``values``' shape, ``uint8`` or ``uint16`` by the codebook's size.

    Raises:
      ValueError: an empty or not 1-D codebook.
    """
    cb = np.asarray(codebook, np.float64)
    if cb.ndim != 1 or cb.size == 0:
        raise ValueError(f"codebook must be a non-empty 1-D array, got shape {cb.shape}")
    order = np.argsort(cb, kind="stable")
    sorted_cb = cb[order]
    mids = (sorted_cb[:-1] + sorted_cb[1:]) / 2
    codes = order[np.searchsorted(mids, np.asarray(values, np.float64), side="left")]
    return codes.astype(_code_dtype(cb.size))


def kmeans_codebook(values: np.ndarray, k: int, *, max_iter: int = 300) -> np.ndarray:
    """1-D k-means centroids of ``values`` with linear initialisation (Han et al. 2016, 3.2).

    The centroids start evenly spaced between ``min(values)`` and ``max(values)`` (the paper's
    linear initialisation, which keeps centroids for the rare large weights) and follow Lloyd's
    iterations, computed exactly on the sorted values with prefix sums, until no assignment
    changes (or ``max_iter`` rounds).  An empty cluster keeps its centroid.

    Args:
      values: the kept weights (1-D; may be empty).
      k: the number of centroids (>= 1).
      max_iter: the most Lloyd iterations.

    Returns:
      ``k`` sorted ``float32`` centroids (all ``0`` when ``values`` is empty).

    Raises:
      TypeError, ValueError: ``k`` or ``max_iter`` not an int of at least 1.
    """
    k = check_int(k, name="k", minimum=1)
    max_iter = check_int(max_iter, name="max_iter", minimum=1)
    x = np.sort(np.asarray(values, np.float64).reshape(-1))
    if x.size == 0:
        return np.zeros(k, np.float32)
    c = np.linspace(x[0], x[-1], k)
    csum = np.concatenate([[0.0], np.cumsum(x)])
    for _ in range(max_iter):
        cut = np.concatenate([[0], np.searchsorted(x, (c[:-1] + c[1:]) / 2, "left"), [x.size]])
        count = np.diff(cut)
        new = np.where(count > 0, (csum[cut[1:]] - csum[cut[:-1]]) / np.maximum(count, 1), c)
        if np.array_equal(new, c):
            break
        c = new
    return np.sort(c.astype(np.float32))


def _selected_leaves(
    params: PyTree, bits: Any, masks: PyTree | None, where: Where | None, minimum: int
) -> tuple[list[str], list[Any], list[Any], list[int | None], Any]:
    """Paths, leaves, masks (or None), bits per leaf (None: left alone) and the treedef."""
    if any(is_quantized(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_quantized)):
        raise TypeError("params already hold Quantized leaves: dequantize them first")
    if masks is not None:
        paths, leaves, mleaves, treedef = check_same_structure(params, masks)
    else:
        paths, leaves, treedef = flatten(params)
        mleaves = [None] * len(leaves)
    for p, leaf in zip(paths, leaves, strict=True):
        if is_traced(leaf):
            raise TypeError(f"cannot quantize leaf {p!r}: it is traced (quantize outside jit)")

    def check(b: Any, p: str) -> int:
        b = check_int(b, name=f"bits for {p!r}", minimum=minimum)
        if b > 16:
            raise ValueError(f"bits for {p!r} must be at most 16, got {b}")
        return b

    per_leaf = per_leaf_values(bits, paths, select(paths, leaves, where), name="bits", check=check)
    for p, leaf, b in zip(paths, leaves, per_leaf, strict=True):
        if b is not None and np.asarray(leaf).dtype.kind != "f" and str(leaf.dtype) != "bfloat16":
            raise TypeError(f"cannot quantize leaf {p!r} of dtype {leaf.dtype}: not a float")
        if b is not None:
            check_finite(p, leaf)
    return paths, leaves, mleaves, per_leaf, treedef


def _make(leaf: Any, mask: np.ndarray, codebook: np.ndarray, kind: str) -> Quantized:
    """A ``Quantized`` leaf of ``leaf`` (nearest codes; NumPy or JAX like ``leaf``)."""
    w = np.asarray(leaf)
    codes = np.where(mask, nearest_codes(w.astype(np.float64), codebook), 0)
    codes = codes.astype(_code_dtype(codebook.size))
    conv = jnp.asarray if is_jax(leaf) else np.asarray
    return Quantized(
        codes=conv(codes),
        codebook=conv(codebook.astype(np.float32)),
        mask=conv(mask.astype(bool)),
        dtype=str(jnp.dtype(w.dtype)),
        kind=kind,
    )


def _kept(leaf: Any, mask: Any) -> np.ndarray:
    w = np.asarray(leaf)
    return np.asarray(mask, bool) if mask is not None else w != 0


def kmeans_quantize(
    params: PyTree,
    bits: int | Any,
    *,
    masks: PyTree | None = None,
    where: Where | None = None,
    max_iter: int = 300,
) -> PyTree:
    """Weight sharing by per-layer k-means (Han, Mao & Dally 2016, "Deep Compression", 3).

    Args:
      params: a params pytree of float arrays.
      bits: ``b``, the code width (1..16): each selected leaf gets ``2**b`` centroids.  An int,
        or a per-leaf mapping/pytree (``{"Dense_0": 5, "Dense_1/kernel": 4}``; leaves it does not
        name stay unquantized).
      masks: optional bool tree (True = kept).  Without it, the kept weights are the nonzero ones.
      where: ``where(path, leaf) -> bool`` selects the leaves to quantize (default ``ndim >= 2``).
      max_iter: the most Lloyd iterations per leaf.

    Returns:
      ``params`` with every selected leaf replaced by a ``Quantized`` node whose codebook holds
      the k-means centroids of the kept weights (linear initialisation) and whose codes name
      each kept weight's nearest centroid; pruned entries stay exact zeros.

    Raises:
      TypeError: a traced or non-float leaf, non-boolean masks, params already quantized.
      ValueError: bad ``bits`` (naming the leaf), a NaN/inf weight in a selected leaf (naming
        it), masks that do not match.
    """
    check_int(max_iter, name="max_iter", minimum=1)
    _, leaves, mleaves, per_leaf, treedef = _selected_leaves(params, bits, masks, where, 1)
    out = []
    for leaf, m, b in zip(leaves, mleaves, per_leaf, strict=True):
        if b is None:
            out.append(leaf)
            continue
        kept = _kept(leaf, m)
        w = np.asarray(leaf).astype(np.float64)
        out.append(_make(leaf, kept, kmeans_codebook(w[kept], 2**b, max_iter=max_iter), "kmeans"))
    return jax.tree_util.tree_unflatten(treedef, out)


def _uniform_codebook(values: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """The ``2**bits`` grid points ``scale * (j - zero_point)`` for the kept ``values``."""
    k = 2**bits
    lo = float(values.min()) if values.size else 0.0
    hi = float(values.max()) if values.size else 0.0
    if symmetric:
        zero_point = k // 2
        scale = max(abs(lo), abs(hi)) / (k // 2 - 1)
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # 0 on the grid and every weight inside it
        span = hi - lo
        scale = (span if span > 0 else (abs(lo) or 1.0)) / (k - 1)
        zero_point = int(np.clip(np.round(-lo / scale), 0, k - 1))
    scale = scale if scale > 0 else 1.0
    return (scale * (np.arange(k, dtype=np.float64) - zero_point)).astype(np.float32)


def uniform_quantize(
    params: PyTree,
    bits: int | Any,
    *,
    masks: PyTree | None = None,
    where: Where | None = None,
    symmetric: bool = True,
) -> PyTree:
    """Plain uniform (``int8``/``int4``-style) quantization of the kept weights, for comparison.

    The codebook is the integer grid ``scale * (j - zero_point)``, ``j = 0 .. 2**b - 1``:
    symmetric (``zero_point = 2**(b-1)``, ``scale = max|w| / (2**(b-1) - 1)``, the ``int8``
    range ``-127..127`` for ``b = 8``, as in Jacob et al. 2018's weight quantization) or affine
    (``scale = (max - min) / (2**b - 1)`` over ``[min(min, 0), max(max, 0)]``, integer
    ``zero_point``, so ``0`` is on the grid and every weight within half a step of it).
    Each kept weight takes the nearest grid point.

    Args:
      params: a params pytree of float arrays.
      bits: the width ``b`` (symmetric: 2..16, affine: 1..16), an int or a per-leaf mapping.
      masks: optional bool tree (True = kept); without it, the nonzero weights are kept.
      where: selects the leaves (default ``ndim >= 2``).
      symmetric: symmetric around zero (default) or affine over ``[min, max]``.

    Returns:
      ``params`` with the selected leaves as ``Quantized`` nodes (``kind="uniform"``).

    Raises:
      TypeError, ValueError: as ``kmeans_quantize``.
    """
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {symmetric!r}")
    minimum = 2 if symmetric else 1
    _, leaves, mleaves, per_leaf, treedef = _selected_leaves(params, bits, masks, where, minimum)
    out = []
    for leaf, m, b in zip(leaves, mleaves, per_leaf, strict=True):
        if b is None:
            out.append(leaf)
            continue
        kept = _kept(leaf, m)
        w = np.asarray(leaf).astype(np.float64)
        out.append(_make(leaf, kept, _uniform_codebook(w[kept], b, symmetric), "uniform"))
    return jax.tree_util.tree_unflatten(treedef, out)
