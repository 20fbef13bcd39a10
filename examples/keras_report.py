"""Measure Keras models side by side: accuracy, parameters, ``.keras`` file bytes, latency.

The example's report (``examples/keras_mnist.py``): :func:`report` measures several models in one
process and :func:`format_table` renders its rows as a Markdown table with ratios against a
baseline.  :func:`inference_latency` times ``jax.jit``-compiled forward calls and so needs
``KERAS_BACKEND=jax``.  The ``.keras`` files are written with :func:`prunejax.keras.save_model`.
"""

from __future__ import annotations

import os
import random
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import keras
import numpy as np

from prunejax.keras import save_model

__all__ = [
    "ModelReport",
    "count_params",
    "evaluate_accuracy",
    "format_table",
    "inference_latency",
    "report",
]


def count_params(model: Any) -> tuple[int, int]:
    """``(total, nonzero)`` entries over all of ``model``'s weights."""
    weights = model.get_weights()
    return int(sum(w.size for w in weights)), int(sum(np.count_nonzero(w) for w in weights))


def evaluate_accuracy(model: Any, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (logits or probabilities) on ``(x, y)``."""
    pred = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(pred, axis=-1) == np.asarray(y)))


def _jitted_forward(model: Any) -> Callable[[Any], Any]:
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            "inference_latency times a jax.jit-compiled stateless_call and needs "
            f"KERAS_BACKEND=jax (the backend is {keras.backend.backend()!r})"
        )
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def forward(tv: Any, ntv: Any, x: Any) -> Any:
        return model.stateless_call(tv, ntv, x, training=False)[0]

    return lambda x: forward(trainable, non_trainable, x)


def inference_latency(
    models: Mapping[str, Any],
    x: np.ndarray,
    *,
    batch_sizes: Iterable[int] = (1, 256),
    repeats: int = 200,
    warmup: int = 10,
) -> dict[str, dict[int, float]]:
    """Median seconds per ``jax.jit``-compiled forward call, per model and batch size.

    Models are timed in rounds (one call of each per round, in a shuffled order), after
    ``warmup`` calls each, with ``jax.block_until_ready``, so slow drift of the machine affects
    them alike and their ratios are fair.

    Args:
      models: name -> built ``keras.Model`` (same input shape).
      x: inputs; batches are its first ``b`` rows (tiled if it has fewer).
      batch_sizes: the batch sizes to time.
      repeats: timed rounds per batch size.
      warmup: untimed calls per model and batch size before timing.

    Returns:
      ``{name: {batch_size: median_seconds}}``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    fns = {name: _jitted_forward(m) for name, m in models.items()}
    out: dict[str, dict[int, float]] = {name: {} for name in models}
    x = np.asarray(x)
    for b in batch_sizes:
        if b < 1:
            raise ValueError(f"batch sizes must be >= 1, got {b}")
        reps = -(-b // x.shape[0])
        xb = jax.device_put(np.concatenate([x] * reps)[:b] if reps > 1 else x[:b])
        for fn in fns.values():
            for _ in range(warmup):
                jax.block_until_ready(fn(xb))
        times: dict[str, list[float]] = {name: [] for name in fns}
        names = list(fns)
        rng = random.Random(b)
        for _ in range(repeats):
            rng.shuffle(names)  # no model always runs first (or right after the same one)
            for name in names:
                fn = fns[name]
                t0 = time.perf_counter()
                jax.block_until_ready(fn(xb))
                times[name].append(time.perf_counter() - t0)
        for name in fns:
            out[name][b] = statistics.median(times[name])
    return out


@dataclass
class ModelReport:
    """One row of :func:`report`.

    Attributes:
      name: the model's label.
      accuracy: test accuracy in [0, 1].
      params: entries over all weights.
      nonzero: nonzero entries over all weights.
      keras_bytes: size of the saved ``.keras`` file.
      latency: ``{batch_size: median seconds per jitted forward call}``.
      extra: more named sizes, e.g. ``{"prunejax sparse file": bytes}``.
      path: where the ``.keras`` file was written.
    """

    name: str
    accuracy: float
    params: int
    nonzero: int
    keras_bytes: int
    latency: dict[int, float]
    extra: dict[str, int] = field(default_factory=dict)
    path: str = ""


def _file_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")
    if not stem:
        raise ValueError(f"model name {name!r} has no character usable in a file name")
    return stem


def report(
    models: Mapping[str, Any],
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    out_dir: str | os.PathLike,
    batch_sizes: Iterable[int] = (1, 256),
    repeats: int = 200,
) -> list[ModelReport]:
    """Accuracy, parameters, ``.keras`` file size and latency of each model, in one process.

    Args:
      models: name -> built ``keras.Model``; each is saved to ``out_dir/<name>.keras`` (runs of
        characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``).
      x_test: test inputs.
      y_test: integer test labels.
      out_dir: directory for the ``.keras`` files.
      batch_sizes: batch sizes to time.
      repeats: timed rounds per batch size (see :func:`inference_latency`).

    Returns:
      One :class:`ModelReport` per model, in order.
    """
    batch_sizes = tuple(batch_sizes)
    latency = inference_latency(models, x_test, batch_sizes=batch_sizes, repeats=repeats)
    rows = []
    for name, m in models.items():
        total, nonzero = count_params(m)
        path = Path(out_dir) / f"{_file_stem(name)}.keras"
        size = save_model(m, path)
        rows.append(
            ModelReport(
                name=name,
                accuracy=evaluate_accuracy(m, x_test, y_test),
                params=total,
                nonzero=nonzero,
                keras_bytes=size,
                latency=latency[name],
                path=str(path),
            )
        )
    return rows


def format_table(rows: Sequence[ModelReport], *, baseline: str | None = None) -> str:
    """A Markdown table of :func:`report` rows, with ratios against ``baseline`` (default: first).

    Args:
      rows: the report rows.
      baseline: the name of the row the ratios refer to.

    Returns:
      The table as a string.
    """
    if not rows:
        raise ValueError("no rows to format")
    base = rows[0] if baseline is None else next((r for r in rows if r.name == baseline), None)
    if base is None:
        raise ValueError(f"baseline {baseline!r} is not a row name")
    batches = sorted({b for r in rows for b in r.latency})
    extras = sorted({k for r in rows for k in r.extra})
    header = ["model", "test acc %", "params", "nonzero", ".keras bytes", "size vs base"]
    header += [f"{k} bytes" for k in extras]
    for b in batches:
        header += [f"µs @ batch {b}", f"speedup @ {b}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r.name,
            f"{100 * r.accuracy:.2f}",
            f"{r.params:,}",
            f"{r.nonzero:,}",
            f"{r.keras_bytes:,}",
            f"{r.keras_bytes / base.keras_bytes:.1%}",
        ]
        for k in extras:
            v = r.extra.get(k)
            cells.append("" if v is None else f"{v:,} ({v / base.keras_bytes:.1%})")
        for b in batches:
            t, t0 = r.latency.get(b), base.latency.get(b)
            cells.append("" if t is None else f"{1e6 * t:.1f}")
            cells.append("" if t is None or t0 is None else f"{t0 / t:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
