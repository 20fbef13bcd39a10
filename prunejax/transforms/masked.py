"""Training with fixed masks, and the masking helpers every transformation here shares.

:func:`masked` wraps any optimizer so that, for FIXED masks, the updates are zero at pruned
entries AND the optimizer state (Adam moments, momentum traces, anything with the params'
structure) is kept zero there.  Pruned weights that start at zero stay exactly zero; a weight
that is regrown later starts with clean moments.

Note: ``optax.masked`` is a different thing (it selects which *leaves* an optimizer applies to);
these transformations mask individual *entries*.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunejax._util import PyTree, check_same_structure, path_str
from prunejax.masks import place_like

__all__ = ["MaskedState", "masked", "mask_state", "check_like_masks"]


def check_inner(inner: Any) -> None:
    """Check the optimizer a transformation here wraps.

    Args:
      inner: the wrapped optimizer.

    Raises:
      TypeError: ``inner`` is not an ``optax.GradientTransformation``.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(f"inner must be an optax.GradientTransformation, got {type(inner)!r}")


def as_bool_masks(masks: PyTree) -> PyTree:
    """Masks as JAX booleans.

    Args:
      masks: a pytree of mask arrays (NumPy or JAX).

    Returns:
      The same tree with every leaf a JAX boolean array.
    """
    return jax.tree_util.tree_map(lambda m: jnp.asarray(m, jnp.bool_), masks)


def check_like_masks(tree: PyTree, masks: PyTree, *, what: str = "updates") -> None:
    """Check that ``tree`` has the masks' tree structure and, leaf by leaf, their shapes.

    Shapes are static, so this also runs (once, at trace time) under ``jax.jit``.  Without it a
    gradient of shape ``(1, 6)`` would broadcast against an ``(8, 6)`` mask and come back
    ``(8, 6)`` without complaint.

    Args:
      tree: a params-shaped tree (gradients, updates, params).
      masks: boolean masks (True = kept).
      what: the tree's name in error messages.

    Raises:
      ValueError: the structures differ, or a leaf's shape differs from its mask's (the message
        names the leaf).
    """
    flat_m, def_m = jax.tree_util.tree_flatten_with_path(masks)
    flat_t, def_t = jax.tree_util.tree_flatten_with_path(tree)
    if def_t != def_m:
        mpaths = [path_str(kp) for kp, _ in flat_m]
        tpaths = [path_str(kp) for kp, _ in flat_t]
        missing = [p for p in mpaths if p not in set(tpaths)][:5]
        extra = [p for p in tpaths if p not in set(mpaths)][:5]
        raise ValueError(
            f"{what} tree does not match the masks tree (missing {missing}, unexpected "
            f"{extra}; {def_t} vs {def_m})"
        )
    for (kp, x), (_, m) in zip(flat_t, flat_m, strict=True):
        if np.shape(x) != np.shape(m):
            raise ValueError(
                f"{what} leaf {path_str(kp)!r} has shape {np.shape(x)} but its mask has "
                f"{np.shape(m)}; shapes must match exactly (no broadcasting)"
            )


def zero_where_pruned(tree: PyTree, masks: PyTree, *, what: str = "updates") -> PyTree:
    """Zero a params-shaped tree (gradients, updates, a moment) at pruned entries.

    Args:
      tree: a pytree with the masks' structure and shapes.
      masks: boolean masks (True = kept).
      what: the tree's name in error messages.

    Returns:
      ``where(mask, x, 0)`` leaf by leaf.

    Raises:
      ValueError: ``tree`` does not match the masks (structure or a leaf's shape).
    """
    check_like_masks(tree, masks, what=what)
    return jax.tree_util.tree_map(
        lambda x, m: jnp.where(place_like(m, x, tie=False), x, jnp.zeros_like(x)), tree, masks
    )


def updates_to_pruned_zero(updates: PyTree, params: PyTree, masks: PyTree) -> PyTree:
    """Updates that leave every pruned weight exactly zero after ``optax.apply_updates``.

    Args:
      updates: the inner optimizer's updates.
      params: the current params.
      masks: boolean masks (True = kept).

    Returns:
      ``updates`` at kept entries and ``-param`` at pruned ones, so that ``params + updates``
      is exactly zero there (``p + (-p) == 0`` in IEEE arithmetic).

    Raises:
      ValueError: ``updates`` or ``params`` does not match the masks.
    """
    check_like_masks(updates, masks, what="updates")
    check_like_masks(params, masks, what="params")
    return jax.tree_util.tree_map(
        lambda u, p, m: jnp.where(
            place_like(m, u, tie=False), u, (jnp.zeros_like(p) - p).astype(u.dtype)
        ),
        updates,
        params,
        masks,
    )


def mask_state(state: Any, masks: PyTree) -> Any:
    """Zero every optimizer-state subtree that has the params' structure, at pruned entries.

    A subtree is "per-parameter" (Adam's ``mu``/``nu``, a momentum trace, ...) when its tree
    structure equals the masks' and every leaf has the mask leaf's shape; scalars such as step
    counts and unrelated leaves are left untouched.

    Args:
      state: any optax state.
      masks: boolean pytree (True = kept) with the params' structure.

    Returns:
      The state with per-parameter subtrees zeroed where the masks are False.
    """
    mask_def = jax.tree_util.tree_structure(masks)
    mask_leaves = jax.tree_util.tree_leaves(masks)

    def like_params(x: Any) -> bool:
        if jax.tree_util.tree_structure(x) != mask_def:
            return False
        leaves = jax.tree_util.tree_leaves(x)
        return all(
            hasattr(a, "shape") and tuple(a.shape) == tuple(np.shape(m))
            for a, m in zip(leaves, mask_leaves, strict=True)
        )

    def fix(x: Any) -> Any:
        return zero_where_pruned(x, masks) if like_params(x) else x

    return jax.tree_util.tree_map(fix, state, is_leaf=like_params)


class MaskedState(NamedTuple):
    """State of :func:`masked`: the wrapped optimizer's state (zero at pruned entries)."""

    inner_state: Any


def masked(inner: optax.GradientTransformation, masks: PyTree) -> optax.GradientTransformation:
    """Train with fixed masks: updates and optimizer state are zero at pruned entries.

    The incoming gradients are zeroed at pruned entries before ``inner`` sees them, and
    ``inner``'s updates are zeroed there again (weight decay, for instance, adds a multiple of
    the params).  Every per-parameter leaf of ``inner``'s state is zeroed at pruned entries at
    ``init``; from then on gradient statistics (Adam's moments, momentum) stay exactly zero there
    because they only ever accumulate zero gradients.  (State computed from the params rather
    than the gradients is not re-zeroed each step; :func:`mask_state` does that on demand.)  Params
    that are zero at pruned entries (``apply_masks(params, masks)``) therefore stay exactly zero.
    This is the masked retraining of Han et al. (2015), "Learning both Weights and Connections for
    Efficient Neural Networks".

    Put ``masked`` outermost, around the whole optimizer including weight decay (see
    :mod:`prunejax.transforms`): ``masked(optax.adamw(1e-3, weight_decay=1e-4), masks)``.

    Args:
      inner: the optimizer to wrap (any ``optax.GradientTransformation``).
      masks: boolean pytree with the params' structure (True = kept), NumPy or JAX.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`MaskedState`.

    Raises:
      ValueError/TypeError (at ``init``): the masks do not match the params leaf for leaf, or
        are not boolean.
      ValueError (at ``update``, at trace time under ``jit``): the updates (or params) do not
        have the masks' tree structure and exact leaf shapes; nothing is broadcast.
    """
    check_inner(inner)
    masks = jax.tree_util.tree_map(jnp.asarray, masks)

    def init_fn(params: PyTree) -> MaskedState:
        check_same_structure(params, masks, what="masks")
        return MaskedState(mask_state(inner.init(params), masks))

    def update_fn(
        updates: PyTree, state: MaskedState, params: PyTree | None = None
    ) -> tuple[PyTree, MaskedState]:
        # The inner optimizer only ever sees zero gradients at pruned entries, so gradient
        # statistics that start at zero (Adam's moments, momentum traces) stay exactly zero
        # there without re-masking the state every step (which cost ~6% of a LeNet step).
        updates = zero_where_pruned(updates, masks)
        if params is not None:
            check_like_masks(params, masks, what="params")
        new_updates, inner_state = inner.update(updates, state.inner_state, params)
        new_updates = zero_where_pruned(new_updates, masks, what="inner optimizer's updates")
        return new_updates, MaskedState(inner_state)

    return optax.GradientTransformation(init_fn, update_fn)
