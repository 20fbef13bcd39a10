"""Lottery tickets: iterative magnitude pruning (IMP) with weight rewinding, and its controls.

Frankle & Carbin (2019), "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural
Networks": train, prune the smallest-magnitude weights that are still kept, reset the surviving
weights to their initial values, and repeat.  Frankle, Dziugaite, Roy & Carbin (2020), "Linear
Mode Connectivity and the Lottery Ticket Hypothesis", rewind to the weights of an early step
``k`` instead of step 0.  The control that shows the initial values matter is the same mask with
a random re-initialisation (:func:`random_reinit`).

Everything here is a pure function of pytrees; the training itself is the caller's
``train_fn(params, masks) -> params``, for instance the MNIST app's :func:`prunejax.fit` with
:func:`prunejax.transforms.masked`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunejax._util import PyTree, Where, check_same_structure, flatten, is_jax
from prunejax.masks import apply_masks, combine, magnitude_masks

__all__ = [
    "LotteryRound",
    "rewind",
    "random_reinit",
    "imp_step",
    "lottery_ticket",
]


def rewind(rewind_params: PyTree, masks: PyTree) -> PyTree:
    """The ticket: the rewind-point values at kept entries, exactly zero at pruned ones.

    Args:
      rewind_params: the params at initialisation (Frankle & Carbin 2019) or at an early
        training step ``k`` (Frankle et al. 2020).
      masks: boolean masks (True = kept) with the params' structure.

    Returns:
      ``apply_masks(rewind_params, masks)``: bit-identical to ``rewind_params`` where kept.
    """
    return apply_masks(rewind_params, masks)


def random_reinit(
    key: jax.Array,
    masks: PyTree,
    init: PyTree | Callable[[jax.Array], PyTree],
) -> PyTree:
    """The random re-initialisation control: the same masks, fresh random values.

    Frankle & Carbin (2019) compare every ticket with the same sparse architecture re-sampled
    from the initialisation distribution.  ``init`` is either a function ``key -> params`` (the
    model's initialiser, called with ``key``) or a params pytree whose values are permuted within
    each leaf with ``key`` (the same empirical distribution per layer, no initialiser needed).

    Args:
      key: a ``jax.random`` key.
      masks: boolean masks (True = kept).
      init: ``key -> params`` or an initial params pytree.

    Returns:
      Fresh params with the masks applied (zero at pruned entries).
    """
    if callable(init):
        fresh = init(key)
    else:
        paths, leaves, treedef = flatten(init)
        out = []
        for i, leaf in enumerate(leaves):
            flat = jnp.asarray(leaf).reshape(-1)
            perm = jax.random.permutation(jax.random.fold_in(key, i), flat.shape[0])
            new = flat[perm].reshape(jnp.shape(leaf))
            out.append(new if is_jax(leaf) else np.asarray(new))
        fresh = jax.tree_util.tree_unflatten(treedef, out)
    check_same_structure(fresh, masks)
    return apply_masks(fresh, masks)


def imp_step(
    params: PyTree,
    masks: PyTree | None,
    sparsity: Any,
    *,
    scope: str = "layer",
    where: Where | None = None,
) -> PyTree:
    """One round of iterative magnitude pruning: prune the trained weights further.

    The new masks keep the largest-magnitude weights among those still kept: the trained
    params are masked first (pruned entries are zero and rank lowest), so a pruned weight never
    comes back; the result is intersected with ``masks``.  With a non-decreasing sparsity over
    rounds each leaf then has exactly ``round(s * n)`` pruned entries (layer scope).

    Args:
      params: the trained params of the previous round.
      masks: the previous round's masks (``None``: dense).
      sparsity: the new target, a number or a per-leaf mapping (at least the previous one).
      scope: ``"layer"`` or ``"global"`` (Frankle & Carbin prune fully-connected layers per
        layer, convolutional networks globally).
      where: ``(path, leaf) -> bool`` selecting leaves (default: ``ndim >= 2``).

    Returns:
      The new boolean masks (True = kept).
    """
    current = params if masks is None else apply_masks(params, masks)
    new = magnitude_masks(current, sparsity, scope=scope, where=where)
    return new if masks is None else combine(masks, new)


@dataclass
class LotteryRound:
    """One IMP round.

    Attributes:
      round: 1-based round number.
      sparsity: the round's target.
      masks: the ticket's masks.
      params: the ticket after training (``train_fn`` of the rewound ticket).
    """

    round: int
    sparsity: Any
    masks: PyTree
    params: PyTree


def lottery_ticket(
    train_fn: Callable[[PyTree, PyTree], PyTree],
    rewind_params: PyTree,
    sparsities: Sequence[Any],
    *,
    trained_params: PyTree | None = None,
    initial_masks: PyTree | None = None,
    scope: str = "layer",
    where: Where | None = None,
    on_round: Callable[[LotteryRound], None] | None = None,
) -> list[LotteryRound]:
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019).

    With ``trained`` the dense (or ``initial_masks``) network trained once, round ``r`` does::

        masks_r = imp_step(trained_{r-1}, masks_{r-1}, sparsities[r])
        trained_r = train_fn(rewind(rewind_params, masks_r), masks_r)

    Args:
      train_fn: ``(params, masks) -> trained params``; it must keep pruned entries at zero
        (e.g. train with :func:`prunejax.transforms.masked`).
      rewind_params: the rewind point: the initial params, or those of an early step ``k``
        (late rewinding; record them during the dense training and pass that training's result
        as ``trained_params``).
      sparsities: one target per round, non-decreasing (e.g.
        :func:`prunejax.schedules.iterative_sparsity` with ``per_round=0.2``).
      trained_params: the already-trained starting network; default
        ``train_fn(rewind(rewind_params, initial_masks), initial_masks)``.
      initial_masks: masks of the starting network (default: dense).
      scope, where: as in :func:`imp_step`.
      on_round: called with each :class:`LotteryRound` as soon as it is done.

    Returns:
      One :class:`LotteryRound` per sparsity.
    """
    if not sparsities:
        raise ValueError("sparsities is empty: give at least one round")
    masks = initial_masks
    if masks is None:
        masks = jax.tree_util.tree_map(lambda p: np.ones(np.shape(p), bool), rewind_params)
    trained = trained_params
    if trained is None:
        trained = train_fn(rewind(rewind_params, masks), masks)
    out = []
    for r, s in enumerate(sparsities, start=1):
        masks = imp_step(trained, masks, s, scope=scope, where=where)
        trained = train_fn(rewind(rewind_params, masks), masks)
        res = LotteryRound(round=r, sparsity=s, masks=masks, params=trained)
        out.append(res)
        if on_round is not None:
            on_round(res)
    return out
