"""Sparsity distributions: how a global sparsity target is split over the layers.

Every function returns a per-leaf sparsity mapping ``{path: sparsity}`` naming every selected
leaf, in the format the mask builders accept, so that

    magnitude_masks(params, erk_sparsity(params, 0.9))
    random_masks(key, params, uniform_sparsity(params, 0.9))

prune each layer at its own rate.  The per-leaf values are chosen so that the counts the builders
derive from them (``round(s * n)`` pruned entries in a leaf of ``n`` selected entries) add up to
exactly ``round(S * N)`` over all ``N`` selected entries for a global target ``S``: each value is
``k / n`` for an integer count ``k`` (for :func:`uniform_sparsity` this holds per leaf, which is
the definition of uniform).

* :func:`uniform_sparsity` — every layer at the same sparsity.
* :func:`erk_sparsity` — Erdos-Renyi (-Kernel) allocation of Mocanu et al. (2018) and Evci et
  al. (2020): layer density proportional to ``sum(shape) / prod(shape)``, so small layers keep
  more of their weights.
* :func:`custom_sparsity` — a user map, checked and completed.
* :func:`global_magnitude_sparsity` — the allocation a single global magnitude threshold picks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from prunejax._util import (
    PyTree,
    Where,
    check_fraction,
    check_number,
    flatten,
    per_leaf_values,
    select,
)
from prunejax.masks import magnitude_masks

__all__ = [
    "uniform_sparsity",
    "erk_sparsity",
    "custom_sparsity",
    "global_magnitude_sparsity",
    "pruned_counts",
]


def _selected(params: PyTree, where: Where | None) -> tuple[list[str], list[tuple[int, ...]]]:
    paths, leaves, _ = flatten(params)
    sel = select(paths, leaves, where)
    chosen = [
        (p, tuple(int(d) for d in np.shape(leaf)))
        for p, leaf, s in zip(paths, leaves, sel, strict=True)
        if s
    ]
    if not chosen:
        raise ValueError("no leaf is selected for pruning (check where=)")
    return [p for p, _ in chosen], [s for _, s in chosen]


def _global_target(sparsity: Any) -> float:
    if isinstance(sparsity, Mapping | list | tuple):
        raise TypeError("sparsity must be one global number here, not a per-leaf mapping")
    return float(check_fraction(sparsity, name="sparsity"))


def _to_map(paths: list[str], sizes: list[int], pruned: list[int]) -> dict[str, float]:
    return {p: (k / n if n else 0.0) for p, n, k in zip(paths, sizes, pruned, strict=True)}


def uniform_sparsity(
    params: PyTree, sparsity: float, *, where: Where | None = None
) -> dict[str, float]:
    """The same sparsity for every selected leaf.

    Zhu & Gupta (2017), "To prune, or not to prune", prune every layer at the same rate.  The
    values are exactly ``sparsity`` (each leaf prunes ``round(sparsity * n)`` entries).

    Args:
      params: any pytree of arrays (shapes are used, values are not).
      sparsity: target fraction in ``[0, 1]``.
      where: ``(path, leaf) -> bool`` selecting leaves (default: ``ndim >= 2``).

    Returns:
      ``{path: sparsity}`` for every selected leaf.
    """
    s = _global_target(sparsity)
    paths, _ = _selected(params, where)
    return {p: s for p in paths}


def _largest_remainder(ideal: np.ndarray, caps: np.ndarray, total: int) -> np.ndarray:
    """Integers ``<= caps`` summing to ``total``, closest to the real ``ideal`` allocation."""
    base = np.minimum(np.floor(ideal).astype(np.int64), caps)
    rest = total - int(base.sum())
    frac = ideal - base
    # largest fractional part first; ties by leaf order
    order = sorted(range(len(ideal)), key=lambda i: (-frac[i], i))
    while rest > 0:
        progressed = False
        for i in order:
            if rest == 0:
                break
            if base[i] < caps[i]:
                base[i] += 1
                rest -= 1
                progressed = True
        if not progressed:  # pragma: no cover - total <= caps.sum() is checked by callers
            raise AssertionError("allocation exceeds capacity")
    while rest < 0:
        for i in reversed(order):
            if rest == 0:
                break
            if base[i] > 0:
                base[i] -= 1
                rest += 1
    return base


def _erk_density(
    raw: np.ndarray, sizes: np.ndarray, saturated: np.ndarray, keep_total: int
) -> np.ndarray:
    """Per-layer density ``eps * raw`` with ``eps`` solved so the kept entries total
    ``keep_total``; layers whose density would exceed 1 (and those already ``saturated``) are
    made dense and ``eps`` is solved again over the others."""
    while True:
        free = ~saturated
        budget = keep_total - int(sizes[saturated].sum())
        denom = float(np.sum(raw[free] * sizes[free]))
        if not free.any() or denom == 0.0:
            return np.where(saturated, 1.0, 0.0)
        eps = budget / denom
        density = np.where(saturated, 1.0, eps * raw)
        over = free & (density > 1.0)
        if not over.any():
            return density
        saturated = saturated | over


def erk_sparsity(
    params: PyTree,
    sparsity: float,
    *,
    where: Where | None = None,
    power_scale: float = 1.0,
    dense: Any = None,
) -> dict[str, float]:
    """Erdos-Renyi-Kernel allocation of a global sparsity over the layers.

    Mocanu et al. (2018), "Scalable training of artificial neural networks with adaptive sparse
    connectivity inspired by network science" (Erdos-Renyi, ``(n_in + n_out) / (n_in * n_out)``
    for a dense layer) and Evci et al. (2020), "Rigging the Lottery: Making All Tickets Winners"
    (ERK: ``sum(shape) / prod(shape)`` for any kernel shape).  Layer ``l`` gets density
    ``eps * (sum(shape_l) / prod(shape_l)) ** power_scale``; ``eps`` is solved so that the kept
    weights total the global budget.  A layer whose density would exceed 1 is made dense and
    ``eps`` is solved again over the others (as in the RigL reference code), so no layer exceeds
    100% density.  Counts are then rounded with the largest-remainder method so that the pruned
    entries add up to exactly ``round(sparsity * N)``.

    Args:
      params: any pytree of arrays (shapes are used, values are not).
      sparsity: global target fraction of pruned entries over all selected leaves, in ``[0, 1]``.
      where: ``(path, leaf) -> bool`` selecting leaves (default: ``ndim >= 2``); leaves that
        are not selected are not counted and not named in the result.
      power_scale: exponent on the Erdos-Renyi ratio (``0`` gives uniform, ``1`` is ERK).
      dense: an iterable of paths of selected leaves kept fully dense (sparsity 0); their
        entries count toward ``N`` but cannot be pruned, so the other leaves prune more.

    Returns:
      ``{path: sparsity}`` for every selected leaf; the values give exactly
      ``round(sparsity * N)`` pruned entries in all.

    Raises:
      ValueError: sparsity outside ``[0, 1]``; ``power_scale`` negative or not finite; a
        ``dense`` path that is not a selected leaf; a target the non-dense leaves cannot reach.
    """
    s = _global_target(sparsity)
    ps = check_number(power_scale, name="power_scale")
    if not (np.isfinite(ps) and ps >= 0):
        raise ValueError(f"power_scale must be a finite number >= 0, got {power_scale!r}")
    paths, shapes = _selected(params, where)
    sizes = np.array([int(np.prod(sh, dtype=np.int64)) for sh in shapes], np.int64)
    dense_set = set() if dense is None else {str(d) for d in dense}
    unknown = sorted(dense_set - set(paths))
    if unknown:
        raise ValueError(f"dense names {unknown}, which are not selected leaves of params")
    total = int(sizes.sum())
    n_prune = int(np.round(np.float64(s) * total))
    is_dense = np.array([p in dense_set for p in paths])
    prunable = int(sizes[~is_dense].sum())
    if n_prune > prunable:
        raise ValueError(
            f"sparsity {s} asks for {n_prune} pruned entries but only {prunable} entries are "
            "outside the dense leaves"
        )
    raw = (
        np.array(
            [float(np.sum(sh)) / float(np.prod(sh)) if np.prod(sh) else 0.0 for sh in shapes],
            np.float64,
        )
        ** ps
    )
    density = _erk_density(raw, sizes, is_dense | (sizes == 0), total - n_prune)
    ideal_pruned = sizes * (1.0 - density)
    caps = np.where(is_dense, 0, sizes)
    ideal_pruned = np.clip(ideal_pruned, 0.0, caps.astype(np.float64))
    pruned = _largest_remainder(ideal_pruned, caps, n_prune)
    return _to_map(paths, [int(n) for n in sizes], [int(k) for k in pruned])


def custom_sparsity(
    params: PyTree, mapping: Any, *, where: Where | None = None, default: float = 0.0
) -> dict[str, float]:
    """A user-chosen per-layer map, validated and completed to name every selected leaf.

    Accepts the forms of :func:`prunejax._util.per_leaf_values`: ``{"Dense_0/kernel": 0.95}``,
    prefixes (``{"Dense_0": 0.95}``), nested dicts, or a list such as ``[0.9, None, 0.8, None]``
    for a Keras weight list.

    Args:
      params: any pytree of arrays.
      mapping: the per-leaf sparsities.
      where: ``(path, leaf) -> bool`` selecting leaves (default: ``ndim >= 2``).
      default: sparsity of selected leaves the map does not name.

    Returns:
      ``{path: sparsity}`` for every selected leaf.

    Raises:
      ValueError: the map names a missing or unselected leaf, or a value outside ``[0, 1]``.
    """
    d = float(check_fraction(default, name="default"))
    paths, leaves, _ = flatten(params)
    sel = select(paths, leaves, where)
    values = per_leaf_values(
        mapping,
        paths,
        sel,
        name="sparsity",
        check=lambda v, p: float(check_fraction(v, name="sparsity", path=p)),
    )
    return {p: (d if v is None else v) for p, v, s in zip(paths, values, sel, strict=True) if s}


def global_magnitude_sparsity(
    params: PyTree, sparsity: float, *, where: Where | None = None
) -> dict[str, float]:
    """The per-layer allocation chosen by one global magnitude threshold.

    Global magnitude pruning (e.g. Frankle & Carbin 2019 for convolutional nets; Blalock et al.
    2020, "What is the State of Neural Network Pruning?") ranks all selected weights together.
    This returns how many entries of each leaf that ranking prunes, as a per-leaf map:
    ``magnitude_masks(params, global_magnitude_sparsity(params, s))`` equals
    ``magnitude_masks(params, s, scope="global")`` exactly (ties included).

    Args:
      params: any pytree of arrays (the values decide the allocation).
      sparsity: global fraction in ``[0, 1]``.
      where: ``(path, leaf) -> bool`` selecting leaves (default: ``ndim >= 2``).

    Returns:
      ``{path: sparsity}`` for every selected leaf.
    """
    s = _global_target(sparsity)
    masks = magnitude_masks(params, s, scope="global", where=where)
    paths, leaves, _ = flatten(params)
    sel = select(paths, leaves, where)
    mleaves = flatten(masks, what="masks")[1]
    out = {}
    for p, m, ok in zip(paths, mleaves, sel, strict=True):
        if ok:
            n = int(np.size(m))
            out[p] = (n - int(np.count_nonzero(np.asarray(m)))) / n if n else 0.0
    return out


def pruned_counts(params: PyTree, sparsity: Any, *, where: Where | None = None) -> dict[str, int]:
    """The number of entries each selected leaf prunes at ``sparsity`` (a number or a map).

    Uses the builders' rule ``round(s * n)`` (half-to-even); leaves a map does not name prune 0.

    Args:
      params: any pytree of arrays (shapes are used, values are not).
      sparsity: a fraction in ``[0, 1]`` or a per-leaf mapping of them.
      where: ``(path, leaf) -> bool`` selecting leaves (default: ``ndim >= 2``).

    Returns:
      ``{path: count}`` for every selected leaf.
    """
    paths, leaves, _ = flatten(params)
    sel = select(paths, leaves, where)
    values = per_leaf_values(
        sparsity,
        paths,
        sel,
        name="sparsity",
        check=lambda v, p: float(check_fraction(v, name="sparsity", path=p)),
    )
    return {
        p: (0 if v is None else int(np.round(np.float64(v) * np.size(leaf))))
        for p, leaf, v, s in zip(paths, leaves, values, sel, strict=True)
        if s
    }
