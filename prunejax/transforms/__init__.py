"""optax transformations that train with masks.

Each is an ``optax.GradientTransformation`` that wraps an inner optimizer and composes with
``optax.chain``; the masks are boolean pytrees with the params' structure (True = kept) and
live in the optimizer state, where the accessors below read them.

* :func:`masked` — fixed masks: updates and per-parameter optimizer state are zero at pruned
  entries (masked retraining, Han et al. 2015).  :class:`MaskedState`; :func:`mask_state`
  zeroes any optimizer state at pruned entries.
* :func:`pruning` — gradual pruning: the masks are rebuilt from the params on a schedule inside
  the update (Zhu & Gupta 2017).  :class:`PruningState`; read with :func:`current_masks` and
  :func:`current_sparsity`.
* :func:`set_sparse`, :func:`rigl`, :func:`dynamic_sparse` — dynamic sparse training at constant
  sparsity: drop by magnitude, grow at random (SET, Mocanu et al. 2018) or by gradient (RigL,
  Evci et al. 2020).  :class:`DSTState`; read with :func:`dst_masks`;
  :func:`cosine_drop_fraction` is RigL's drop schedule.

Chain order.  Put the mask transformation OUTERMOST, around the whole optimizer, including
weight decay: ``masked(optax.adamw(1e-3, weight_decay=1e-4), masks)`` or
``masked(optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9)), masks)``.
Anything chained AFTER it (``optax.chain(masked(...), optax.add_decayed_weights(...))``) acts on
the masked updates and can write non-zero values into pruned entries.

Note: ``optax.masked`` is a different thing (it selects which *leaves* an optimizer applies to);
these transformations mask individual *entries*.
"""

from prunejax.transforms.dst import (
    DSTState,
    cosine_drop_fraction,
    dst_masks,
    dynamic_sparse,
    rigl,
    set_sparse,
)
from prunejax.transforms.masked import MaskedState, mask_state, masked
from prunejax.transforms.pruning import PruningState, current_masks, current_sparsity, pruning

__all__ = [
    "DSTState",
    "MaskedState",
    "PruningState",
    "cosine_drop_fraction",
    "current_masks",
    "current_sparsity",
    "dst_masks",
    "dynamic_sparse",
    "mask_state",
    "masked",
    "pruning",
    "rigl",
    "set_sparse",
]
