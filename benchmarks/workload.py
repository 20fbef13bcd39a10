"""What the suite measures: model shapes, the grid, random params, masks and the dense baseline.

Masks come from the library's builders (``pj.magnitude_masks``, ``pj.unit_masks``,
``pj.nm_masks``, ``pj.block_masks``); the dense baseline is ``pj.mlp_apply`` on dense
``(in, out)`` kernels, i.e. ``x @ W + b`` per layer with ReLU between, jitted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import prunejax as pj

MODELS: dict[str, tuple[int, ...]] = {
    # LeNet-300-100 (Han et al. 2015): 784-300-100-10.
    "lenet": (784, 300, 100, 10),
    # Wide MLP: three 4096x4096 weight matrices (4096-4096-4096-4096), ReLU between layers.
    "wide": (4096, 4096, 4096, 4096),
    # One 4096x4096 layer: a single large matmul.
    "layer": (4096, 4096),
    # Toy sizes for the smoke test (multiples of 16 so every granularity applies).
    "toy": (64, 48, 32, 16),
}

GRANULARITIES = ("unstructured", "unit", "2:4", "block16")
SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
BATCHES = (1, 32, 256)
# Han et al. 2015, Table 4: LeNet-300-100 keeps 8% / 9% / 26% of fc1 / fc2 / fc3.
HAN_LENET_DENSITY = (0.08, 0.09, 0.26)
# Default grid restrictions per model (overridden by explicit --sparsities / --granularities).
MODEL_DEFAULT_SPARSITIES: dict[str, tuple[float, ...]] = {"layer": (0.9, 0.99)}
MODEL_DEFAULT_GRANULARITIES: dict[str, tuple[str, ...]] = {"layer": ("unstructured", "block16")}

BLOCK = (16, 16)


def layer_names(dims: Sequence[int]) -> list[str]:
    """Flax layer names ``Dense_0 ... Dense_{n-1}`` of an MLP with widths ``dims``."""
    return [f"Dense_{i}" for i in range(len(dims) - 1)]


def tree_nbytes(tree: Any) -> int:
    """Bytes of every array leaf of ``tree`` (the data and indices of sparse matrices too)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return int(sum(int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize for a in leaves))


def init_params(dims: Sequence[int], seed: int) -> dict:
    """Glorot-normal MLP params in the Flax layout, kernels stored ``(in, out)``.

    Args:
      dims: layer widths, input first.
      seed: NumPy random seed.

    Returns:
      ``{"Dense_i": {"kernel": (in, out), "bias": (out,)}}`` of float32 NumPy arrays.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, (i, o) in zip(layer_names(dims), zip(dims[:-1], dims[1:], strict=True), strict=True):
        std = math.sqrt(2.0 / (i + o))
        params[name] = {
            "kernel": (rng.standard_normal((i, o), dtype=np.float32) * std),
            "bias": (rng.standard_normal(o, dtype=np.float32) * 0.01),
        }
    return params


def _ordered(params: dict, leaf: str) -> list[Any]:
    return [params[k][leaf] for k in sorted(params, key=lambda s: int(s.split("_")[1]))]


def kernels(params: dict) -> list[Any]:
    """The kernels of Flax-layout MLP params, in layer order."""
    return _ordered(params, "kernel")


def biases(params: dict) -> list[Any]:
    """The biases of Flax-layout MLP params, in layer order."""
    return _ordered(params, "bias")


def check_dense_layout(params: dict, dims: Sequence[int]) -> None:
    """The dense baseline must run ``x @ W`` with W stored ``(in, out)``, C-contiguous.

    ``x @ W.T`` with W stored ``(out, in)`` is ~14x slower on XLA CPU at batch 1 and would
    inflate every sparse speedup.

    Args:
      params: Flax-layout MLP params (NumPy).
      dims: the layer widths they should have.

    Raises:
      AssertionError: a kernel is not ``(in, out)`` or not C-contiguous.
    """
    for k, (i, o) in zip(kernels(params), zip(dims[:-1], dims[1:], strict=True), strict=True):
        if k.shape != (i, o):
            raise AssertionError(f"dense baseline kernel has shape {k.shape}, expected (in, out)")
        if not k.flags.c_contiguous:
            raise AssertionError("dense baseline kernel is not C-contiguous (in, out)")


def build_masks(params: dict, granularity: str, sparsity: float | dict) -> dict:
    """Masks of one cell from the library's builders, as bool NumPy arrays.

    Unit pruning leaves the last layer's output units alone (a classifier's outputs cannot be
    removed).

    Args:
      params: Flax-layout MLP params.
      granularity: one of ``GRANULARITIES``.
      sparsity: a fraction, or ``{layer name: fraction}`` (unstructured only).

    Returns:
      A bool mask pytree of ``params``' structure (True = kept).

    Raises:
      ValueError: unknown granularity, or shapes that do not fit it (e.g. not divisible into
        16x16 blocks).
    """
    last = f"Dense_{len(params) - 1}"

    def not_last(path: str, leaf: Any) -> bool:
        return np.ndim(leaf) >= 2 and not path.startswith(last + "/")

    if granularity == "unstructured":
        m = pj.magnitude_masks(params, sparsity, scope="layer")
    elif granularity == "unit":
        m = pj.unit_masks(params, sparsity, where=not_last)
    elif granularity == "2:4":
        m = pj.nm_masks(params, 2, 4)
    elif granularity == "block16":
        m = pj.block_masks(params, sparsity, block=BLOCK)
    else:
        raise ValueError(f"unknown granularity {granularity!r}")
    return jax.tree_util.tree_map(lambda a: np.asarray(a, bool), m)


def density(masks: dict) -> float:
    """Fraction of kernel entries kept (biases not counted)."""
    ks = kernels(masks)
    return float(sum(int(k.sum()) for k in ks) / sum(k.size for k in ks))


def mlp_forward(params: Any, x: jax.Array) -> jax.Array:
    """``pj.mlp_apply`` with ReLU between layers: the forward every jitted format runs."""
    return pj.mlp_apply(params, x, activation=jax.nn.relu)


# The dense baseline: x @ W + b per layer, W stored (in, out), ReLU between layers.
dense_forward = jax.jit(mlp_forward)
