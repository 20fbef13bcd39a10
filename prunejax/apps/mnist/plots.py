"""The error-vs-density plot of ``prunejax mnist``."""

from __future__ import annotations

import os
from typing import Any

from prunejax._util import atomic_path

__all__ = ["HAN_LENET_300_100", "plot_error_vs_density"]

HAN_LENET_300_100 = ((100.0, 1.64), (8.0, 1.59))
"""Han et al. (2015), Table 1: (weights remaining %, test error %) dense and pruned."""


def plot_error_vs_density(
    points: list[dict[str, Any]], path: str | os.PathLike, title: str
) -> None:
    """Plot test error against the weights remaining (log axis) next to Han et al.'s result.

    Args:
      points: ``{"label", "density", "test_error"}`` dicts (fractions), in training order.
      path: the PNG file, written atomically (:func:`prunejax._util.atomic_path`).
      title: the plot's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [100 * p["density"] for p in points]
    ys = [100 * p["test_error"] for p in points]
    ax.plot(xs, ys, "o-", color="C0", label="prunejax")
    for p, x, y in zip(points, xs, ys, strict=True):
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    han_x, han_y = zip(*HAN_LENET_300_100, strict=True)
    ax.plot(han_x, han_y, "s", color="C3", alpha=0.6, label="Han et al. 2015")
    ax.set_xscale("log")
    ticks = [t for t in (100, 50, 20, 10, 5, 2, 1, 0.5) if min(xs + [8]) / 1.5 <= t <= 100]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("test error (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
