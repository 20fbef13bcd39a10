"""The speed targets, as data (``TARGETS``), and the function that judges a run against them.

A target names the cells it reads (a selection on cell fields: model, granularity, sparsity,
batch, format), a goal and how it is judged (``judge``: a key of ``JUDGES``; ``compare``: whether
the measure must be at least or at most the goal).  ``compute_targets(res)`` evaluates every
target on a run's results and returns one row per verdict.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

from benchmarks.cells import REFERENCE_FORMATS

COMPARE = {">=": operator.ge, "<=": operator.le}


@dataclasses.dataclass(frozen=True)
class Target:
    """One target: ``name`` (may hold ``{format}``, ``{model}``, ``{batch}`` of the judged rows),
    ``judge`` (a ``JUDGES`` key), ``goal`` with ``compare``, ``cells`` (the selection it reads)
    and ``detail`` (a template for judges that report per row)."""

    name: str
    judge: str
    goal: float | None
    cells: dict
    compare: str = ">="
    detail: str = ""


CELL_FIELDS = ("model", "granularity", "sparsity", "batch")


def cell(spec: str) -> dict:
    """A one-cell selection from ``"model/granularity/sparsity/batch"`` (``"wide/unit/50%/1"``)."""
    values = spec.split("/")
    return dict(zip(CELL_FIELDS, [*values[:-1], int(values[-1])], strict=True))


def best_in(name: str, goal: float, spec: str) -> Target:
    """A ``"best"`` target: the best prunejax format of one cell (``cell(spec)``) >= ``goal``."""
    return Target(name, "best", goal, cell(spec))


TRAIN_DETAIL = "{masked_ms:.2f} ms vs {dense_ms:.2f} ms"
BCOO_NAME = "BCOO ({format}) reported honestly, with its crossover sparsity"
UNITS_NAME = "wide 50% units removed (compact), every batch >= 0.9 x FLOP ratio"
AUTO_NAME = 'format="auto" never > 5% slower than dense (every cell >= 0.95x)'
WIDE_UNITS = {"model": "wide", "granularity": "unit", "sparsity": "50%", "format": "compact"}

TARGETS: tuple[Target, ...] = (
    best_in("wide 90% unstructured, batch 1 >= 3x", 3.0, "wide/unstructured/90%/1"),
    best_in("wide 90% unstructured, batch 256 >= 1.5x", 1.5, "wide/unstructured/90%/256"),
    best_in("wide 90% 16x16 blocks, batch 1 >= 8x", 8.0, "wide/block16/90%/1"),
    best_in("wide 90% 16x16 blocks, batch 256 >= 5x", 5.0, "wide/block16/90%/256"),
    # The worst fraction of the FLOP-ratio bound over the batches.
    Target(UNITS_NAME, "compact", 0.9, WIDE_UNITS),
    best_in("LeNet at Han's 8/9/26% density, batch 1 >= 1.5x", 1.5, "lenet/unstructured/han/1"),
    best_in("LeNet at Han's 8/9/26% density, batch 256 >= 1.5x", 1.5, "lenet/unstructured/han/256"),
    # Reported, not judged (listed only when the format ran).
    Target(BCOO_NAME, "crossover", None, {"format": "jsp.bcoo", "granularity": "unstructured"}),
    Target(BCOO_NAME, "crossover", None, {"format": "pj.bcoo", "granularity": "unstructured"}),
    # One verdict per training-step row of the run.
    Target(
        "masked train step <= 1.10x dense ({model}, batch {batch})",
        "train",
        1.10,
        {"devices": 1},
        "<=",
        TRAIN_DETAIL + " ({masked_source})",
    ),
    Target(
        "masked train step <= 1.10x dense, 2 devices ({model})",
        "train",
        1.10,
        {"devices": 2},
        "<=",
        TRAIN_DETAIL,
    ),
    # The worst pj.auto cell that does not run the baseline's own computation.
    Target(AUTO_NAME, "auto", 0.95, {"format": "pj.auto"}),
)


def select(rows: list[dict], **kw: Any) -> list[dict]:
    """The rows whose fields equal every ``kw``."""
    return [c for c in rows if all(c.get(k) == v for k, v in kw.items())]


def measured(rows: list[dict]) -> list[dict]:
    """The rows that have a ratio."""
    return [r for r in rows if r.get("ratio") is not None]


def best(rows: list[dict], prefer_pj: bool = True) -> tuple[dict | None, str]:
    """The fastest format of a cell's rows: prunejax's if any ran (else a non-reference one).

    Args:
      rows: the rows of one cell.
      prefer_pj: pick among prunejax formats (``pj.*``, ``compact*``) when one ran.

    Returns:
      ``(row or None, "prunejax" | "harness")``.
    """
    ok = [r for r in measured(rows) if r["format"] != "dense"]
    pj = [r for r in ok if r["format"].startswith(("pj.", "compact"))]
    if prefer_pj and pj:
        pool, scope = pj, "prunejax"
    else:
        pool = [r for r in ok if r["format"] not in REFERENCE_FORMATS or r["format"] == "jsp.bcsr"]
        scope = "harness"
    if not pool:
        return None, scope
    return max(pool, key=lambda r: r["ratio"]), scope


def verdict(
    name: str, value: float | None, goal: float | None, met: bool | None, detail: str
) -> dict:
    """One row of the targets table."""
    return {"target": name, "measured": value, "goal": goal, "met": met, "detail": detail}


def judge_best(t: Target, res: dict) -> list[dict]:
    """The best prunejax format of the cell must reach the goal."""
    rows = select(res["cells"], **t.cells)
    if not rows:
        return [verdict(t.name, None, t.goal, None, "not measured in this run")]
    b, scope = best(rows)
    if b is None:
        return [verdict(t.name, None, t.goal, False, "no format ran")]
    auto = measured(select(rows, format="pj.auto"))
    extra = f"; auto {auto[0]['ratio']:.2f}x" if auto else ""
    met = COMPARE[t.compare](b["ratio"], t.goal)
    detail = (
        f"best {scope} format {b['format']} {b['ratio']:.2f}x "
        f"({'+' if met else ''}{(b['ratio'] / t.goal - 1) * 100:.0f}% vs goal){extra}"
    )
    return [verdict(t.name, b["ratio"], t.goal, met, detail)]


def _compact_detail(cells: list[dict], r: dict) -> str:
    """One batch of the compaction target, with ``compact.auto`` and its layout gain beside it.

    The target is judged on ``compact``: the compacted network run exactly like the baseline
    (XLA's dot, (in, out) layout), so the ratio is what removing the units buys.
    ``compact.auto`` adds prunejax's batch-1 row-dot layout, which speeds up even the unpruned
    model (``pj.dense_t`` at 0%): reported beside it, with that layout gain, not counted.
    """
    b, model = r["batch"], r["model"]
    txt = f"b={b}: compact {r['ratio']:.2f}x of {r['bound']:.2f}x ({r['frac_bound']:.2f})"
    same_cell = {k: r[k] for k in ("model", "granularity", "sparsity", "batch")}
    ca = measured(select(cells, **same_cell, format="compact.auto"))
    unpruned = {"model": model, "granularity": "unstructured", "sparsity": "0%", "batch": b}
    lay = measured(select(cells, **unpruned, format="pj.dense_t"))
    if ca:
        txt += f"; compact.auto {ca[0]['ratio']:.2f}x ({ca[0]['note'].split('; build')[0]})"
        if lay and "dense_t" in ca[0]["note"]:
            same_layout = ca[0]["ratio"] / lay[0]["ratio"]
            txt += (
                f", of which the layout alone gives {lay[0]['ratio']:.2f}x on the "
                f"unpruned model (compaction in that layout: {same_layout:.2f}x)"
            )
    return txt


def judge_compact(t: Target, res: dict) -> list[dict]:
    """Every batch's ``compact`` ratio must reach ``goal`` x its FLOP-ratio bound."""
    cells = res["cells"]
    comp = {r["batch"]: r for r in select(cells, **t.cells) if r.get("frac_bound") is not None}
    if not comp:
        return [verdict(t.name, None, t.goal, None, "not measured in this run")]
    detail = "; ".join(_compact_detail(cells, comp[b]) for b in sorted(comp))
    worst = min(comp.values(), key=lambda r: r["frac_bound"])
    met = COMPARE[t.compare](worst["frac_bound"], t.goal)
    return [verdict(t.name, worst["frac_bound"], t.goal, met, detail)]


def judge_crossover(t: Target, res: dict) -> list[dict]:
    """Reported, not judged: the lowest sparsity where the format beats dense, per model/batch."""
    rows = select(res["cells"], **t.cells)
    if not rows:
        return []
    parts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for b in sorted({r["batch"] for r in rows if r["model"] == model}):
            rs = select(rows, model=model, batch=b)
            won = sorted((1 - r["density"]) for r in rs if (r.get("ratio") or 0) >= 1.0)
            top = max((r.get("ratio") or 0 for r in rs), default=0)
            parts.append(
                f"{model} b={b}: "
                + (f"wins from {won[0] * 100:.0f}%" if won else f"never (best {top:.2f}x)")
            )
    return [verdict(t.name.format(**t.cells), None, None, None, "; ".join(parts))]


def judge_train(t: Target, res: dict) -> list[dict]:
    """Every training-step row on ``cells["devices"]`` devices: masked / dense time vs goal."""
    rows = list(res.get("train", []))
    if isinstance(res.get("train_multidevice"), list):
        rows += res["train_multidevice"]
    out = []
    for r in select(rows, **t.cells):
        fields = {**r, "masked_ms": r["masked_us"] / 1e3, "dense_ms": r["dense_us"] / 1e3}
        met = COMPARE[t.compare](r["ratio"], t.goal)
        out.append(verdict(t.name.format(**r), r["ratio"], t.goal, met, t.detail.format(**fields)))
    return out


def auto_is_baseline(r: dict) -> bool:
    """Whether a ``pj.auto`` cell chose plain (XLA) dense for every layer (note ``chose ...``)."""
    note = r.get("note") or ""
    if not note.startswith("chose "):
        return False
    kinds = note[len("chose ") :].split(";")[0].strip().split("/")
    return bool(kinds) and all(k == "dense" for k in kinds)


def _with_aa(cells: list[dict], r: dict) -> str:
    """``r``'s place and ratio, with the A/A control of its cell: ``lenet/unit/90%/b1 0.97x``."""
    where = {k: r[k] for k in ("model", "granularity", "sparsity", "batch")}
    hit = select(cells, **where, format="dense.aa")
    return f" (A/A {hit[0]['ratio']:.2f})" if hit and hit[0].get("ratio") else ""


def _place(r: dict) -> str:
    return f"{r['model']}/{r['granularity']}/{r['sparsity']}/b{r['batch']}"


def judge_auto(t: Target, res: dict) -> list[dict]:
    """Every ``pj.auto`` cell must reach the goal, except those running the baseline itself.

    Where auto kept XLA's dense dot for every layer it runs the baseline's own computation
    (same compiled HLO): such a cell cannot be slower than dense, and its ratio measures only
    timing noise, like the A/A control.  It is listed, not judged.
    """
    cells = res["cells"]
    auto_all = measured(select(cells, **t.cells))
    same = [r for r in auto_all if auto_is_baseline(r)]
    auto = [r for r in auto_all if not auto_is_baseline(r)]
    if not auto:
        return [
            verdict(t.name, None, t.goal, None, "prunejax.sparse auto not available in this run")
        ]
    worst = min(auto, key=lambda r: r["ratio"])
    bad = [r for r in auto if not COMPARE[t.compare](r["ratio"], t.goal)]
    det = (
        f"worst {worst['model']} {worst['granularity']} {worst['sparsity']} "
        f"b={worst['batch']}: {worst['ratio']:.2f}x{_with_aa(cells, worst)}; {len(bad)} of "
        f"{len(auto)} cells below {t.goal}x"
    )
    if bad:
        det += ": " + ", ".join(
            f"{_place(r)} {r['ratio']:.2f}x{_with_aa(cells, r)}" for r in bad[:16]
        )
    if same:
        lo = min(same, key=lambda r: r["ratio"])
        det += (
            f". Not judged: {len(same)} cells where auto kept XLA's dense dot for every "
            "layer, i.e. ran the baseline's own computation; their ratios span "
            f"{lo['ratio']:.2f}x ({_place(lo)}{_with_aa(cells, lo)}) to "
            f"{max(r['ratio'] for r in same):.2f}x, the timing noise of identical executables"
        )
    return [verdict(t.name, worst["ratio"], t.goal, not bad, det)]


JUDGES: dict[str, Callable[[Target, dict], list[dict]]] = {
    "best": judge_best,
    "compact": judge_compact,
    "crossover": judge_crossover,
    "train": judge_train,
    "auto": judge_auto,
}


def compute_targets(res: dict, targets: tuple[Target, ...] = TARGETS) -> list[dict]:
    """Judge a run against the targets.

    Args:
      res: the run's results (``cells``, and optionally ``train``, ``train_multidevice``).
      targets: the targets (default ``TARGETS``).

    Returns:
      One row per verdict: ``target``, ``measured``, ``goal``, ``met`` (True/False, None when
      not judged) and ``detail``.
    """
    return [row for t in targets for row in JUDGES[t.judge](t, res)]
