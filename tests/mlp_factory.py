"""A pruned MLP of given widths and per-layer densities, for the io and report tests."""

import numpy as np


def make_mlp(sizes, densities, seed=0, kind="flax"):
    """Flax dict (``kind="flax"``) or Keras list of magnitude-pruned layers with biases."""
    rng = np.random.default_rng(seed)
    layers = []
    for (a, b), d in zip(zip(sizes[:-1], sizes[1:], strict=True), densities, strict=True):
        w = (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)
        if d < 1.0:
            thr = np.quantile(np.abs(w), 1 - d)
            w = np.where(np.abs(w) >= thr, w, 0).astype(np.float32)
        layers.append((w, rng.normal(size=b).astype(np.float32) * 0.1))
    if kind == "flax":
        return {f"Dense_{i}": {"kernel": w, "bias": b} for i, (w, b) in enumerate(layers)}
    return [x for wb in layers for x in wb]
