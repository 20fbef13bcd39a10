"""Per-epoch training metrics: gathered on the device, fetched in groups, checked for NaN, shown
as a tqdm bar on a terminal and as one plain line per epoch otherwise (``prunejax mnist > log``
gets no carriage-return bar updates)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["EpochMeter", "is_terminal"]

_SHORT = {"accuracy": "acc"}


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (``isatty``), False for pipes and files."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class EpochMeter:
    """The metrics of one epoch of :func:`prunejax.apps.mnist.fit`.

    Every step appends its metrics (a dict of device scalars with ``"loss"`` and ``"density"``
    plus the loss function's aux metrics) to :attr:`pending`; :meth:`flush` fetches them, raises
    on a NaN/inf loss naming the step, accumulates the means and moves the progress display.

    Args:
      steps: steps in the epoch.
      desc: the training phase, used in error messages.
      epoch: the epoch index (0-based).
      epochs: epochs in all (for the label ``"<desc> <epoch + 1>/<epochs>"``).
      first_step: global index of the epoch's first step.
      progress: show progress at all.
      stream: where progress goes (default ``sys.stderr``): a bar if it is a terminal, else one
        line at :meth:`close`.
    """

    def __init__(
        self,
        steps: int,
        desc: str,
        epoch: int,
        epochs: int,
        first_step: int,
        *,
        progress: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        from tqdm.auto import tqdm

        self.desc, self.epoch, self.first_step = desc, epoch, first_step
        self.label = f"{desc} {epoch + 1}/{epochs}"
        self.stream = sys.stderr if stream is None else stream
        self.lines = progress and not is_terminal(self.stream)
        self.bar = tqdm(
            total=steps,
            desc=self.label,
            disable=not progress or self.lines,
            leave=False,
            dynamic_ncols=True,
            file=self.stream,
        )
        self.pending: list[dict[str, jax.Array]] = []
        self.sums: dict[str, float] = {}
        self.seen = 0
        self.density = float("nan")

    def flush(self, upto: int) -> None:
        """Fetch the pending metrics (the last one belongs to step ``upto - 1``)."""
        if not self.pending:
            return
        stacked = jax.tree_util.tree_map(lambda *v: jnp.stack(v), *self.pending)
        m = {k: np.asarray(v, np.float64) for k, v in jax.device_get(stacked).items()}
        first = upto - len(self.pending)
        self.pending = []
        bad = np.flatnonzero(~np.isfinite(m["loss"]))
        if bad.size:
            s = first + int(bad[0])
            raise FloatingPointError(
                f"{self.desc}: loss became {m['loss'][bad[0]]} at step {s} "
                f"(epoch {self.epoch + 1}, batch {s - self.first_step + 1}); training stopped"
            )
        for k, v in m.items():
            if k != "density":
                self.sums[k] = self.sums.get(k, 0.0) + float(v.sum())
        self.seen += len(m["loss"])
        self.density = float(m["density"][-1])
        self.bar.update(len(m["loss"]))
        self.bar.set_postfix(self._shown())

    def _shown(self) -> dict[str, str]:
        out = {_SHORT.get(k, k): f"{v:.4f}" for k, v in self.summary().items() if k != "density"}
        out["sparsity"] = f"{1 - self.density:.3f}"
        return out

    def summary(self) -> dict[str, float]:
        """Mean loss and aux metrics over the epoch's steps, and the last kernel density."""
        n = max(self.seen, 1)
        means = {k: self.sums[k] / n for k in sorted(self.sums, key=lambda k: (k != "loss", k))}
        return {**means, "density": self.density}

    def close(self) -> None:
        """Close the bar; off a terminal, write the epoch's one progress line."""
        self.bar.close()
        if self.lines:
            shown = ", ".join(f"{k} {v}" for k, v in self._shown().items())
            self.stream.write(f"{self.label}: {shown}\n")
            self.stream.flush()
