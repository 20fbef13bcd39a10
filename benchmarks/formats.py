"""The formats the suite times, as builders: ``Ctx`` (one cell's inputs) -> ``Built`` (a callable).

Here: the dense baseline, its A/A control, dense with the mask multiplied in, the compacted
network (``pj.compact``) and every ``prunejax.sparse`` format (``pj.sparsify``).  Other
libraries' formats, the reference points, are in ``benchmarks.peers``.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import prunejax as pj
from benchmarks.workload import BLOCK, dense_forward, kernels, mlp_forward, tree_nbytes


class Skip(Exception):
    """A format does not apply to a cell: reported with its note."""


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


def cached(ctx: Ctx, key: str, make: Callable[[], Any]) -> Any:
    """``ctx.cache[key]``, computed by ``make()`` the first time (shared across batches)."""
    if key not in ctx.cache:
        ctx.cache[key] = make()
    return ctx.cache[key]


def build_dense(ctx: Ctx) -> Built:
    """The dense baseline on the pruned params."""
    p = jax.device_put(ctx.pruned)
    return Built(dense_forward, (p, jnp.asarray(ctx.x)), nbytes=tree_nbytes(p), kind="dense")


def build_dense_aa(ctx: Ctx) -> Built:
    """A/A control: the dense baseline again (own buffers, own executable), timed as a candidate.

    Its ratio is the noise floor of the cell: how far from 1.00 an identical computation lands.
    """
    p = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), jax.device_put(ctx.pruned))
    return Built(
        jax.jit(mlp_forward),
        (p, jnp.asarray(ctx.x)),
        nbytes=tree_nbytes(p),
        kind="dense",
        note="A/A control: dense timed as a candidate (noise floor)",
    )


@jax.jit
def dense_x_mask_forward(params: dict, masks: dict, x: jax.Array) -> jax.Array:
    """Dense with the mask multiplied in at every call (what mask-only tools execute)."""
    return mlp_forward(jax.tree_util.tree_map(operator.mul, params, masks), x)


def build_dense_x_mask(ctx: Ctx) -> Built:
    """Dense params and masks, multiplied at every call."""
    p, m = jax.device_put(ctx.params), jax.device_put(ctx.masks)
    return Built(
        dense_x_mask_forward,
        (p, m, jnp.asarray(ctx.x)),
        nbytes=tree_nbytes(p) + tree_nbytes(m),
        kind="dense",
    )


def compact_params(pruned: dict) -> dict:
    """The pruned MLP with its dead hidden units removed (``pj.compact``), C-contiguous NumPy."""
    small = pj.compact(pruned, activation=jax.nn.relu).params
    return jax.tree_util.tree_map(lambda a: np.ascontiguousarray(np.asarray(a)), small)


def _compacted(ctx: Ctx) -> dict:
    return cached(ctx, "compact", lambda: compact_params(ctx.pruned))


def build_compact(ctx: Ctx) -> Built:
    """The compacted network run exactly like the baseline (XLA's dot, ``(in, out)`` layout)."""
    ks = kernels(_compacted(ctx))
    shapes = "-".join([str(ks[0].shape[0])] + [str(k.shape[1]) for k in ks])
    p = jax.device_put(_compacted(ctx))
    return Built(
        dense_forward,
        (p, jnp.asarray(ctx.x)),
        nbytes=tree_nbytes(p),
        kind="compact",
        note=f"prunejax.compact; dims {shapes}",
    )


def build_compact_auto(ctx: Ctx) -> Built:
    """The compacted network run the way prunejax runs it: ``sparsify(..., "auto")``.

    At batch 1 that is the row-dot layout (``"dense_t"``) for every layer.  Its gain over
    ``compact`` is partly the layout alone, which ``pj.dense_t`` on the unpruned model (the 0%
    cells) shows.
    """
    small = jax.device_put(_compacted(ctx))
    sp = cached(
        ctx, f"compact.auto@{ctx.batch}", lambda: pj.sparsify(small, "auto", batch_size=ctx.batch)
    )
    return Built(
        dense_forward,
        (sp, jnp.asarray(ctx.x)),
        nbytes=tree_nbytes(sp),
        kind="compact",
        note=f"prunejax.compact + sparsify auto; chose {describe_kernels(sp)}",
    )


def describe_kernels(sp: Any) -> str:
    """The format of every kernel, in layer order: ``"csr/dense/dense_t"``."""
    return "/".join(pj.formats_of(sp).values())


# Formats whose construction depends on batch_size (rebuilt per batch; others are built once per
# sparsity and reused).
PJ_BATCH_DEPENDENT = {"auto"}
PJ_KIND_HINTS = (("block", "block"), ("nm", "block"), ("auto", "auto"))


def pj_kind(name: str) -> str:
    """The bound a ``prunejax.sparse`` format is held to: ``"block"``, ``"auto"`` or ``"index"``."""
    for key, kind in PJ_KIND_HINTS:
        if key in name:
            return kind
    return "index"


def _sparsify_or_skip(ctx: Ctx, fmt: str) -> Any:
    try:
        return pj.sparsify(
            jax.device_put(ctx.pruned), format=fmt, batch_size=ctx.batch, block=BLOCK
        )
    except (ValueError, TypeError, NotImplementedError) as e:
        return Skip(f"sparsify refused: {type(e).__name__}: {e}"[:300])


def pj_builder(fmt: str) -> Callable[[Ctx], Built]:
    """The builder of ``pj.<fmt>``: ``pj.sparsify(pruned, format=fmt, batch_size=b, block=16x16)``.

    Args:
      fmt: a ``prunejax.sparse.FORMATS`` name.

    Returns:
      A builder; it raises ``Skip`` (with sparsify's message) where the format does not apply.
    """

    def build(ctx: Ctx) -> Built:
        key = f"pj.{fmt}" + (f"@{ctx.batch}" if fmt in PJ_BATCH_DEPENDENT else "")
        sp = cached(ctx, key, lambda: _sparsify_or_skip(ctx, fmt))
        if isinstance(sp, Skip):
            raise sp
        return Built(
            dense_forward,
            (sp, jnp.asarray(ctx.x)),
            nbytes=tree_nbytes(sp),
            kind=pj_kind(fmt),
            note="chose " + describe_kernels(sp) if fmt == "auto" else "",
        )

    return build
