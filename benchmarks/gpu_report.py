"""Pure parts of the GPU benchmark: time budgets, crossover, bandwidth, targets, rendering.

Nothing here touches a device; ``tests/test_gpu_benchmark.py`` checks it with fake numbers.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

from prunejax._util import atomic_write_text

# Peak HBM bandwidth of the cards the benchmark knows, bytes per second (vendor data sheets).
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 SXM": 3.35e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100-SXM4-40GB": 1.555e12,
}

# (name, model, pattern, batch, format, goal): ratio of the format to dense fp32 cuBLAS.
TARGETS = (
    ("block16 90% b1 >= 3x", "wide", "block16", 1, "pallas_block", 3.0),
    ("block16 90% b256 >= 2x", "wide", "block16", 256, "pallas_block", 2.0),
)
AUTO_GOAL = 0.95


class Budget:
    """A wall-clock deadline shared by the sections of a run.

    Args:
      seconds: the time the run may take from now.
      clock: the clock (``time.monotonic``; replaced in tests).
    """

    def __init__(self, seconds: float, clock: Any = time.monotonic):
        self.clock = clock
        self.deadline = clock() + float(seconds)

    def left(self) -> float:
        """Seconds left (negative once past the deadline)."""
        return self.deadline - self.clock()

    def allows(self, seconds: float) -> bool:
        """Whether ``seconds`` more still fit before the deadline."""
        return self.left() >= seconds


def plan_rounds(t_round: float, cell_s: float, min_rounds: int = 3, max_rounds: int = 50) -> int:
    """Rounds of a cell whose one round (every format once) takes ``t_round`` seconds.

    Args:
      t_round: seconds of one round.
      cell_s: the time the cell's rounds may take.
      min_rounds: at least this many (a median of fewer is not a median).
      max_rounds: at most this many.

    Returns:
      ``clamp(cell_s / t_round, min_rounds, max_rounds)``.
    """
    if t_round <= 0:
        return max_rounds
    return int(max(min_rounds, min(max_rounds, math.floor(cell_s / t_round))))


def burst(t1: float, target_s: float = 2e-3, cap: int = 64) -> int:
    """Back-to-back calls per timed sample: enough to last ``target_s``, at most ``cap``."""
    return int(min(cap, max(1, math.ceil(target_s / max(t1, 1e-9)))))


def median_ratio(dense_times: Sequence[float], times: Sequence[float]) -> float | None:
    """Median over rounds of ``t_dense / t_format`` from the same round (None if no rounds)."""
    pairs = [d / t for d, t in zip(dense_times, times, strict=False) if t > 0]
    return statistics.median(pairs) if pairs else None


def crossover(points: Sequence[tuple[float, float]]) -> dict:
    """The sparsity from which a format is at least as fast as dense (ratio >= 1) for good.

    Args:
      points: ``(sparsity, ratio to dense)`` pairs (any order; ratio None = not measured).

    Returns:
      ``{"sparsity": s or None, "kind": k}``: ``"interpolated"`` (linear between the last
      losing and the first winning point of the winning tail), ``"at_or_below"`` (wins at every
      measured sparsity: ``s`` is the lowest), ``"never"`` (loses at the highest), or
      ``"unmeasured"``.
    """
    pts = sorted((s, r) for s, r in points if r is not None and math.isfinite(r))
    if not pts:
        return {"sparsity": None, "kind": "unmeasured"}
    if pts[-1][1] < 1.0:
        return {"sparsity": None, "kind": "never"}
    i = len(pts) - 1
    while i > 0 and pts[i - 1][1] >= 1.0:
        i -= 1
    if i == 0:
        return {"sparsity": pts[0][0], "kind": "at_or_below"}
    (s0, r0), (s1, r1) = pts[i - 1], pts[i]
    s = s0 + (1.0 - r0) * (s1 - s0) / (r1 - r0)
    return {"sparsity": s, "kind": "interpolated"}


def peak_bandwidth(device_kind: str) -> float | None:
    """The card's peak HBM bandwidth (bytes/s) from ``PEAK_BANDWIDTH``, None if unknown."""
    for name in sorted(PEAK_BANDWIDTH, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return PEAK_BANDWIDTH[name]
    return None


def hbm_fraction(bytes_moved: int, seconds: float, peak: float | None) -> float | None:
    """``bytes_moved / seconds`` as a fraction of ``peak`` (None when unknown or unmeasured)."""
    if not peak or not seconds or seconds <= 0:
        return None
    return bytes_moved / seconds / peak


def find_cell(cells: Sequence[dict], **key: Any) -> dict | None:
    """The first cell whose fields equal ``key``."""
    for c in cells:
        if all(c.get(k) == v for k, v in key.items()):
            return c
    return None


def compute_targets(cells: Sequence[dict], on_gpu: bool = True) -> list[dict]:
    """Judge ``TARGETS`` and "auto >= 0.95x dense in every cell" on the measured cells.

    Args:
      cells: the run's cells (``model``, ``pattern``, ``batch``, ``format``, ``ratio``).
      on_gpu: whether they were measured on a GPU (the targets are GPU targets: elsewhere
        ``met`` is None, the values are shown for information).

    Returns:
      One row per target: ``name``, ``measured``, ``goal``, ``met`` (None: not measured).
    """
    rows = []
    for name, model, pattern, batch, fmt, goal in TARGETS:
        c = find_cell(cells, model=model, pattern=pattern, batch=batch, format=fmt)
        r = c.get("ratio") if c else None
        rows.append(
            {"name": name, "measured": r, "goal": goal, "met": None if r is None else r >= goal}
        )
    autos = [c for c in cells if c.get("format") == "auto" and c.get("ratio") is not None]
    worst = min(autos, key=lambda c: c["ratio"]) if autos else None
    rows.append(
        {
            "name": "auto >= 0.95x in every cell",
            "measured": worst["ratio"] if worst else None,
            "goal": AUTO_GOAL,
            "met": None if worst is None else worst["ratio"] >= AUTO_GOAL,
            "where": None
            if worst is None
            else f"{worst['model']} {worst['pattern']} b{worst['batch']}",
        }
    )
    if not on_gpu:
        for r in rows:
            r["met"] = None
    return rows


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _info_lines(info: dict) -> list[str]:
    keys = ("device_kind", "gpu", "driver", "cuda", "jax", "jaxlib", "backend", "python", "cpu")
    lines = ["| what | value |", "| --- | --- |"]
    lines += [f"| {k} | {info[k]} |" for k in keys if info.get(k) not in (None, "")]
    lines.append(f"| date | {info.get('date_utc', '-')} |")
    return lines


def _cell_table(cells: Sequence[dict]) -> list[str]:
    lines = [
        "| model | pattern | batch | format | median µs | ratio to dense fp32 | runs | HBM frac | "
        "status | note |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for c in cells:
        lines.append(
            f"| {c.get('model')} | {c.get('pattern')} | {c.get('batch')} | {c.get('format')} | "
            f"{_fmt(c.get('median_us'), '.1f')} | {_fmt(c.get('ratio'))} | "
            f"{_fmt(c.get('runs'))} | {_fmt(c.get('hbm_frac'), '.3f')} | {c.get('status', '')} | "
            f"{(c.get('note') or '')[:160]} |"
        )
    return lines


def _crossover_table(rows: Sequence[dict]) -> list[str]:
    lines = [
        "| layer | format | batch | cuSPARSE | ratio to dense per sparsity | crossover sparsity |",
        "| --- | --- | ---: | --- | --- | --- |",
    ]
    for r in rows:
        pts = ", ".join(f"{s:.3g}: {_fmt(x)}" for s, x in r.get("points", []))
        x = r.get("crossover") or {}
        where = {"interpolated": "", "at_or_below": "<= ", "never": "none up to max"}.get(
            x.get("kind"), x.get("kind", "")
        )
        val = "" if x.get("sparsity") is None else f"{x['sparsity']:.3f}"
        n = r.get("layer", "?")
        lines.append(
            f"| {n}x{n} | {r.get('format', '?')} | {r['batch']} | {r['cusparse']} | {pts} | "
            f"{where}{val} |"
        )
    return lines


def render_markdown(res: dict) -> str:
    """``RESULTS_GPU.md`` of a run: machine, targets, checks, cells, crossover, pytest.

    Args:
      res: the run's results (as written to ``results_gpu.json``).

    Returns:
      The Markdown text.
    """
    info = res.get("info", {})
    out = [f"# prunejax GPU benchmark ({res.get('mode', '?')} run)", "", *_info_lines(info), ""]
    out += ["## Targets (ratios to dense fp32 cuBLAS, same process)", ""]
    out += ["| target | measured | goal | met |", "| --- | ---: | ---: | --- |"]
    for t in res.get("targets", []):
        where = f" ({t['where']})" if t.get("where") else ""
        met = {True: "met", False: "missed", None: "not judged"}[t["met"]]
        out.append(f"| {t['name']}{where} | {_fmt(t['measured'])} | {t['goal']} | {met} |")
    out += ["", "## Correctness of the Pallas kernel on this device", ""]
    out += [
        "| check | max rel. error | tolerance | ok | note |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for c in res.get("checks", []):
        out.append(
            f"| {c['name']} | {_fmt(c.get('err'), '.2e')} | {_fmt(c.get('tol'), '.1e')} | "
            f"{c.get('ok')} | {(c.get('note') or '')[:160]} |"
        )
    out += ["", "## Cells", "", *_cell_table(res.get("cells", []))]
    out += ["", "## BCOO/BCSR crossover sparsity (one layer, ratio >= 1 from there on)", ""]
    out += _crossover_table(res.get("crossover", []))
    py = res.get("pytest") or {}
    out += [
        "",
        "## pytest on this device",
        "",
        f"`{py.get('command', '-')}`: {py.get('summary', '-')}",
    ]
    out += ["", f"Elapsed: {_fmt(res.get('elapsed_s'), '.0f')} s. Sections: "]
    out += [f"- {s}" for s in res.get("sections", [])]
    return "\n".join(out) + "\n"


def write_results(res: dict, outdir: str) -> list[str]:
    """Write ``results_gpu.json`` and ``RESULTS_GPU.md`` into ``outdir``, atomically.

    Args:
      res: the run's results (JSON-ready).
      outdir: the folder (created if missing).

    Returns:
      The two paths.
    """
    import os

    paths = [os.path.join(outdir, "results_gpu.json"), os.path.join(outdir, "RESULTS_GPU.md")]
    atomic_write_text(paths[0], json.dumps(res, indent=1, default=str) + "\n")
    atomic_write_text(paths[1], render_markdown(res))
    return paths
