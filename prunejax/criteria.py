"""Pruning criteria beyond magnitude: saliency (SNIP) and movement scores, as mask builders.

* :func:`score_masks` ranks ANY score pytree with the exact counting and tie rules of
  :func:`prunejax.masks.magnitude_masks` (``round(s * n)`` pruned, ties by flat index, lower
  index pruned first), keeping the entries with the HIGHEST scores.
* :func:`snip_scores` / :func:`snip_masks` / :func:`snip_masks_from_batch`: connection
  sensitivity ``|w * dL/dw|`` of Lee, Ajanthan & Torr (2019), "SNIP: Single-shot Network Pruning
  based on Connection Sensitivity", computed from one batch at initialisation.
* :func:`movement` / :func:`movement_scores` / :func:`movement_masks`: movement pruning of Sanh,
  Wolf & Rush (2020), "Movement Pruning: Adaptive Sparsity by Fine-Tuning".  The scores
  ``S = -sum_t w_t * g_t`` are accumulated inside the optimizer state by an optax transformation;
  weights moving away from zero get high scores, weights moving toward zero low ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunejax._util import (
    PyTree,
    Where,
    check_number,
    check_same_structure,
    find_instances,
    find_state,
    flatten,
    is_jax,
    select,
)
from prunejax.masks import magnitude_masks

__all__ = [
    "score_masks",
    "snip_scores",
    "snip_masks",
    "snip_masks_from_batch",
    "MovementState",
    "movement",
    "movement_scores",
    "movement_masks",
]


def score_masks(
    scores: PyTree,
    sparsity: Any,
    *,
    scope: str = "layer",
    where: Where | None = None,
) -> PyTree:
    """Keep the entries with the highest scores; prune the fraction ``sparsity`` with the lowest.

    Counting and ties follow :func:`prunejax.masks.magnitude_masks` (which ranks ``|score|``):
    exactly ``round(s * n)`` entries of each selected leaf (``scope="layer"``) or of all
    selected leaves (``scope="global"``) are pruned, lower flat index first among equal scores.
    Signed scores are shifted by their minimum (per leaf, or over all selected leaves for the
    global scope) so that the order is kept; the shift is exact unless scores span many orders
    of magnitude, where float rounding can merge nearly equal scores into a tie.

    Args:
      scores: a pytree of finite real arrays (the structure of the params they rank).
      sparsity: fraction in ``[0, 1]``, a number or (``scope="layer"``) a per-leaf mapping such
        as :func:`prunejax.distributions.erk_sparsity` returns.
      scope: ``"layer"`` or ``"global"``.
      where: ``(path, leaf) -> bool`` selecting leaves (default: ``ndim >= 2``).

    Returns:
      Boolean masks with the structure of ``scores`` (True = kept).
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    paths, leaves, treedef = flatten(scores, what="scores")
    sel = select(paths, leaves, where)
    use_jax = any(is_jax(x) for x in leaves)
    xp = jnp if use_jax else np
    for p, leaf in zip(paths, leaves, strict=True):
        dt = np.result_type(leaf) if not is_jax(leaf) else leaf.dtype
        if not (np.issubdtype(dt, np.floating) or np.issubdtype(dt, np.integer)):
            raise TypeError(f"scores leaf {p!r} has dtype {dt}, expected a real number type")
    if scope == "global":
        chosen = [xp.min(x) for x, s in zip(leaves, sel, strict=True) if s and np.size(x)]
        lo = xp.min(xp.stack(chosen)) if chosen else 0.0
        lows = [lo] * len(leaves)
    else:
        lows = [xp.min(x) if np.size(x) else 0.0 for x in leaves]

    def shift(x: Any, lo: Any, s: bool) -> Any:
        if not s:
            return x
        x = xp.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64 if not use_jax else jnp.float32)
        return x - xp.minimum(xp.asarray(lo), 0).astype(x.dtype)

    shifted = [shift(x, lo, s) for x, lo, s in zip(leaves, lows, sel, strict=True)]
    tree = jax.tree_util.tree_unflatten(treedef, shifted)
    return magnitude_masks(tree, sparsity, scope=scope, where=where)


# ----------------------------------------------------------------------------- SNIP


def snip_scores(params: PyTree, grads: PyTree) -> PyTree:
    """Connection sensitivity ``|w * g|`` (Lee et al. 2019, SNIP).

    For a mask variable ``c`` multiplying each weight (``w * c``), ``dL/dc`` at ``c = 1`` equals
    ``w * dL/dw``; SNIP keeps the connections with the largest ``|dL/dc|``.

    Args:
      params: any pytree of arrays.
      grads: gradients of the loss with respect to ``params`` (same structure and shapes).

    Returns:
      A pytree of non-negative scores with the structure of ``params``.
    """
    _, leaves, gleaves, treedef = check_same_structure(
        params, grads, what="grads", check_bool=False
    )
    out = []
    for w, g in zip(leaves, gleaves, strict=True):
        xp = jnp if (is_jax(w) or is_jax(g)) else np
        out.append(xp.abs(xp.asarray(w) * xp.asarray(g)))
    return jax.tree_util.tree_unflatten(treedef, out)


def snip_masks(
    params: PyTree,
    grads: PyTree,
    sparsity: Any,
    *,
    scope: str = "global",
    where: Where | None = None,
) -> PyTree:
    """SNIP masks: keep the connections with the largest ``|w * dL/dw|``.

    Lee, Ajanthan & Torr (2019), "SNIP: Single-shot Network Pruning based on Connection
    Sensitivity": prune once at initialisation, before training, from the gradient of one batch.
    The paper ranks all layers together, hence ``scope="global"`` by default.

    Args:
      params: any pytree of arrays (typically the initial params).
      grads: ``dL/dparams`` on one batch, same structure.
      sparsity: fraction in ``[0, 1]``; with ``scope="layer"`` also a per-leaf mapping (e.g.
        :func:`prunejax.distributions.erk_sparsity`).
      scope: ``"global"`` (one ranking over all selected leaves) or ``"layer"``.
      where: ``(path, leaf) -> bool`` selecting leaves (default: ``ndim >= 2``).

    Returns:
      Boolean masks (True = kept) with the structure of ``params``.
    """
    return score_masks(snip_scores(params, grads), sparsity, scope=scope, where=where)


def snip_masks_from_batch(
    loss_fn: Callable[[PyTree, Any], Any],
    params: PyTree,
    batch: Any,
    sparsity: Any,
    *,
    scope: str = "global",
    where: Where | None = None,
) -> PyTree:
    """SNIP masks from a loss function and one batch: ``snip_masks(params, grad(loss_fn)(...))``.

    Args:
      loss_fn: ``(params, batch) -> scalar loss``, differentiable with ``jax.grad``.
      params: the params to prune (typically at initialisation).
      batch: whatever ``loss_fn`` takes as its second argument.
      sparsity, scope, where: as in :func:`snip_masks`.

    Returns:
      Boolean masks (True = kept) with the structure of ``params``.
    """
    jparams = jax.tree_util.tree_map(jnp.asarray, params)
    grads = jax.grad(loss_fn)(jparams, batch)
    return snip_masks(jparams, grads, sparsity, scope=scope, where=where)


# ----------------------------------------------------------------------------- movement


class MovementState(NamedTuple):
    """State of :func:`movement`: the accumulated scores ``-sum_t w_t * g_t``."""

    scores: PyTree


def movement(*, scale: float = 1.0) -> optax.GradientTransformation:
    """Accumulate movement scores ``S += -scale * w * g`` in the optimizer state.

    Sanh, Wolf & Rush (2020), "Movement Pruning: Adaptive Sparsity by Fine-Tuning": the score of
    a weight is ``-sum_t (dL/dw)_t * w_t``; it grows for weights that training pushes away from
    zero.  The transformation passes the updates through unchanged, so put it FIRST in a chain,
    where the updates are still the raw gradients: ``optax.chain(movement(), optax.adam(1e-3))``
    (or inside :func:`prunejax.transforms.masked`).  Read the scores with
    :func:`movement_scores` and build masks with :func:`movement_masks`.

    Args:
      scale: multiplier of each step's contribution (Sanh et al. use the learning rate).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`MovementState`; ``update``
      needs ``params``.
    """
    scale = check_number(scale, name="scale")
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")

    def init_fn(params: PyTree) -> MovementState:
        return MovementState(
            jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        )

    def update_fn(
        updates: PyTree, state: MovementState, params: PyTree | None = None
    ) -> tuple[PyTree, MovementState]:
        if params is None:
            raise ValueError("movement().update needs params (scores are -w * g)")
        scores = jax.tree_util.tree_map(
            lambda s, w, g: s - scale * (jnp.asarray(w) * jnp.asarray(g)).astype(jnp.float32),
            state.scores,
            params,
            updates,
        )
        return updates, MovementState(scores)

    return optax.GradientTransformation(init_fn, update_fn)


def movement_scores(opt_state: Any) -> PyTree:
    """The movement scores held in an optimizer state that contains :func:`movement`.

    Args:
      opt_state: the state (possibly inside ``optax.chain``).

    Returns:
      The float32 scores pytree ``-scale * sum_t w_t * g_t``, with the params' structure.

    Raises:
      ValueError: ``opt_state`` holds no (or more than one) movement state.
    """
    return find_state(opt_state, MovementState, what="movement", build="movement()").scores


def movement_masks(
    scores: PyTree,
    sparsity: Any,
    *,
    scope: str = "layer",
    where: Where | None = None,
) -> PyTree:
    """Movement-pruning masks: keep the weights with the highest accumulated scores.

    Sanh, Wolf & Rush (2020), hard movement pruning (top-k of ``S``).  ``scores`` is what
    :func:`movement_scores` returns (or the optimizer state itself).

    Args:
      scores: the movement scores pytree, or an optimizer state containing :func:`movement`.
      sparsity, scope, where: as in :func:`score_masks`.

    Returns:
      Boolean masks (True = kept) with the structure of the params.
    """
    if find_instances(scores, MovementState):
        scores = movement_scores(scores)
    return score_masks(scores, sparsity, scope=scope, where=where)
