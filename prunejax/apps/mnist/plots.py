"""The error-vs-density plot of ``prunejax mnist``."""

from __future__ import annotations

import os
from typing import Any

from prunejax._util import atomic_path

__all__ = [
    "DEEP_COMPRESSION_LENET_300_100",
    "HAN_LENET_300_100",
    "plot_error_vs_density",
    "plot_error_vs_size",
]

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


DEEP_COMPRESSION_LENET_300_100 = (27_000, 1.58)
"""Han, Mao & Dally (2016), Table 2: LeNet-300-100 compressed to 27 KB at 1.58% test error."""


def plot_error_vs_size(
    series: dict[str, list[tuple[float, float, float]]],
    path: str | os.PathLike,
    title: str,
    *,
    targets: list[tuple[float, float, str]] = (),
    ylabel: str = "test error (%)",
) -> None:
    """Plot error against model-file bytes (log axis), one line per pipeline stage.

    Args:
      series: ``{label: [(bytes, error %, error std %), ...]}``, e.g. pruning alone,
        + weight sharing, + entropy coding.
      path: the PNG file, written atomically.
      title: the plot's title.
      targets: ``(max bytes, max error %, label)`` corners drawn as dotted boxes.
      ylabel: the y axis label (say which split the errors are on).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    lo = min([p[0] for pts in series.values() for p in pts] + [b for b, _, _ in targets]) / 1.5
    ys = [p[1] - p[2] for pts in series.values() for p in pts]
    bottom = max(0.0, min(ys + [DEEP_COMPRESSION_LENET_300_100[1]]) - 0.2)
    for i, (label, pts) in enumerate(series.items()):
        pts = sorted(pts)
        if not pts:
            continue
        xs, ys, es = zip(*pts, strict=True)
        ax.errorbar(xs, ys, yerr=es, fmt="o-", color=f"C{i}", capsize=3, ms=4, label=label)
    px, py = DEEP_COMPRESSION_LENET_300_100
    ax.plot([px], [py], "s", color="C3", ms=8, label="Deep Compression (Han et al. 2016)")
    for j, (bx, by, lab) in enumerate(targets):
        ax.vlines(bx, bottom, by, colors=f"C{5 + j}", linestyles=":", lw=1)
        ax.hlines(by, lo, bx, colors=f"C{5 + j}", linestyles=":", lw=1, label=lab)
    ax.set_xscale("log")
    ax.set_ylim(bottom=bottom)
    ax.set_xlabel("model file (bytes, everything needed to run it)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
