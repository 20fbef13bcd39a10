"""Pruning recipes on top of :func:`prunejax.apps.mnist.fit`: iterative prune-retrain (Han et al.
2015) and gradual pruning during training (Zhu & Gupta 2017), and the per-layer budgets and mask
rules of Han et al.'s LeNet-300-100 result.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import prunejax as pj
from prunejax._util import PyTree, is_traced
from prunejax.apps.mnist.data import num_batches
from prunejax.apps.mnist.train import FitResult, LossFn, TrainConfig, fit, kernel_density

__all__ = [
    "HAN_DENSITIES",
    "MASK_METHODS",
    "RoundResult",
    "gradual_pruning",
    "iterative_pruning",
    "layer_densities",
    "mask_builder",
]

HAN_DENSITIES = (0.08, 0.09, 0.26)  # Han et al. 2015, Table 2 (LeNet-300-100)
MASK_METHODS = ("magnitude", "global", "threshold")

MaskFn = Callable[[PyTree, Any], PyTree]
EvalFn = Callable[[PyTree], dict[str, float]]
Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclasses.dataclass
class RoundResult:
    """One pruning round: the target, the masks, the retrained params and their test metrics."""

    round: int
    sparsity: Any
    masks: PyTree
    params: PyTree
    density: float
    test_error: float | None
    history: list[dict[str, float]]


def _default_mask_fn(params: PyTree, sparsity: Any) -> PyTree:
    return pj.magnitude_masks(params, sparsity)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if v is None:
        return None
    return float(v)


def _scale(sparsity: Any, f: Any) -> Any:
    if isinstance(sparsity, dict):
        return {k: _scale(v, f) for k, v in sparsity.items()}
    if isinstance(sparsity, list | tuple):
        return type(sparsity)(None if v is None else _scale(v, f) for v in sparsity)
    return f * sparsity


# ----------------------------------------------------------------------------- iterative


def _prune_round(
    params: PyTree, masks: PyTree | None, sparsity: Any, mask_fn: MaskFn
) -> tuple[PyTree, PyTree]:
    """New masks intersected with the old ones (nothing regrows), and the params masked."""
    new = mask_fn(params, sparsity)
    masks = new if masks is None else pj.combine(masks, new)
    masks = jax.tree_util.tree_map(np.asarray, masks)
    return pj.apply_masks(params, masks), masks


def iterative_pruning(
    loss_fn: LossFn,
    params: PyTree,
    data: tuple[np.ndarray, np.ndarray],
    *,
    sparsities: Sequence[Any],
    optimizer: Callable[[int], optax.GradientTransformation],
    config: TrainConfig,
    mask_fn: MaskFn = _default_mask_fn,
    eval_fn: EvalFn | None = None,
    retrain_loss: Callable[[float], LossFn] | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    run_config: dict | None = None,
    mesh: Mesh | None = None,
    augment: Augment | None = None,
) -> list[RoundResult]:
    """Iterative prune-retrain (Han et al. 2015; lottery-ticket rounds, Frankle & Carbin 2019).

    Round ``r`` builds ``mask_fn(params, sparsities[r])``, intersects it with the previous masks
    (a pruned weight never comes back), zeroes the pruned weights and retrains for
    ``config.epochs`` epochs with ``masked(optimizer(steps), masks)`` and seed
    ``config.seed + r``.

    Args:
      loss_fn, params, data: as in :func:`prunejax.apps.mnist.fit`.
      sparsities: one target per round, a number or a per-leaf map (e.g. from
        :func:`prunejax.schedules.iterative_sparsity`).
      optimizer: ``total_steps -> GradientTransformation`` for one round's retraining (Han
        retrains at a lower learning rate than the dense training).
      config: one round's retraining (its ``desc`` is replaced by ``"round r/n"``).
      mask_fn: ``(params, sparsity) -> masks``; default per-layer :func:`magnitude_masks`.
      eval_fn: ``params -> {"error": ..., ...}`` run after each round (``test_error``).
      retrain_loss: ``kept_fraction -> loss_fn`` to retrain a round with, e.g. Han et al.'s
        smaller dropout for a sparser network, ``D_r = D_o * sqrt(kept_fraction)``; default
        ``loss_fn``.
      on_round: called with each :class:`RoundResult` as soon as the round is done.
      checkpoint_dir: where each round's checkpoint ``round{r}.ckpt`` goes.
      resume, mesh, augment: as in :func:`prunejax.apps.mnist.fit`.
      run_config: settings stored in the checkpoints, with the round and its sparsity added.

    Returns:
      One :class:`RoundResult` per round.
    """
    if not sparsities:
        raise ValueError("sparsities is empty: give at least one round")
    steps = num_batches(len(data[0]), config.batch_size) * int(config.epochs)
    masks, results = None, []
    for r, s in enumerate(sparsities, start=1):
        params, masks = _prune_round(params, masks, s, mask_fn)
        kept = float(kernel_density(params))
        res = fit(
            loss_fn if retrain_loss is None else retrain_loss(kept),
            params,
            pj.masked(optimizer(max(steps, 1)), masks),
            data,
            dataclasses.replace(config, seed=config.seed + r, desc=f"round {r}/{len(sparsities)}"),
            checkpoint=None if checkpoint_dir is None else Path(checkpoint_dir) / f"round{r}.ckpt",
            resume=resume,
            run_config={**(run_config or {}), "round": r, "sparsity": _jsonable(s)},
            mesh=mesh,
            augment=augment,
        )
        params = res.params
        err = None if eval_fn is None else eval_fn(params)["error"]
        density = float(kernel_density(params))
        results.append(RoundResult(r, s, masks, params, density, err, res.history))
        if on_round is not None:
            on_round(results[-1])
    return results


# ----------------------------------------------------------------------------- gradual


def gradual_pruning(
    loss_fn: LossFn,
    params: PyTree,
    data: tuple[np.ndarray, np.ndarray],
    *,
    sparsity: Any,
    optimizer: Callable[[int], optax.GradientTransformation],
    config: TrainConfig,
    prune_fraction: float = 0.75,
    update_every: int = 100,
    power: float = 3.0,
    scope_fn: MaskFn | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    run_config: dict | None = None,
    mesh: Mesh | None = None,
    augment: Augment | None = None,
) -> tuple[PyTree, PyTree, FitResult]:
    """Gradual pruning during training (Zhu & Gupta 2017) with :func:`prunejax.pruning`.

    The masks are rebuilt every ``update_every`` steps over the first ``prune_fraction`` of the
    training, following ``polynomial_sparsity`` from 0 to the target; the remaining steps train
    with the final masks.

    Args:
      loss_fn, params, data, checkpoint, resume, run_config, mesh, augment: as in
        :func:`prunejax.apps.mnist.fit`.
      sparsity: final sparsity, a number or a per-leaf map ``{"Dense_0/kernel": 0.92, ...}``;
        every leaf follows the same polynomial curve scaled to its own target.
      optimizer: ``total_steps -> GradientTransformation``.
      config: the whole training (its ``desc`` is replaced by ``"gradual pruning"``).
      prune_fraction: fraction of the steps over which sparsity rises (in ``(0, 1]``).
      update_every: steps between mask updates.
      power: exponent of the polynomial schedule.
      scope_fn: ``(params, sparsity) -> masks``; default per-layer :func:`magnitude_masks`.

    Returns:
      ``(params, masks, fit_result)``.
    """
    if not 0.0 < float(prune_fraction) <= 1.0:
        raise ValueError(f"prune_fraction must be in (0, 1], got {prune_fraction!r}")
    builder = _default_mask_fn if scope_fn is None else scope_fn
    total = num_batches(len(data[0]), config.batch_size) * int(config.epochs)
    end = max(1, int(round(total * float(prune_fraction))) - 1)
    progress_of = pj.polynomial_sparsity(0.0, 1.0, begin_step=0, end_step=end, power=power)

    def mask_fn(p: PyTree, f: jax.Array) -> PyTree:
        return builder(p, _scale(sparsity, f))

    tx = pj.pruning(
        optimizer(max(total, 1)),
        mask_fn,
        progress_of,
        begin_step=0,
        end_step=end,
        update_every=update_every,
    )
    extra = {
        "gradual_sparsity": _jsonable(sparsity),
        "update_every": update_every,
        "prune_fraction": prune_fraction,
    }
    res = fit(
        loss_fn,
        params,
        tx,
        data,
        dataclasses.replace(config, desc="gradual pruning"),
        checkpoint=checkpoint,
        resume=resume,
        run_config={**(run_config or {}), **extra},
        mesh=mesh,
        augment=augment,
    )
    masks = jax.tree_util.tree_map(np.asarray, pj.current_masks(res.opt_state))
    return res.params, masks, res


# ----------------------------------------------------------------------------- Han's budgets


def layer_densities(
    sizes: Sequence[int],
    *,
    densities: Sequence[float] | None = None,
    target: float | None = None,
) -> tuple[float, ...]:
    """Per-layer final densities (fraction of weights kept).

    Args:
      sizes: number of weights of each kernel, in forward order.
      densities: explicit per-layer densities (used as given).
      target: overall density; the per-layer densities keep the proportions of Han et al.'s
        LeNet-300-100 result (8% : 9% : 26%; for other depths, hidden layers 1 and the last
        layer 3.25), scaled so that the total kept weights hit ``target`` (layers capped at 1).

    Returns:
      One density per layer in ``(0, 1]``.

    Raises:
      ValueError: both or invalid ``densities``/``target``.
    """
    n = len(sizes)
    if densities is not None:
        if target is not None:
            raise ValueError("give --densities or --target-density, not both")
        if len(densities) != n:
            raise ValueError(f"--densities has {len(densities)} values, the model has {n} layers")
        for i, d in enumerate(densities):
            if not (0.0 < d <= 1.0):
                raise ValueError(f"density of layer {i} must be in (0, 1], got {d}")
        return tuple(float(d) for d in densities)
    ratios = list(HAN_DENSITIES) if n == 3 else [1.0] * (n - 1) + [3.25]
    if target is None:
        if n == 3:
            return HAN_DENSITIES
        target = 0.08
    if not (0.0 < target <= 1.0) or math.isnan(target):
        raise ValueError(f"--target-density must be in (0, 1], got {target}")
    total = float(sum(sizes))

    def kept(c: float) -> float:
        return sum(min(1.0, c * r) * s for r, s in zip(ratios, sizes, strict=True)) / total

    lo, hi = 0.0, 1.0 / min(ratios)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) < target else (lo, mid)
    return tuple(min(1.0, hi * r) for r in ratios)


def _global_builder(names: list[str]) -> MaskFn:
    def build_global(params: Any, s: Sequence[Any]) -> Any:
        sizes = [int(np.size(params[n]["kernel"])) for n in names]
        overall = sum(si * z for si, z in zip(s, sizes, strict=True)) / sum(sizes)
        return pj.magnitude_masks(params, overall, scope="global")

    return build_global


def _threshold_builder(names: list[str]) -> MaskFn:
    def build_threshold(params: Any, s: Sequence[Any]) -> Any:
        # Han's rule |w| >= quality * std(w), the quality set so each layer keeps its share
        quality = {}
        for n, si in zip(names, s, strict=True):
            w = jnp.abs(jnp.asarray(params[n]["kernel"])).ravel()
            q = jnp.quantile(w, si) / jnp.maximum(jnp.std(params[n]["kernel"]), 1e-12)
            quality[f"{n}/kernel"] = q if is_traced(q) else float(q)
        return pj.threshold_masks(params, quality)

    return build_threshold


def mask_builder(method: str, names: list[str]) -> MaskFn:
    """``(params, per-layer sparsities) -> masks`` for one of :data:`MASK_METHODS`.

    Args:
      method: ``"magnitude"`` (per-layer ``|w|``), ``"global"`` (one threshold over all
        kernels, at the overall sparsity the per-layer values imply) or ``"threshold"`` (Han et
        al.'s ``|w| >= quality * std(w)`` per layer, the quality set to hit each layer's share).
      names: the layer names (``Dense_0``, ...), in the order of the sparsities.

    Returns:
      The mask function; its sparsities may be traced (inside :func:`prunejax.pruning`).

    Raises:
      ValueError: an unknown ``method``.
    """
    if method == "magnitude":
        return lambda params, s: pj.magnitude_masks(
            params, {f"{n}/kernel": si for n, si in zip(names, s, strict=True)}
        )
    if method == "global":
        return _global_builder(names)
    if method == "threshold":
        return _threshold_builder(names)
    raise ValueError(f"unknown mask method {method!r}; expected one of {', '.join(MASK_METHODS)}")
