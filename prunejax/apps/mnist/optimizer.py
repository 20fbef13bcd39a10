"""The optimizer of the MNIST recipes: Adam(W) with a decaying learning rate."""

from __future__ import annotations

import math
from typing import Any

import optax

from prunejax._util import check_int

__all__ = ["make_optimizer"]


def _positive(value: Any, name: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return f


def make_optimizer(
    learning_rate: float,
    total_steps: int,
    *,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """Adam (Kingma & Ba 2015), or AdamW with ``weight_decay``, with a decaying learning rate.

    Args:
      learning_rate: peak learning rate (``> 0``).
      total_steps: steps the schedule decays over (``>= 1``).
      schedule: ``"cosine"`` (to 0 at ``total_steps``), ``"exponential"`` (to 1% of the peak)
        or ``"constant"``.
      weight_decay: decoupled weight decay (AdamW, Loshchilov & Hutter 2019); 0 gives Adam.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      TypeError: ``total_steps`` is not an int.
      ValueError: ``learning_rate <= 0`` (or NaN), ``total_steps < 1``, an unknown schedule,
        ``weight_decay < 0``.
    """
    lr = _positive(learning_rate, "learning_rate")
    total = check_int(total_steps, name="total_steps", minimum=1)
    wd = float(weight_decay)
    if not (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if schedule == "cosine":
        sched: Any = optax.cosine_decay_schedule(lr, total)
    elif schedule == "exponential":
        sched = optax.exponential_decay(lr, total, 0.01)
    elif schedule == "constant":
        sched = lr
    else:
        raise ValueError(
            f"unknown learning-rate schedule {schedule!r}; "
            "expected 'cosine', 'exponential' or 'constant'"
        )
    if wd > 0:
        return optax.adamw(sched, weight_decay=wd)
    return optax.adam(sched)
