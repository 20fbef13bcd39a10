"""Sparsity over time: constant, one-shot, polynomial (Zhu & Gupta 2017) and iterative rounds.

A *sparsity schedule* is a function ``step -> sparsity`` in the style of optax's learning-rate
schedules: it accepts a Python int, a NumPy integer or a traced JAX integer (so it runs inside
``jax.jit`` and inside an optimizer update) and returns a float32 JAX scalar in ``[0, 1]``.

``iterative_sparsity`` is different: it describes prune-retrain *rounds* (Han et al. 2015;
Frankle & Carbin 2019), not optimizer steps, and returns one sparsity per round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from prunejax._util import check_fraction, check_int, check_number, is_traced

__all__ = [
    "SparsitySchedule",
    "constant_sparsity",
    "one_shot_sparsity",
    "polynomial_sparsity",
    "iterative_sparsity",
]

SparsitySchedule = Callable[[Any], Any]


def _check_fraction(value: Any, name: str) -> float:
    """A concrete fraction in ``[0, 1]`` as ``float`` (strings and bools refused, as everywhere)."""
    if is_traced(value):
        raise TypeError(f"{name} must be a concrete number, not a traced value")
    return float(check_fraction(value, name=name))


def constant_sparsity(sparsity: float) -> SparsitySchedule:
    """The same sparsity at every step.

    Args:
      sparsity: fraction of pruned weights, in ``[0, 1]``.

    Returns:
      A schedule ``step -> sparsity`` (float32 JAX scalar).
    """
    s = _check_fraction(sparsity, "sparsity")

    def schedule(step: Any) -> Any:
        return jnp.full((), s, jnp.float32) + 0 * jnp.asarray(step, jnp.float32)

    return schedule


def one_shot_sparsity(sparsity: float, step: int = 0) -> SparsitySchedule:
    """Dense before ``step``, ``sparsity`` from ``step`` on (one-shot pruning).

    Args:
      sparsity: fraction of pruned weights after the prune step, in ``[0, 1]``.
      step: the step at which the network is pruned (``>= 0``).

    Returns:
      A schedule ``t -> 0 if t < step else sparsity`` (float32 JAX scalar).
    """
    s = _check_fraction(sparsity, "sparsity")
    at = check_int(step, name="step", minimum=0)

    def schedule(t: Any) -> Any:
        t = jnp.asarray(t)
        return jnp.where(t >= at, jnp.float32(s), jnp.float32(0.0))

    return schedule


def polynomial_sparsity(
    initial: float,
    final: float,
    begin_step: int,
    end_step: int,
    power: float = 3.0,
) -> SparsitySchedule:
    """Gradual pruning schedule of Zhu & Gupta (2017), "To prune, or not to prune".

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** power`` for ``t0 <= t <= t0 + n*dt``,
    with ``t0 = begin_step`` and ``t0 + n*dt = end_step``.  By definition the sparsity is held at
    ``s_i`` before ``t0`` and at ``s_f`` after ``end_step``.  Sparsity rises fast at first, while
    the network has many redundant weights, and slowly near the end.

    Args:
      initial: sparsity ``s_i`` at ``begin_step``, in ``[0, 1]``.
      final: sparsity ``s_f`` at ``end_step``, in ``[initial, 1]``.
      begin_step: first pruning step ``t0`` (``>= 0``).
      end_step: last pruning step ``t0 + n*dt`` (``> begin_step``).
      power: exponent of the decay (Zhu & Gupta use 3); must be positive.

    Returns:
      A schedule ``step -> sparsity`` that works on Python ints and traced JAX integers alike
      (float32 JAX scalar).

    Raises:
      ValueError: a sparsity outside ``[0, 1]`` or NaN, ``final < initial``,
        ``end_step <= begin_step``, a negative ``begin_step``, or ``power <= 0``.
    """
    s_i = _check_fraction(initial, "initial")
    s_f = _check_fraction(final, "final")
    if s_f < s_i:
        raise ValueError(
            f"final sparsity ({final!r}) must be >= initial sparsity ({initial!r}): "
            "a pruning schedule does not regrow weights"
        )
    t0 = check_int(begin_step, name="begin_step", minimum=0)
    t1 = check_int(end_step, name="end_step", minimum=0)
    if t1 <= t0:
        raise ValueError(f"end_step ({t1}) must be greater than begin_step ({t0})")
    p = check_number(power, name="power")
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"power must be a positive finite number, got {power!r}")
    span = float(t1 - t0)

    def schedule(step: Any) -> Any:
        t = jnp.asarray(step, jnp.float32)
        frac = jnp.clip((t - t0) / span, 0.0, 1.0)
        s = s_f + (s_i - s_f) * (1.0 - frac) ** p
        # exact end points (no rounding drift in the polynomial)
        s = jnp.where(t <= t0, s_i, jnp.where(t >= t1, s_f, s))
        return s.astype(jnp.float32)

    return schedule


def iterative_sparsity(
    rounds: int,
    per_round: float | None = None,
    *,
    final: float | None = None,
) -> tuple[float, ...]:
    """Sparsity after each round of iterative prune-retrain.

    Either a fixed fraction of the *remaining* weights is pruned every round (lottery-ticket
    style, Frankle & Carbin 2019, ``per_round=0.2``): ``s_r = 1 - (1 - p) ** r``; or the rounds
    reach a given ``final`` sparsity with the same fraction of the remaining weights pruned per
    round (Han et al. 2015 iterate pruning and retraining): ``s_r = 1 - (1 - final) ** (r / R)``.

    Args:
      rounds: number of rounds ``R`` (``>= 1``).
      per_round: fraction ``p`` of the remaining weights pruned per round, in ``[0, 1]``.
      final: sparsity after the last round, in ``[0, 1]``.  Give exactly one of ``per_round``
        and ``final``; with neither, ``per_round=0.2``.

    Returns:
      A tuple of ``R`` sparsities, non-decreasing, one per round (round 1 first).
    """
    r = check_int(rounds, name="rounds", minimum=1)
    if per_round is not None and final is not None:
        raise ValueError("give per_round or final, not both")
    if final is not None:
        f = _check_fraction(final, "final")
        return tuple(1.0 - (1.0 - f) ** (k / r) for k in range(1, r + 1))
    p = 0.2 if per_round is None else _check_fraction(per_round, "per_round")
    return tuple(1.0 - (1.0 - p) ** k for k in range(1, r + 1))
