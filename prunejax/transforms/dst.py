"""Dynamic sparse training as optax transformations: SET and RigL.

The network is sparse from the first step and stays at exactly the same sparsity: every
``delta_t`` steps (until ``t_end``) a fraction of the active weights of each pruned leaf is
dropped and the same number of inactive connections is grown.

* :func:`set_sparse` — Sparse Evolutionary Training, Mocanu et al. (2018), "Scalable training
  of artificial neural networks with adaptive sparse connectivity inspired by network science":
  drop the smallest-magnitude active weights, grow at random.
* :func:`rigl` — Rigged Lottery, Evci et al. (2020), "Rigging the Lottery: Making All Tickets
  Winners": drop by magnitude, grow where the dense gradient is largest, with a cosine-decayed
  drop fraction.

Both wrap an inner optimizer; the update does everything, no hook is called between steps.  The
masks live in the optimizer state as a boolean pytree with the params' structure; read them with
:func:`dst_masks`.

Guarantees, at every step and for every pruned leaf (tested):

* the number of active (True) entries never changes: ``round(s * n)`` entries are pruned;
* the update at every inactive entry is ``-w``, so ``optax.apply_updates`` leaves exactly zero
  there (weights dropped at this step included);
* a connection grown at this step ends the step at exactly zero, and every per-parameter leaf of
  the inner optimizer's state (Adam's moments, momentum) is zero at grown, dropped and inactive
  entries, so a regrown weight starts fresh.

Put the transformation outermost, around the whole optimizer (weight decay included), and pass
``params`` to ``update``: ``tx = rigl(optax.adam(1e-3), 0.9, delta_t=100, t_end=7500)``.  The
params are pruned at the first update (the update is ``-w`` at inactive entries); to start from
exactly sparse params use ``apply_masks(params, dst_masks(tx.init(params)))``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypedDict, Unpack

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunejax._util import (
    PyTree,
    Where,
    check_fraction,
    check_same_structure,
    find_state,
    flatten,
    is_int,
    select,
)
from prunejax.masks import keep_lowest_k, place_like, random_masks
from prunejax.transforms.masked import (
    as_bool_masks,
    check_inner,
    check_like_masks,
    mask_state,
    updates_to_pruned_zero,
    zero_where_pruned,
)

__all__ = [
    "DSTState",
    "set_sparse",
    "rigl",
    "dynamic_sparse",
    "dst_masks",
    "cosine_drop_fraction",
]


class DSTState(NamedTuple):
    """State of :func:`set_sparse` / :func:`rigl`.

    Attributes:
      count: number of updates done so far.
      masks: the current boolean masks (True = active), a pytree with the params' structure.
      key: ``jax.random.PRNGKey``-style uint32 key of the random growth (SET).
      inner_state: the wrapped optimizer's state, zero at inactive and regrown entries.
    """

    count: jax.Array
    masks: PyTree
    key: jax.Array
    inner_state: Any


def cosine_drop_fraction(drop_fraction: float, t_end: int) -> Callable[[Any], Any]:
    """RigL's drop-fraction schedule ``alpha / 2 * (1 + cos(pi * t / t_end))`` (Evci et al. 2020).

    Args:
      drop_fraction: ``alpha``, the fraction at step 0, in ``[0, 1]``.
      t_end: the step where the fraction reaches 0 (``>= 1``).

    Returns:
      ``step -> fraction`` (float32 JAX scalar), usable on traced steps.
    """
    a = float(check_fraction(drop_fraction, name="drop_fraction"))
    if not is_int(t_end) or t_end < 1:
        raise ValueError(f"t_end must be an int >= 1, got {t_end!r}")
    t_end = int(t_end)

    def schedule(step: Any) -> Any:
        t = jnp.minimum(jnp.asarray(step, jnp.float32), float(t_end))
        return (0.5 * a * (1.0 + jnp.cos(jnp.pi * t / t_end))).astype(jnp.float32)

    return schedule


def _as_key(seed: Any) -> jax.Array:
    if is_int(seed):
        return jax.random.PRNGKey(int(seed))
    arr = seed
    if isinstance(arr, jax.Array) and jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(arr)
    arr = jnp.asarray(arr)
    if arr.dtype != jnp.uint32 or arr.shape != (2,):
        raise TypeError("seed must be an int or a jax.random key")
    return arr


def _drop_fraction_fn(
    drop_fraction: float | Callable[[Any], Any], drop_schedule: str, t_end: int
) -> Callable[[Any], Any]:
    """``step -> fraction``: the callable itself, or the named schedule of a number."""
    if callable(drop_fraction):
        return drop_fraction
    a = float(check_fraction(drop_fraction, name="drop_fraction"))
    if drop_schedule == "cosine":
        return cosine_drop_fraction(a, t_end)
    if drop_schedule == "constant":

        def frac_fn(step: Any) -> Any:
            return jnp.full((), a, jnp.float32) + 0.0 * jnp.asarray(step, jnp.float32)

        return frac_fn
    raise ValueError(f"drop_schedule must be 'cosine' or 'constant', got {drop_schedule!r}")


def dynamic_sparse(
    inner: optax.GradientTransformation,
    sparsity: Any = None,
    *,
    grow: str,
    delta_t: int,
    t_end: int,
    drop_fraction: float | Callable[[Any], Any] = 0.3,
    drop_schedule: str = "cosine",
    initial_masks: PyTree | None = None,
    where: Where | None = None,
    seed: Any = 0,
) -> optax.GradientTransformation:
    """Dynamic sparse training with magnitude drop and ``"random"`` (SET) or ``"gradient"``
    (RigL) growth; :func:`set_sparse` and :func:`rigl` are this with the papers' defaults.

    At every step ``t`` with ``0 < t < t_end`` and ``t % delta_t == 0``, in each selected leaf
    with ``a`` active entries, ``k = round(f(t) * a)`` (half-to-even) active weights with the
    smallest ``|w|`` are dropped (ties: lower flat index first) and ``k`` connections are grown
    among the entries inactive after the drop (just-dropped ones included): those with the
    largest ``|g|`` of the incoming (dense) gradient for ``"gradient"``, uniformly at random for
    ``"random"`` (ties: lower flat index first).  Grown connections start at zero with zero
    optimizer state and receive no update at the step they are grown.

    Args:
      inner: the optimizer to wrap.
      sparsity: fraction of pruned entries per selected leaf, a number or a per-leaf mapping
        (e.g. :func:`prunejax.distributions.erk_sparsity`); the initial masks are
        :func:`prunejax.masks.random_masks` at this sparsity.  Give this or ``initial_masks``.
      grow: ``"random"`` or ``"gradient"``.
      delta_t: steps between topology updates (``>= 1``).
      t_end: no topology update at or after this step (``>= 1``).
      drop_fraction: ``alpha`` in ``[0, 1]``, or a callable ``step -> fraction``.
      drop_schedule: with a number ``drop_fraction``: ``"cosine"`` (RigL,
        :func:`cosine_drop_fraction`) or ``"constant"`` (SET).
      initial_masks: boolean masks to start from instead of random ones.  Leaves that ``where``
        does not select keep their initial mask throughout (all True for random initial masks).
      where: ``(path, leaf) -> bool`` selecting the leaves that are sparse (default:
        ``ndim >= 2``); other leaves stay dense and are trained normally.
      seed: int or ``jax.random`` key for the initial masks and the random growth.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`DSTState`.

    Raises:
      ValueError/TypeError: bad arguments; at ``init``, masks that do not match the params;
        ``update`` without ``params``, or with updates or params whose tree structure or leaf
        shapes differ from the masks' (nothing is broadcast).
    """
    check_inner(inner)
    if grow not in ("random", "gradient"):
        raise ValueError(f"grow must be 'random' or 'gradient', got {grow!r}")
    for name, v in (("delta_t", delta_t), ("t_end", t_end)):
        if not is_int(v) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    delta_t, t_end = int(delta_t), int(t_end)
    if (sparsity is None) == (initial_masks is None):
        raise ValueError("give exactly one of sparsity and initial_masks")
    frac_fn = _drop_fraction_fn(drop_fraction, drop_schedule, t_end)
    key0 = _as_key(seed)
    return optax.GradientTransformation(
        _dst_init(inner, sparsity, initial_masks, where, key0),
        _dst_update(inner, grow, delta_t, t_end, frac_fn, where),
    )


def _dst_init(
    inner: optax.GradientTransformation,
    sparsity: Any,
    initial_masks: PyTree | None,
    where: Where | None,
    key0: jax.Array,
) -> Callable[[PyTree], DSTState]:
    def init_fn(params: PyTree) -> DSTState:
        flatten(params)  # validates the params tree
        if initial_masks is None:
            masks = random_masks(jax.random.fold_in(key0, 0), params, sparsity, where=where)
        else:
            check_same_structure(params, initial_masks, what="initial_masks")
            masks = initial_masks
        masks = as_bool_masks(masks)
        return DSTState(
            count=jnp.zeros((), jnp.int32),
            masks=masks,
            key=jax.random.fold_in(key0, 1),
            inner_state=mask_state(inner.init(params), masks),
        )

    return init_fn


def _regrow_leaf(
    w: Any, g: Any, m: Any, frac: jax.Array, grow: str, key: jax.Array, i: int
) -> tuple[jax.Array, jax.Array]:
    """One leaf's drop and grow: ``(new mask, grown entries)``, both of ``w``'s shape.

    Computed in the leaf's own shape (no flattening), so the masks keep its sharding.
    """
    m = jnp.asarray(m)
    n_active = jnp.sum(m, dtype=jnp.int32)
    k = jnp.round(frac * n_active.astype(jnp.float32)).astype(jnp.int32)
    k = jnp.clip(k, 0, n_active)
    absw = jnp.abs(jnp.asarray(w, jnp.float32))
    drop_score = jnp.where(m, absw, jnp.inf)
    after = m & keep_lowest_k(drop_score, k, True)
    if grow == "gradient":
        score = jnp.abs(jnp.asarray(g, jnp.float32))
    else:
        # drawn in the leaf's shape: the same numbers as a flat draw of its size
        score = place_like(jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(w)), w)
    neg = jnp.where(after, jnp.inf, -score)
    new_grown = ~keep_lowest_k(neg, k, True)
    return place_like(after | new_grown, w), place_like(new_grown, w)


def _topology(
    params: PyTree,
    grads: PyTree,
    masks: PyTree,
    frac_fn: Callable[[Any], Any],
    t: jax.Array,
    key: jax.Array,
    grow: str,
    where: Where | None,
) -> tuple[PyTree, PyTree]:
    """The masks after one drop-and-grow step, and the entries grown by it."""
    paths, leaves, treedef = flatten(params)
    sel = select(paths, leaves, where)
    gleaves = jax.tree_util.tree_leaves(grads)
    mleaves = jax.tree_util.tree_leaves(masks)
    frac = jnp.asarray(frac_fn(t), jnp.float32)
    new_masks, grown = [], []
    for i, (w, g, m, s) in enumerate(zip(leaves, gleaves, mleaves, sel, strict=True)):
        if not s or np.size(w) == 0:
            new_masks.append(m)
            grown.append(jnp.zeros_like(m, dtype=jnp.bool_))
            continue
        new_mask, new_grown = _regrow_leaf(w, g, m, frac, grow, key, i)
        new_masks.append(new_mask)
        grown.append(new_grown)
    return (
        jax.tree_util.tree_unflatten(treedef, new_masks),
        jax.tree_util.tree_unflatten(treedef, grown),
    )


def _dst_update(
    inner: optax.GradientTransformation,
    grow: str,
    delta_t: int,
    t_end: int,
    frac_fn: Callable[[Any], Any],
    where: Where | None,
) -> Callable[..., tuple[PyTree, DSTState]]:
    def update_fn(
        updates: PyTree, state: DSTState, params: PyTree | None = None
    ) -> tuple[PyTree, DSTState]:
        if params is None:
            raise ValueError("dynamic sparse training needs params in update (drop by |w|)")
        check_like_masks(updates, state.masks, what="updates")
        check_like_masks(params, state.masks, what="params")
        t = state.count
        due = (t > 0) & (t < t_end) & (t % delta_t == 0)
        step_key = jax.random.fold_in(state.key, t)

        def change(_: None) -> tuple[PyTree, PyTree]:
            return _topology(params, updates, state.masks, frac_fn, t, step_key, grow, where)

        def keep(_: None) -> tuple[PyTree, PyTree]:
            return state.masks, jax.tree_util.tree_map(jnp.zeros_like, state.masks)

        masks, grown = jax.lax.cond(due, change, keep, None)
        # entries trained at this step: active and not grown right now
        live = jax.tree_util.tree_map(lambda m, g: m & ~g, masks, grown)
        grads = zero_where_pruned(updates, live)
        # zeroed here, the state then only sees zero gradients at the entries not live
        inner_state = mask_state(state.inner_state, live)
        new_updates, inner_state = inner.update(grads, inner_state, params)
        new_updates = updates_to_pruned_zero(new_updates, params, live)
        return new_updates, DSTState(
            count=t + 1, masks=masks, key=state.key, inner_state=inner_state
        )

    return update_fn


class DSTOptions(TypedDict, total=False):
    """The keyword arguments that :func:`set_sparse` and :func:`rigl` pass on to
    :func:`dynamic_sparse` (documented there)."""

    drop_fraction: float | Callable[[Any], Any]
    drop_schedule: str
    initial_masks: PyTree | None
    where: Where | None
    seed: Any


def set_sparse(
    inner: optax.GradientTransformation,
    sparsity: Any = None,
    *,
    delta_t: int,
    t_end: int,
    **options: Unpack[DSTOptions],
) -> optax.GradientTransformation:
    """SET: Sparse Evolutionary Training (Mocanu et al. 2018).

    Every ``delta_t`` steps, drop the fraction ``drop_fraction`` (the paper's ``zeta = 0.3``,
    constant) of the active weights of each sparse leaf with the smallest magnitude and grow as
    many connections uniformly at random among the inactive ones.  See :func:`dynamic_sparse`
    for the exact rules and guarantees.

    Args:
      inner, sparsity, delta_t, t_end: as in :func:`dynamic_sparse`.
      **options: ``drop_fraction`` (``zeta``, default 0.3), ``drop_schedule`` (default
        ``"constant"``, SET's), ``initial_masks``, ``where``, ``seed`` (it also drives the random
        growth): as in :func:`dynamic_sparse`.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`DSTState`.
    """
    options.setdefault("drop_schedule", "constant")
    return dynamic_sparse(inner, sparsity, grow="random", delta_t=delta_t, t_end=t_end, **options)


def rigl(
    inner: optax.GradientTransformation,
    sparsity: Any = None,
    *,
    delta_t: int,
    t_end: int,
    **options: Unpack[DSTOptions],
) -> optax.GradientTransformation:
    """RigL: Rigging the Lottery (Evci et al. 2020).

    Every ``delta_t`` steps until ``t_end``, drop the fraction ``f(t)`` of the active weights of
    each sparse leaf with the smallest magnitude and grow as many connections where the dense
    gradient ``|dL/dw|`` is largest; ``f(t) = drop_fraction / 2 * (1 + cos(pi t / t_end))``.
    Grown weights start at zero with zeroed optimizer state.  Evci et al. use ``delta_t = 100``,
    ``drop_fraction = 0.3``, ``t_end`` = 75% of training and ERK sparsity
    (:func:`prunejax.distributions.erk_sparsity`).  See :func:`dynamic_sparse` for the exact
    rules and guarantees.

    Args:
      inner, sparsity, delta_t, t_end: as in :func:`dynamic_sparse`.
      **options: ``drop_fraction`` (``alpha``, default 0.3), ``drop_schedule`` (default
        ``"cosine"``, RigL's decay to 0 at ``t_end``), ``initial_masks``, ``where``, ``seed``:
        as in :func:`dynamic_sparse`.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`DSTState`.
    """
    return dynamic_sparse(inner, sparsity, grow="gradient", delta_t=delta_t, t_end=t_end, **options)


def dst_masks(opt_state: Any) -> PyTree:
    """The current masks of a :func:`set_sparse` / :func:`rigl` optimizer state.

    Args:
      opt_state: the state (possibly inside ``optax.chain``).

    Returns:
      The boolean masks pytree (True = active), with the params' structure.

    Raises:
      ValueError: ``opt_state`` holds no (or more than one) dynamic-sparse state.
    """
    state = find_state(opt_state, DSTState, what="dynamic-sparse", build="set_sparse() or rigl()")
    return state.masks
