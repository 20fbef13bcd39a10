"""The MLP that runs dense, masked, compacted or sparse kernels.

``MLP`` is the Flax module (default LeNet-300-100); its layers fetch stored params without
checking their shape, so one module class runs every form of the pruned weights.

``mlp_apply`` is the functional forward pass every stage agrees on: for each dense layer found by
``prunejax._util.dense_layers`` (in forward order) it computes ``x @ kernel + bias`` and applies
``activation`` between layers (not after the last).  Because it only uses ``x @ kernel``, any
kernel object that supports the matmul (a dense array, a ``jax.experimental.sparse`` matrix, or a
prunejax sparse kernel) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from prunejax._util import dense_layers, is_matrix_object

__all__ = ["MLP", "MaskableDense", "mlp_apply"]


def mlp_apply(
    params: Any,
    x: jax.Array,
    *,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
) -> jax.Array:
    """Forward pass of an MLP stored as any params pytree.

    Args:
      params: Flax-style ``{"Dense_0": {"kernel", "bias"}, ...}``, a Keras-style list
        ``[W1, b1, W2, b2, ...]``, or any pytree ``prunejax._util.dense_layers`` understands.
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


class MaskableDense(nn.Module):
    """``x @ kernel + bias`` that accepts any stored kernel: dense, masked, compacted or sparse.

    At init the kernel has shape ``(in, features)`` (``lecun_normal``) and the bias is zeros.
    When the params already hold a kernel and bias, they are used as they are — whatever their
    shape (a compacted layer) or type (any kernel object supporting ``x @ W``, e.g. a
    ``jax.experimental.sparse.BCOO`` matrix) — so ``features`` only matters at init.
    """

    features: int
    use_bias: bool = True
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Any] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # self.param would check a stored value's shape against the initializer's and reject
        # compacted or sparse kernels, so existing params are fetched without that check.
        if self.has_variable("params", "kernel"):
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        y = x @ kernel
        if self.use_bias:
            if self.has_variable("params", "bias"):
                bias = self.get_variable("params", "bias")
            else:
                bias = self.param("bias", self.bias_init, (self.features,))
            y = y + bias
        return y


class MLP(nn.Module):
    """Multi-layer perceptron (default LeNet-300-100: 784-300-100-10) that runs pruned weights.

    The layers are named ``Dense_0``, ``Dense_1``, ... and store ``(in, out)`` kernels, the
    layout :mod:`prunejax.masks` and :func:`mlp_apply` understand.  The same module applies
    dense, masked (zeros in dense kernels), compacted (same dict, smaller shapes) or sparse
    params (kernels replaced by objects supporting ``x @ W``): the widths below only matter at
    ``init``.  LeNet-300-100 is the fully-connected network of LeCun et al. (1998) that Han et al.
    (2015) prune.

    Attributes:
      features: output width of each layer; the input width is taken from the data at init.
      dropout: dropout rate on the hidden activations during training (0 disables it).
      activation: nonlinearity between layers (not after the last).
    """

    features: Sequence[int] = (300, 100, 10)
    dropout: float = 0.0
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits for ``x`` of shape ``(batch, ...)`` (flattened to ``(batch, in)``).

        Args:
          x: inputs; every axis after the first is flattened.
          train: apply dropout (needs a ``"dropout"`` rng in ``apply``).

        Returns:
          Logits of shape ``(batch, features[-1])`` (or the compacted width).
        """
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        h = jnp.reshape(x, (x.shape[0], -1))
        n = len(self.features)
        for i, f in enumerate(self.features):
            h = MaskableDense(f, name=f"Dense_{i}")(h)
            if i < n - 1:
                h = self.activation(h)
                if self.dropout > 0.0:
                    h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return h

    @classmethod
    def from_params(cls, params: Any, **kwargs: Any) -> MLP:
        """An ``MLP`` whose widths are read from ``params`` (dense, compacted or sparse).

        Args:
          params: a Flax params dict ``{"Dense_0": {"kernel", "bias"}, ...}``.
          **kwargs: other attributes (``dropout``, ``activation``).

        Returns:
          The module; ``module.apply({"params": params}, x)`` runs the network.

        Raises:
          ValueError: ``params`` is not a ``Dense_i`` dict with 2-D kernels.
        """
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a Flax params dict, got {type(params).__name__}")
        names = sorted(
            (k for k in params if isinstance(k, str) and k.startswith("Dense_")),
            key=lambda k: int(k.split("_", 1)[1]) if k.split("_", 1)[1].isdigit() else -1,
        )
        expected = [f"Dense_{i}" for i in range(len(names))]
        if not names or names != expected or len(names) != len(params):
            raise ValueError(
                f"params must hold layers named Dense_0 .. Dense_n-1 only, got {sorted(params)}"
            )
        features = []
        for name in names:
            layer = params[name]
            if not isinstance(layer, Mapping) or "kernel" not in layer:
                raise ValueError(f"params[{name!r}] has no 'kernel'")
            shape = tuple(layer["kernel"].shape)
            if len(shape) != 2:
                raise ValueError(f"params leaf '{name}/kernel' must be 2-D, got shape {shape}")
            features.append(int(shape[1]))
        return cls(features=tuple(features), **kwargs)
