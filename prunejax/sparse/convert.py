"""``sparsify`` and ``densify``: between dense ``(in, out)`` kernels and prunejax's kernel objects.

``format_of`` / ``formats_of`` name the format of a leaf / of every kernel of a pytree.

Containers: ``sparsify`` and ``densify`` take any pytree, a Flax NNX ``nnx.State`` or an Equinox
module (``prunejax._util.unwrap``) and return the same kind of container.  A kernel stored
``(out, in)`` (an ``equinox.nn.Linear`` weight, used as ``W @ x``; or every 2-D leaf with
``layout="out_in"``) becomes a :class:`TransposedKernel`: a view of shape ``(out, in)`` on the
kernel object of ``W.T``, so that the fast ``x @ W.T`` of every format computes ``W @ x``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from prunejax._util import (
    PyTree,
    Where,
    check_block,
    flatten,
    is_int,
    is_matrix_object,
    is_traced,
    select,
    swap_kernel,
    unwrap,
)
from prunejax.sparse import gpu
from prunejax.sparse.auto import auto_format, layer_kernels
from prunejax.sparse.kernels import (
    BCSRKernel,
    BlockKernel,
    CsrKernel,
    DenseTKernel,
    EllKernel,
    NMKernel,
)

__all__ = ["FORMATS", "TransposedKernel", "densify", "format_of", "formats_of", "sparsify"]

FORMATS = (
    "auto",
    "dense",
    "dense_t",
    "bcoo",
    "bcsr",
    "csr",
    "bcsr_t",
    "ell",
    "block",
    "nm",
    "pallas_block",
)


@jax.tree_util.register_pytree_node_class
class TransposedKernel:
    """A kernel ``W`` stored ``(out, in)`` and used as ``W @ x`` (Equinox ``Linear``, PyTorch):
    a view on ``inner``, a kernel object (or array) of ``W.T`` of shape ``(in, out)``.

    ``shape`` is ``(out, in)``; ``todense()`` gives ``W``; ``W @ x`` (``x`` of shape ``(in,)`` or
    ``(in, k)``) and ``x @ W.T`` run ``inner``'s own product; ``.T`` is ``inner``.
    ``prunejax.sparse_apply`` runs a model's ``W @ x`` through it.  Built by ``sparsify``.
    """

    __prunejax_kernel__ = True
    __array_ufunc__ = None

    def __init__(self, inner: Any):
        self.inner = inner

    def tree_flatten(self) -> tuple[tuple, None]:
        return (self.inner,), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple) -> TransposedKernel:
        del aux
        return cls(*children)

    @property
    def shape(self) -> tuple[int, int]:
        n_in, n_out = self.inner.shape
        return (n_out, n_in)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> Any:
        return self.inner.dtype

    @property
    def format(self) -> str:
        return format_of(self.inner)

    @property
    def nse(self) -> int:
        return int(getattr(self.inner, "nse", np.size(self.inner)))

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in jax.tree_util.tree_leaves(self.inner)))

    @property
    def T(self) -> Any:  # noqa: N802 - the array attribute's name
        return self.inner

    def todense(self) -> jax.Array:
        inner = self.inner.todense() if is_matrix_object(self.inner) else self.inner
        return jnp.swapaxes(jnp.asarray(inner), 0, 1)

    def __matmul__(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim == 1:
            return x @ self.inner
        return jnp.swapaxes(jnp.swapaxes(x, -1, -2) @ self.inner, -1, -2)

    def __rmatmul__(self, x: Any) -> jax.Array:
        return jnp.asarray(x) @ self.todense()

    def __repr__(self) -> str:
        return f"TransposedKernel(shape={self.shape}, inner={self.inner!r})"


def format_of(leaf: Any) -> str:
    """The format of one leaf.

    Args:
      leaf: an array or a kernel object.

    Returns:
      ``"dense"`` for arrays, ``"bcoo"``/``"bcsr"`` for ``jax.experimental.sparse`` matrices,
      else the kernel object's ``format``.
    """
    if isinstance(leaf, jsparse.BCOO):
        return "bcoo"
    if isinstance(leaf, jsparse.BCSR):
        return "bcsr"
    if hasattr(leaf, "__prunejax_kernel__"):
        return str(leaf.format)
    return "dense"


def formats_of(params: PyTree) -> dict[str, str]:
    """The format of every kernel of ``params`` (2-D arrays and kernel objects).

    Args:
      params: a pytree, possibly sparsified.

    Returns:
      ``{path: format}`` (see :func:`format_of`), in ``params``' leaf order.
    """
    paths, leaves, _ = flatten(params)
    return {
        p: format_of(leaf)
        for p, leaf in zip(paths, leaves, strict=True)
        if is_matrix_object(leaf) or np.ndim(leaf) == 2
    }


def densify(params: PyTree, *, layout: str | None = None) -> PyTree:
    """Turn every sparse kernel object of ``params`` back into a dense ``(in, out)`` array.

    Args:
      params: a pytree, ``nnx.State`` or Equinox module possibly holding
        ``jax.experimental.sparse`` matrices or prunejax kernels.
      layout: the kernels' layout, as in :func:`sparsify`.

    Returns:
      The same container with dense JAX arrays in their place (other leaves untouched); a
      :class:`TransposedKernel` becomes its dense ``(out, in)`` array.
    """
    u = unwrap(params, layout=layout)
    paths, leaves, treedef = flatten(u.tree)
    out = [leaf.todense() if is_matrix_object(leaf) else leaf for leaf in leaves]
    return u.rewrap(jax.tree_util.tree_unflatten(treedef, out))


def _check_nm(nm: Any) -> tuple[int, int]:
    """``nm`` as ``(n, m)``, ints with ``1 <= n <= m <= 255``."""
    if (
        not isinstance(nm, tuple | list)
        or len(nm) != 2
        or not all(is_int(v) for v in nm)
        or not 1 <= nm[0] <= nm[1] <= 255
    ):
        raise ValueError(f"nm must be a pair of ints (n, m) with 1 <= n <= m <= 255, got {nm!r}")
    return int(nm[0]), int(nm[1])


def _to_format(
    w: np.ndarray, fmt: str, path: str, block: tuple[int, int], nm: tuple[int, int]
) -> Any:
    """The kernel object (or array) of format ``fmt`` holding ``w``."""
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
    if fmt == "pallas_block":
        return gpu.PallasBlockKernel.fromdense(w, block, path)
    raise AssertionError(fmt)


def auto_gpu(w: np.ndarray, batch_size: int, device_kind: str | None = None) -> Any:
    """``auto`` on a GPU: time the forms :func:`prunejax.sparse.gpu.gpu_candidates` proposes
    for this kernel and keep the fastest, dense unless a sparse form is measured faster.

    Args:
      w: the concrete dense ``(in, out)`` kernel.
      batch_size: the batch the model will run at.
      device_kind: the device's kind (default: ``jax.devices()[0].device_kind``).

    Returns:
      The chosen kernel object (or the dense array).
    """
    kind = jax.devices()[0].device_kind if device_kind is None else device_kind
    fmt, options, _ = gpu.choose_gpu_format(w, batch_size, gpu.gpu_candidates(w, batch_size, kind))
    return gpu.gpu_format(w, fmt, **options)


def _check_args(fmt: Any, batch_size: Any, tune: Any) -> None:
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"unknown sparse format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if fmt == "auto" and not (is_int(batch_size) and batch_size >= 1):
        raise ValueError(f'format="auto" needs batch_size=, a positive int, got {batch_size!r}')
    if not isinstance(tune, bool):
        raise TypeError(f"tune must be a bool, got {tune!r}")
    if tune and fmt != "auto":
        raise ValueError(f'tune=True applies to format="auto" only, got format={fmt!r}')


def sparsify(
    params: PyTree,
    format: str = "bcoo",  # noqa: A002 - the natural name of the argument
    *,
    batch_size: int | None = None,
    where: Where | None = None,
    block: tuple[int, int] = (16, 16),
    nm: tuple[int, int] = (2, 4),
    tune: bool = False,
    layout: str | None = None,
) -> PyTree:
    """Turn each selected kernel into a sparse kernel object that supports ``x @ W`` in jit.

    Han et al. (2015), "Learning both Weights and Connections for Efficient Neural Networks",
    store pruned layers in CSR; this function does the same with formats measured to run fast
    on XLA (see ``prunejax.sparse`` and ``FORMATS``).

    Args:
      params: any pytree of arrays, a Flax NNX ``nnx.State`` or an Equinox module; kernels are
        ``(in, out)`` and used as ``x @ W``, except those ``layout`` says are ``(out, in)``.
        Leaves that already are sparse kernel objects are converted from their dense form.
        Run any model on the result with ``prunejax.sparse_apply``.
      format: one of ``FORMATS``.
      batch_size: the inference batch size; required by ``"auto"``, ignored otherwise.
      where: ``(path, leaf) -> bool`` selecting the leaves to convert (default: every leaf of
        two or more dimensions, and sparse kernel objects).  Selected leaves must be 2-D: a 3-D
        or 4-D leaf (a convolution kernel) raises under the default selection too, so that no
        kernel is silently left dense; exclude such leaves with ``where=``.
      block: ``(bh, bw)`` block shape for ``"block"`` (and the block candidate of ``"auto"``).
      nm: ``(n, m)`` for ``"nm"``: at most ``n`` nonzeros in every ``m`` consecutive inputs.
      tune: with ``"auto"``, measure instead of predicting: every candidate form of each
        selected fp32 kernel is timed against dense at ``batch_size`` in this process and a form
        is chosen only where measured at least 1.1x faster than dense; the times are cached
        per layer shape, pattern and batch size on this machine, so a second call measures
        nothing (``prunejax.sparse.auto.tune_format``; ``predict_times(..., measured=True)``
        shows them).  Costs a compilation and a few timed calls per candidate and layer.
      layout: ``None``: Equinox ``Linear`` weights are ``(out, in)``; ``"out_in"``: every 2-D
        leaf is; ``"in_out"``: none.  ``(out, in)`` kernels become :class:`TransposedKernel`.
        ``where=`` sees the unwrapped tree (``prunejax._util.unwrap``).

    Returns:
      ``params`` (the same kind of container) with each selected kernel replaced by its
      sparse form.  ``"dense"`` gives a
      plain ``jax.Array``; so does ``"auto"`` where dense wins, except at batch 1 with the
      compiled CPU kernels (fp32), where a layer kernel (a ``kernel``/``weight``/``w`` leaf, or
      a 2-D leaf followed by its bias) that stays dense becomes ``"dense_t"`` (with ``tune``:
      where ``"dense_t"`` is measured faster).  Unselected leaves are untouched.

    Raises:
      ValueError: unknown format; a selected leaf that is not 2-D, holds NaN/inf, or does not fit
        the format (block divisibility, N:M pattern); ``"auto"`` without a positive batch_size;
        ``tune=True`` with another format than ``"auto"``.
      TypeError: a traced leaf (sparsify needs concrete values; call it outside ``jax.jit``), or
        a selected leaf that is not a float kernel; ``tune`` not a bool.
    """
    _check_args(format, batch_size, tune)
    block = check_block(block)
    nm = _check_nm(nm)
    u = unwrap(params, layout=layout)
    params = u.tree
    paths, leaves, treedef = flatten(params)

    def default(path: str, leaf: Any) -> bool:
        return is_matrix_object(leaf) or np.ndim(leaf) >= 2

    selected = select(paths, leaves, where if where is not None else default)
    layers = layer_kernels(params, paths) if format == "auto" else set()
    out = [
        _convert(p, leaf, format, batch_size, block, nm, tune=tune, layer=p in layers)
        if s
        else leaf
        for p, leaf, s in zip(paths, leaves, selected, strict=True)
    ]
    out = [
        (TransposedKernel(leaf) if is_matrix_object(leaf) else swap_kernel(p, leaf))
        if p in u.out_in
        else leaf
        for p, leaf in zip(paths, out, strict=True)
    ]
    return u.rewrap(jax.tree_util.tree_unflatten(treedef, out), transpose=False)


def _convert(
    p: str,
    leaf: Any,
    format: str,  # noqa: A002
    batch_size: int | None,
    block: tuple[int, int],
    nm: tuple[int, int],
    *,
    tune: bool,
    layer: bool,
) -> Any:
    """One selected leaf in ``format`` (``"auto"`` resolved for it)."""
    w = _concrete_kernel(p, leaf)
    if format == "auto" and jax.default_backend() == "gpu":
        return auto_gpu(w, int(batch_size))  # type: ignore[arg-type]
    fmt = format
    if format == "auto":
        build = functools.partial(_to_format, w, path=p, block=block, nm=nm)
        fmt = auto_format(w, int(batch_size), block, layer_kernel=layer, tune=tune, build=build)  # type: ignore[arg-type]
    return _to_format(w, fmt, p, block, nm)


def _concrete_kernel(path: str, leaf: Any) -> np.ndarray:
    """``leaf`` as a 2-D float NumPy kernel, checked: concrete, 2-D, float, finite."""
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
            "exclude it with where= (the default selects every leaf of 2 or more dimensions)"
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
