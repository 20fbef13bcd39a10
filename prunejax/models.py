"""The MLP that runs dense, masked, compacted or sparse kernels.

``mlp_apply`` is the functional forward pass every stage agrees on: for each dense layer found by
``prunejax._tree.dense_layers`` (in forward order) it computes ``x @ kernel + bias`` and applies
``activation`` between layers (not after the last).  Because it only uses ``x @ kernel``, any
kernel object that supports the matmul (a dense array, a ``jax.experimental.sparse`` matrix, or a
prunejax sparse kernel) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from prunejax._tree import dense_layers, is_matrix_object

__all__ = ["mlp_apply"]


def mlp_apply(
    params: Any,
    x: jax.Array,
    *,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
) -> jax.Array:
    """Forward pass of an MLP stored as any params pytree.

    Args:
      params: Flax-style ``{"Dense_0": {"kernel", "bias"}, ...}``, a Keras-style list
        ``[W1, b1, W2, b2, ...]``, or any pytree ``prunejax._tree.dense_layers`` understands.
        Kernels may be dense arrays or sparse kernel objects supporting ``x @ W``.
      x: inputs of shape ``(batch, in_features)``.
      activation: elementwise nonlinearity between layers.

    Returns:
      The logits, shape ``(batch, out_features)``.
    """
    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_matrix_object)
    layers = dense_layers(params)
    h = jnp.asarray(x)
    for i, layer in enumerate(layers):
        h = h @ leaves[layer.kernel]
        if layer.bias is not None:
            h = h + leaves[layer.bias]
        if i < len(layers) - 1:
            h = activation(h)
    return h

