"""Exact selection of the ``k`` smallest entries over one or more arrays, without a sort.

Every mask builder ranks scores the same way: the ``k`` entries with the smallest score are
pruned, ties broken by flat position (the lower position is pruned first), over one array or
over several arrays taken together in the order given (global scope).  A full sort gives that
ranking but needs several times the scores' memory as scratch; this module finds the same set in
``O(n)`` work per pass and a few scalars of state:

1. Scores are mapped to unsigned integers that order exactly like them (:func:`order_key`:
   the IEEE-754 bit pattern with the sign folded, so ``-0.0`` ties with ``0.0``; integers
   offset to unsigned).  Several keys per entry rank lexicographically (an exact float key and
   an integer remainder, for instance).
2. The ``k``-th smallest key ``t`` is built bit by bit from the most significant one (radix
   bisection): a bit is set when fewer than ``k`` keys lie below the candidate.  Each of the
   ``b`` passes (``b`` = the key's bits) is one streaming count, a sum that XLA all-reduces when
   the arrays are sharded, so nothing is gathered.
3. Every key below ``t`` is pruned, and of the keys equal to ``t`` exactly the number still
   needed, in flat order: per array the position of the last pruned tie is found by a second
   bisection over positions (counts again), skipped when no array needs part of its ties.

Counts of all arrays together may exceed ``2**31`` (a 7-billion-parameter model in global
scope); they are kept as pairs of int32 ``(hi, lo)`` with value ``hi * 2**16 + lo``.  One array
must hold fewer than ``2**31`` entries.

The masks are computed elementwise in each array's own shape, so they come out with the
array's sharding.  The NumPy path (NumPy in, NumPy out) finds the same set with
``np.partition``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "order_key",
    "split_axis",
    "repeat_axis",
    "scalar_key",
    "keep_lowest",
    "keep_lowest_k",
    "split_count",
    "num_pruned",
]

_HALF = 16  # counts are (hi, lo) int32 pairs: hi * 2**16 + lo, 0 <= lo < 2**16
_LO_MASK = (1 << _HALF) - 1

KeyFn = Callable[[Any], tuple[Any, ...]]


def order_key(x: Any) -> Any:
    """Unsigned integers that order exactly like ``x`` (NumPy or JAX, any shape).

    Floats map to their bit pattern with the sign folded (negative values bit-inverted,
    non-negative ones with the sign bit set), after ``-0.0`` is made ``+0.0`` so that the two
    zeros tie, as they do in a sort.  Signed integers are offset by ``2**(bits-1)``; unsigned
    integers are their own key; bools become ``uint8``.

    Args:
      x: a real array (NaN not allowed: it has no place in the order).

    Returns:
      An unsigned array of ``x``'s shape and item size.
    """
    jax_in = isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer)
    xp = jnp if jax_in else np
    dt = np.dtype(x.dtype)
    if dt == np.bool_:
        return x.astype(np.uint8)
    udt = np.dtype(f"uint{8 * dt.itemsize}")
    if dt.kind == "u":
        return x
    top = udt.type(1 << (8 * dt.itemsize - 1))
    if dt.kind == "i":
        u = jax.lax.bitcast_convert_type(x, udt) if jax_in else x.view(udt)
        return u ^ top
    x = xp.where(x == 0, xp.zeros((), dt), x)
    bits = jax.lax.bitcast_convert_type(x, udt) if jax_in else x.view(udt)
    return xp.where((bits & top) != 0, ~bits, bits | top)


def split_count(n: int) -> tuple[int, int]:
    """A non-negative count as the ``(hi, lo)`` pair of this module (``hi * 2**16 + lo``)."""
    return n >> _HALF, n & _LO_MASK


def num_pruned(sparsity: Any, n: int) -> tuple[Any, Any]:
    """``round(sparsity * n)`` half-to-even for a traced float32 ``sparsity``, as a count pair.

    The product is taken in float32, as for any traced sparsity; splitting the rounded float into
    two int32 halves keeps counts beyond ``2**31`` (which int32 cannot hold) exact.

    Args:
      sparsity: a traced (or JAX) scalar.
      n: the number of entries ranked.

    Returns:
      ``(hi, lo)`` int32 scalars.
    """
    v = jnp.round(jnp.asarray(sparsity, jnp.float32) * jnp.float32(n))
    hi = jnp.floor(v / (1 << _HALF))
    return hi.astype(jnp.int32), (v - hi * (1 << _HALF)).astype(jnp.int32)


def _norm(hi: Any, lo: Any) -> tuple[Any, Any]:
    return hi + (lo >> _HALF), lo & _LO_MASK


def _add(a: tuple[Any, Any], c: Any) -> tuple[Any, Any]:
    """A count pair plus an int32 count (``0 <= c < 2**31``)."""
    return _norm(a[0] + (c >> _HALF), a[1] + (c & _LO_MASK))


def _sub(a: tuple[Any, Any], b: tuple[Any, Any]) -> tuple[Any, Any]:
    return _norm(a[0] - b[0], a[1] - b[1])


def _less(a: tuple[Any, Any], b: tuple[Any, Any]) -> Any:
    return (a[0] < b[0]) | ((a[0] == b[0]) & (a[1] < b[1]))


def _clip_to(a: tuple[Any, Any], c: Any) -> Any:
    """``clip(a, 0, c)`` as an int32, for a pair ``a`` and an int32 ``c >= 0``."""
    big = a[0] >= (1 << (31 - _HALF))
    small = jnp.where(big, 0, a[0]) * (1 << _HALF) + a[1]
    return jnp.where(a[0] < 0, 0, jnp.where(big, c, jnp.minimum(small, c)))


def _flat_less(shape: tuple[int, ...], p: Any) -> Any:
    """``flat_index < p`` over an array of ``shape`` (row-major), from per-axis iotas.

    No flat-index array is formed (XLA would hoist it out of a loop as an int32 array of the
    array's size) and nothing is reshaped (which could reshard).
    """
    if not shape:
        return p > 0
    strides = [int(np.prod(shape[d + 1 :], dtype=np.int64)) for d in range(len(shape))]
    coords = [p // strides[0]] + [(p // strides[d]) % shape[d] for d in range(1, len(shape))]
    less = jax.lax.broadcasted_iota(jnp.int32, shape, len(shape) - 1) < coords[-1]
    for d in range(len(shape) - 2, -1, -1):
        io = jax.lax.broadcasted_iota(jnp.int32, shape, d)
        less = (io < coords[d]) | ((io == coords[d]) & less)
    return less


def split_axis(x: Any, axis: int, size: int) -> Any:
    """Reshape ``axis`` of length ``L`` into two axes ``(L // size, size)``.

    With an explicit mesh the outer axis keeps the split axis's sharding (JAX asks for the
    output sharding of such a reshape); otherwise this is a plain reshape, which XLA's
    propagation shards the same way.  NumPy arrays are reshaped as they are.

    Args:
      x: an array; ``x.shape[axis]`` must be divisible by ``size``.
      axis: the axis to split (non-negative).
      size: the length of the new inner axis.

    Returns:
      The reshaped array, one more dimension than ``x``.
    """
    shape = tuple(x.shape)
    new = shape[:axis] + (shape[axis] // size, size) + shape[axis + 1 :]
    found = _explicit_spec(x)
    if found is None:
        return x.reshape(new)
    mesh, spec = found
    out = jax.sharding.PartitionSpec(*spec[:axis], spec[axis], None, *spec[axis + 1 :])
    return jax.lax.reshape(x, new, out_sharding=jax.sharding.NamedSharding(mesh, out))


def repeat_axis(x: Any, repeats: int, axis: int) -> Any:
    """``repeat(x, repeats, axis)`` that keeps ``x``'s sharding under an explicit mesh too."""
    found = _explicit_spec(x)
    if found is None:
        return (jnp if isinstance(x, jax.Array | jax.core.Tracer) else np).repeat(x, repeats, axis)
    out = jax.sharding.NamedSharding(found[0], jax.sharding.PartitionSpec(*found[1]))
    return jnp.repeat(x, repeats, axis, out_sharding=out)


def _explicit_spec(x: Any) -> tuple[Any, Any] | None:
    """``(mesh, spec padded to x.ndim)`` when ``x`` is typed with an explicit mesh, else None."""
    if not (isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer)):
        return None
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if not any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None
    spec = tuple(sharding.spec)
    return mesh, spec + (None,) * (x.ndim - len(spec))


def _shards(x: Any, axis: int) -> int:
    """How many pieces an explicit mesh cuts ``axis`` into (1 when unknown or unsharded)."""
    found = _explicit_spec(x)
    if found is None or found[1][axis] is None:
        return 1
    mesh, spec = found
    names = spec[axis] if isinstance(spec[axis], tuple) else (spec[axis],)
    return int(np.prod([mesh.shape[n] for n in names]))


def _fold(m: int) -> int:
    """The largest divisor of ``m`` in ``[2, 32]`` (1 when there is none)."""
    return next((d for d in range(min(m, 32), 1, -1) if m % d == 0), 1)


def _count(hit: Any) -> Any:
    """``sum(hit)`` as int32 without an int32 copy of ``hit``.

    XLA's CPU compiler turns a long reduction into a tree of reduce-windows that does not fuse
    with the comparison producing ``hit``, which then lands in memory as int32 (4x the bytes of
    a float32 parameter).  Reducing the last axis in folds of at most 32 fuses; the optimization
    barrier keeps the simplifier from merging the folds back into one long reduction.
    """
    x = hit.astype(jnp.int32)
    if x.ndim == 0:
        return x
    while x.shape[-1] > 1:
        d = _fold(x.shape[-1] // _shards(x, x.ndim - 1))  # whole folds on every shard
        if d == 1:
            break
        x = jnp.sum(split_axis(x, x.ndim - 1, d), axis=-1)
        x = jax.lax.optimization_barrier(x)
        if x.shape[-1] * 32 <= hit.shape[-1]:
            break
    return jnp.sum(x, dtype=jnp.int32)


def _pinned(leaves: Sequence[Any], carry: Any) -> list[Any]:
    """The arrays, tied to a loop-carried value so that XLA computes their keys inside the
    loop's fused passes instead of hoisting a full-size key array out of the loop."""
    return list(jax.lax.optimization_barrier((list(leaves), carry))[0])


def _bisect_value(
    leaves: Sequence[Any], keys: Sequence[KeyFn], level: int, prev: list[Any], need: tuple[Any, Any]
) -> tuple[Any, tuple[Any, Any]]:
    """The smallest key ``t`` at ``level`` (among entries equal to ``prev`` on earlier levels)
    with ``count(key < t) < need`` maximal, i.e. the ``need``-th smallest; and ``count(< t)``."""

    def below(cand: Any) -> tuple[Any, Any]:
        total = (jnp.int32(0), jnp.int32(0))
        for leaf, fn in zip(_pinned(leaves, cand), keys, strict=True):
            ks = fn(leaf)
            hit = ks[level] < cand
            for j, t in enumerate(prev):
                hit = hit & (ks[j] == t)
            total = _add(total, _count(hit))
        return total

    kdt = jax.eval_shape(lambda x: keys[0](x)[level], leaves[0]).dtype
    nbits = 8 * np.dtype(kdt).itemsize

    def body(i: Any, t: Any) -> Any:
        bit = jnp.left_shift(jnp.asarray(1, kdt), (nbits - 1 - i).astype(kdt))
        cand = t | bit
        return jnp.where(_less(below(cand), need), cand, t)

    t = jax.lax.fori_loop(0, nbits, body, jnp.zeros((), kdt))
    return t, below(t)


def _ties(ks: tuple[Any, ...], thresholds: list[Any]) -> Any:
    tie = ks[0] == thresholds[0]
    for j in range(1, len(thresholds)):
        tie = tie & (ks[j] == thresholds[j])
    return tie


def _lex_below(ks: tuple[Any, ...], thresholds: list[Any]) -> Any:
    below = ks[0] < thresholds[0]
    eq = ks[0] == thresholds[0]
    for j in range(1, len(thresholds)):
        below = below | (eq & (ks[j] < thresholds[j]))
        eq = eq & (ks[j] == thresholds[j])
    return below


def _tie_positions(
    leaves: Sequence[Any], keys: Sequence[KeyFn], thresholds: list[Any], budget: Any
) -> Any:
    """Per array, the flat position of its ``budget[i]``-th tie (bisection over positions)."""
    nbits = max(max(int(np.size(x)) - 1, 1).bit_length() for x in leaves)

    def body(b: Any, pos: Any) -> Any:
        bit = jnp.left_shift(jnp.int32(1), (nbits - 1 - b).astype(jnp.int32))
        cand = pos | bit
        counts = jnp.stack(
            [
                _count(_ties(fn(leaf), thresholds) & _flat_less(leaf.shape, cand[i]))
                for i, (leaf, fn) in enumerate(zip(_pinned(leaves, cand), keys, strict=True))
            ]
        )
        return jnp.where(counts < budget, cand, pos)

    return jax.lax.fori_loop(0, nbits, body, jnp.zeros((len(leaves),), jnp.int32))


def _keep_lowest_jax(leaves: list[Any], k_hi: Any, k_lo: Any, keys: tuple[KeyFn, ...]) -> list:
    nlevels = len(jax.eval_shape(keys[0], leaves[0]))
    need = (jnp.asarray(k_hi, jnp.int32), jnp.asarray(k_lo, jnp.int32))
    thresholds: list[Any] = []
    for level in range(nlevels):
        t, below = _bisect_value(leaves, keys, level, thresholds, need)
        need = _sub(need, below)
        thresholds.append(t)
    ties = jnp.stack([_count(_ties(fn(x), thresholds)) for x, fn in zip(leaves, keys, strict=True)])
    budget, before = [], (jnp.int32(0), jnp.int32(0))
    for i in range(len(leaves)):  # ties are pruned in the arrays' order
        budget.append(_clip_to(_sub(need, before), ties[i]))
        before = _add(before, ties[i])
    budget = jnp.stack(budget)
    partial = (budget > 0) & (budget < ties)
    pos = jax.lax.cond(
        jnp.any(partial),
        lambda: _tie_positions(leaves, keys, thresholds, budget),
        lambda: jnp.zeros((len(leaves),), jnp.int32),
    )
    out = []
    for i, (leaf, fn) in enumerate(zip(leaves, keys, strict=True)):
        ks = fn(leaf)
        some = (budget[i] >= ties[i]) | ((budget[i] > 0) & _flat_less(leaf.shape, pos[i] + 1))
        out.append(~(_lex_below(ks, thresholds) | (_ties(ks, thresholds) & some)))
    return out


_keep_lowest_jit = jax.jit(_keep_lowest_jax, static_argnames=("keys",))


def scalar_key(x: Any) -> tuple[Any]:
    """The default key function: one level, :func:`order_key` of the array itself."""
    return (order_key(x),)


def _keep_lowest_np(leaves: list[Any], k: int, keys: Sequence[KeyFn]) -> list[Any]:
    levels = [fn(np.asarray(x)) for x, fn in zip(leaves, keys, strict=True)]
    flat = [np.concatenate([ks[j].reshape(-1) for ks in levels]) for j in range(len(levels[0]))]
    n = flat[0].shape[0]
    pruned = np.zeros((n,), bool)
    if k >= n:
        pruned[:] = True
    idx = None  # the entries still tied with the threshold on all earlier levels
    for level in flat:
        if k <= 0 or k >= n:
            break
        vals = level if idx is None else level[idx]
        t = np.partition(vals, k - 1)[k - 1]
        less = vals < t
        hits = np.flatnonzero(less) if idx is None else idx[less]
        pruned[hits] = True
        k -= hits.shape[0]
        idx = np.flatnonzero(vals == t) if idx is None else idx[vals == t]
    if 0 < k < n and idx is not None:
        pruned[idx[:k]] = True
    out, offset = [], 0
    for x in leaves:
        size = int(np.size(x))
        out.append(~pruned[offset : offset + size].reshape(np.shape(x)))
        offset += size
    return out


def _key_spec(fn: KeyFn, x: Any, use_jax: bool) -> list[tuple[np.dtype, Any]]:
    """The dtype (and shape, on the JAX path) of every key level of ``fn(x)``, computed
    without running it on the data."""
    if use_jax:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(np.shape(x), x.dtype))
        return [(np.dtype(o.dtype), tuple(o.shape)) for o in out]
    return [(np.dtype(o.dtype), None) for o in fn(np.zeros((0,), np.asarray(x).dtype))]


def _as_pair(k: Any) -> tuple[Any, Any]:
    if isinstance(k, tuple):
        return k
    if isinstance(k, int | np.integer):
        return split_count(int(k)) if k >= 0 else (-1, int(k) + (1 << _HALF))
    k = jnp.asarray(k, jnp.int32)
    return k >> _HALF, k & _LO_MASK


def keep_lowest(
    arrays: Sequence[Any],
    k: Any,
    *,
    keys: Sequence[KeyFn] | None = None,
    use_jax: bool = True,
) -> list[Any]:
    """Boolean masks, False at the ``k`` smallest entries of several arrays taken together.

    Entries are ranked by ``keys[i](arrays[i])``, a tuple of unsigned arrays of the array's
    shape compared lexicographically (default: :func:`order_key` of the values); ties are broken
    by position in the concatenation of the flattened arrays, the lower position pruned first.
    The result equals that of a stable sort of the concatenation; no sort is done (see the
    module docstring), and each mask keeps its array's shape and sharding.

    Args:
      arrays: the arrays (JAX or NumPy), any shapes; each must hold fewer than ``2**31``
        entries on the JAX path.
      k: how many entries to prune: an int, a traced int32 scalar, or an ``(hi, lo)`` pair from
        :func:`num_pruned` / :func:`split_count` (``k <= 0`` prunes nothing, ``k >= n`` all).
      keys: one key function per array, hashable (module-level functions), each returning a
        tuple of unsigned arrays; the levels' dtypes must agree across arrays.
      use_jax: compute in JAX (jit-compatible; traced ``k`` allowed); else NumPy, which needs a
        concrete int ``k`` and returns NumPy arrays.

    Returns:
      A list of boolean arrays (True = kept), one per input, of the inputs' shapes.

    Raises:
      ValueError: no arrays, an array of ``2**31`` entries or more on the JAX path, or key
        levels whose number or dtype differ between arrays.
    """
    arrays = list(arrays)
    if not arrays:
        raise ValueError("keep_lowest needs at least one array")
    keys = tuple(keys) if keys is not None else (scalar_key,) * len(arrays)
    if len(keys) != len(arrays):
        raise ValueError(f"got {len(keys)} key functions for {len(arrays)} arrays")
    specs = [_key_spec(fn, x, use_jax) for x, fn in zip(arrays, keys, strict=True)]
    for i, (x, spec) in enumerate(zip(arrays, specs, strict=True)):
        if [d for d, _ in spec] != [d for d, _ in specs[0]]:
            raise ValueError(
                f"array {i}'s keys have dtypes {[str(d) for d, _ in spec]}, array 0's "
                f"{[str(d) for d, _ in specs[0]]}; convert the scores to one type first"
            )
        if any(d.kind != "u" or (s is not None and s != np.shape(x)) for d, s in spec):
            raise ValueError(f"array {i}'s keys must be unsigned arrays of its shape {np.shape(x)}")
    if not use_jax:
        return _keep_lowest_np(arrays, int(k), keys)
    big = [i for i, x in enumerate(arrays) if np.size(x) >= 1 << 31]
    if big:
        raise ValueError(f"array {big[0]} holds 2**31 entries or more; split it into pieces")
    hi, lo = _as_pair(k)
    return _keep_lowest_jit([jnp.asarray(x) for x in arrays], hi, lo, keys)


def keep_lowest_k(scores: Any, k: Any, use_jax: bool) -> Any:
    """Boolean mask over one score array: False for the ``k`` smallest, ties by flat index.

    The ranking core of every builder (and of dynamic sparse training's drop and grow); a
    single-array :func:`keep_lowest`.

    Args:
      scores: an array of real scores (any shape; NaN not allowed).
      k: how many entries to prune (an int, or a traced int32 with ``use_jax``).
      use_jax: compute with JAX (jit-compatible, traced ``k`` allowed) instead of NumPy.

    Returns:
      A boolean array of ``scores``' shape, False at the ``k`` lowest scores (lower flat index
      first among ties).
    """
    return keep_lowest([scores], k, use_jax=use_jax)[0]
