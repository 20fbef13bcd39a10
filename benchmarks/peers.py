"""Reference formats from other libraries, timed beside prunejax's as points of comparison.

* ``jsp.bcoo``: ``jax.experimental.sparse.BCOO`` kernels, ``x @ W`` (through ``pj.mlp_apply``);
* ``jsp.bcsr``: ``W^T`` as ``jax.experimental.sparse.BCSR`` on the LEFT, ``(W^T @ x^T)^T``: the
  only BCSR product JAX implements, and the one that reaches the Eigen CSR x dense kernel on CPU;
* ``scipy.csr``: SciPy CSR (``W^T``) x dense in NumPy, outside jit.

``PEERS`` maps each name to ``(builder, granularities it applies to by default)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from benchmarks.formats import Built, Ctx, Skip, cached
from benchmarks.workload import biases, dense_forward, kernels, tree_nbytes


def _bcoo(k: np.ndarray) -> jsparse.BCOO:
    rows, cols = np.nonzero(k)  # row-major: sorted, unique
    idx = np.stack([rows, cols], axis=1).astype(np.int32)
    return jsparse.BCOO(
        (jnp.asarray(k[rows, cols]), jnp.asarray(idx)),
        shape=k.shape,
        indices_sorted=True,
        unique_indices=True,
    )


def _bcsr_t(k: np.ndarray) -> jsparse.BCSR:
    kt = np.ascontiguousarray(k.T)
    indptr = np.concatenate([[0], np.cumsum((kt != 0).sum(axis=1))]).astype(np.int32)
    rows, cols = np.nonzero(kt)
    data = (jnp.asarray(kt[rows, cols]), jnp.asarray(cols.astype(np.int32)), jnp.asarray(indptr))
    return jsparse.BCSR(data, shape=kt.shape, indices_sorted=True, unique_indices=True)


def _with_kernels(ctx: Ctx, ks: list) -> dict:
    """The pruned params with their kernels replaced by ``ks`` (biases as JAX arrays)."""
    return {
        f"Dense_{i}": {"kernel": k, "bias": jnp.asarray(b)}
        for i, (k, b) in enumerate(zip(ks, biases(ctx.pruned), strict=True))
    }


def build_jsp_bcoo(ctx: Ctx) -> Built:
    """``jax.experimental.sparse.BCOO`` kernels built from the NumPy nonzeros."""
    ks = cached(ctx, "jsp.bcoo", lambda: [_bcoo(k) for k in kernels(ctx.pruned)])
    p = _with_kernels(ctx, ks)
    return Built(dense_forward, (p, jnp.asarray(ctx.x)), nbytes=tree_nbytes(p))


@jax.jit
def bcsr_left_forward(kernels_t: list, biases_: list, x: jax.Array) -> jax.Array:
    """The MLP forward with every kernel stored transposed, multiplied on the left."""
    h = x
    for i, (kt, b) in enumerate(zip(kernels_t, biases_, strict=True)):
        h = (kt @ h.T).T + b
        if i < len(kernels_t) - 1:
            h = jax.nn.relu(h)
    return h


def build_jsp_bcsr(ctx: Ctx) -> Built:
    """``W^T`` as ``jax.experimental.sparse.BCSR`` on the left (Eigen CSR kernel on CPU)."""
    ks = cached(ctx, "jsp.bcsr", lambda: [_bcsr_t(k) for k in kernels(ctx.pruned)])
    bs = [jnp.asarray(b) for b in biases(ctx.pruned)]
    return Built(
        bcsr_left_forward,
        (ks, bs, jnp.asarray(ctx.x)),
        nbytes=tree_nbytes((ks, bs)),
        note="W^T as BCSR on the left (Eigen CSR kernel on CPU)",
    )


def build_scipy_csr(ctx: Ctx) -> Built:
    """SciPy CSR (``W^T``) x dense, NumPy, outside jit: a reference outside JAX."""
    try:
        import scipy.sparse as ssp
    except ModuleNotFoundError:
        raise Skip("scipy is not installed") from None
    ks = cached(
        ctx,
        "scipy.csr",
        lambda: [ssp.csr_matrix(np.ascontiguousarray(k.T)) for k in kernels(ctx.pruned)],
    )
    bs = biases(ctx.pruned)

    def fwd(x: np.ndarray) -> np.ndarray:
        h = x
        for i, (kt, b) in enumerate(zip(ks, bs, strict=True)):
            h = (kt @ h.T).T + b
            if i < len(ks) - 1:
                h = np.maximum(h, 0)
        return h

    nb = sum(k.data.nbytes + k.indices.nbytes + k.indptr.nbytes for k in ks) + tree_nbytes(bs)
    return Built(
        fwd,
        (np.asarray(ctx.x),),
        jitted=False,
        nbytes=nb,
        note="SciPy CSR (W^T) x dense, NumPy, outside jit (reference)",
    )


PEERS: dict[str, tuple[Callable[[Ctx], Built], set[str] | None]] = {
    "jsp.bcoo": (build_jsp_bcoo, {"unstructured", "2:4"}),
    "jsp.bcsr": (build_jsp_bcsr, {"unstructured", "2:4", "block16"}),
    "scipy.csr": (build_scipy_csr, {"unstructured", "2:4", "block16"}),
}
