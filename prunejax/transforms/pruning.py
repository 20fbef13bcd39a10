"""Gradual pruning inside the optimizer: the masks are rebuilt from the params on a schedule.

:func:`pruning` recomputes the masks from the current params on a schedule (Zhu & Gupta 2017,
"To prune, or not to prune") inside the optimizer update: no hook to call after each step.  The
masks live in the optimizer state as a plain boolean pytree; read them with
:func:`current_masks`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from prunejax._util import PyTree, check_same_structure, find_state, is_int
from prunejax.masks import place_like
from prunejax.transforms.masked import (
    as_bool_masks,
    check_inner,
    check_like_masks,
    mask_state,
    updates_to_pruned_zero,
    zero_where_pruned,
)

__all__ = ["PruningState", "pruning", "current_masks", "current_sparsity"]


class PruningState(NamedTuple):
    """State of :func:`pruning`.

    Attributes:
      count: number of updates done so far (the schedule's step).
      masks: the current boolean masks, a pytree with the params' structure.
      sparsity: the target sparsity the masks were last built for.
      inner_state: the wrapped optimizer's state (zero at pruned entries).
    """

    count: jax.Array
    masks: PyTree
    sparsity: jax.Array
    inner_state: Any


def pruning(
    inner: optax.GradientTransformation,
    mask_fn: Callable[[PyTree, jax.Array], PyTree],
    schedule: Callable[[Any], Any],
    *,
    begin_step: int,
    end_step: int,
    update_every: int,
    initial_masks: PyTree | None = None,
) -> optax.GradientTransformation:
    """Gradual pruning inside the optimizer: re-mask on a schedule (Zhu & Gupta 2017).

    At every step ``t`` with ``begin_step <= t <= end_step`` and
    ``(t - begin_step) % update_every == 0`` (``t`` counts updates from 0), the masks are rebuilt
    from the current params by ``mask_fn(params, schedule(t))``.  The gradients and the inner
    updates are zeroed at pruned entries, the inner state is zeroed there, and at pruned entries
    the update is ``0 - param``, so that ``optax.apply_updates`` makes every pruned weight
    exactly zero (``p + (-p) == 0`` in IEEE arithmetic) — at the step a weight is pruned and at
    every step after.  Because pruned weights are zero, a magnitude-based ``mask_fn`` with a
    non-decreasing schedule never regrows them.

    Put ``pruning`` outermost, around the whole optimizer (see :mod:`prunejax.transforms`), and
    pass ``params`` to ``update``.

    Args:
      inner: the optimizer to wrap.
      mask_fn: ``(params, sparsity) -> masks``; it receives a traced float32 sparsity, e.g.
        ``lambda p, s: magnitude_masks(p, s)``.
      schedule: ``step -> sparsity``, e.g. :func:`prunejax.schedules.polynomial_sparsity`.
      begin_step: first re-masking step (``>= 0``).
      end_step: last step at which re-masking may happen (``>= begin_step``).
      update_every: re-mask every this many steps (``>= 1``).
      initial_masks: masks before the first re-masking; default all True.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`PruningState`.

    Raises:
      ValueError: bad step arguments; ``update`` called without ``params``, or with updates or
        params whose tree structure or leaf shapes differ from the masks' (nothing is
        broadcast).
      TypeError: ``inner`` is not a ``GradientTransformation``; ``mask_fn`` or ``schedule`` is
        not callable.
    """
    check_inner(inner)
    if not callable(mask_fn) or not callable(schedule):
        raise TypeError("mask_fn and schedule must be callables")
    _check_steps(begin_step, end_step, update_every)
    begin_step, end_step, update_every = int(begin_step), int(end_step), int(update_every)
    return optax.GradientTransformation(
        _pruning_init(inner, initial_masks),
        _pruning_update(inner, mask_fn, schedule, begin_step, end_step, update_every),
    )


def _check_steps(begin_step: Any, end_step: Any, update_every: Any) -> None:
    for name, v in (("begin_step", begin_step), ("end_step", end_step)):
        if not is_int(v) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if end_step < begin_step:
        raise ValueError(f"end_step ({end_step}) must be >= begin_step ({begin_step})")
    if not is_int(update_every) or update_every < 1:
        raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")


def _all_kept(p: Any) -> Any:
    """An all-True mask placed like the parameter (made shard by shard when it is concrete)."""
    if isinstance(p, jax.Array) and not isinstance(p, jax.core.Tracer):
        return jnp.ones(jnp.shape(p), jnp.bool_, device=p.sharding)
    return place_like(jnp.ones(jnp.shape(p), jnp.bool_), p)


def _pruning_init(
    inner: optax.GradientTransformation, initial_masks: PyTree | None
) -> Callable[[PyTree], PruningState]:
    def init_fn(params: PyTree) -> PruningState:
        if initial_masks is None:
            masks = jax.tree_util.tree_map(_all_kept, params)
        else:
            check_same_structure(params, initial_masks, what="masks")
            masks = as_bool_masks(initial_masks)
        return PruningState(
            count=jnp.zeros((), jnp.int32),
            masks=masks,
            sparsity=jnp.zeros((), jnp.float32),
            inner_state=mask_state(inner.init(params), masks),
        )

    return init_fn


def _pruning_update(
    inner: optax.GradientTransformation,
    mask_fn: Callable[[PyTree, jax.Array], PyTree],
    schedule: Callable[[Any], Any],
    begin_step: int,
    end_step: int,
    update_every: int,
) -> Callable[..., tuple[PyTree, PruningState]]:
    def update_fn(
        updates: PyTree, state: PruningState, params: PyTree | None = None
    ) -> tuple[PyTree, PruningState]:
        if params is None:
            raise ValueError("pruning(...).update needs params (it rebuilds masks from them)")
        check_like_masks(updates, state.masks, what="updates")
        check_like_masks(params, state.masks, what="params")
        t = state.count
        due = (t >= begin_step) & (t <= end_step) & ((t - begin_step) % update_every == 0)

        def remask(_: None) -> tuple[PyTree, jax.Array]:
            s = jnp.asarray(schedule(t), jnp.float32)
            return as_bool_masks(mask_fn(params, s)), s

        def keep(_: None) -> tuple[PyTree, jax.Array]:
            return state.masks, state.sparsity

        masks, sparsity = jax.lax.cond(due, remask, keep, None)
        updates = zero_where_pruned(updates, masks)
        inner_state = mask_state(state.inner_state, masks)
        new_updates, inner_state = inner.update(updates, inner_state, params)
        new_updates = updates_to_pruned_zero(new_updates, params, masks)
        # the inner state was zeroed at pruned entries above and saw zero gradients there
        return new_updates, PruningState(
            count=t + 1, masks=masks, sparsity=sparsity, inner_state=inner_state
        )

    return update_fn


def _pruning_state(opt_state: Any) -> PruningState:
    return find_state(opt_state, PruningState, what="pruning", build="pruning()")


def current_masks(opt_state: Any) -> PyTree:
    """The masks a :func:`pruning` transformation currently holds.

    Args:
      opt_state: the state of an optimizer that contains :func:`pruning` (possibly inside
        ``optax.chain``).

    Returns:
      The boolean masks pytree (True = kept), with the params' structure.

    Raises:
      ValueError: ``opt_state`` holds no (or more than one) pruning state.
    """
    return _pruning_state(opt_state).masks


def current_sparsity(opt_state: Any) -> jax.Array:
    """The target sparsity the current masks of a :func:`pruning` state were built for.

    Args:
      opt_state: as in :func:`current_masks`.

    Returns:
      The float32 scalar target of the last re-masking (0 before the first).

    Raises:
      ValueError: ``opt_state`` holds no (or more than one) pruning state.
    """
    return _pruning_state(opt_state).sparsity
