"""The format registry and one cell: build, check and time dense + every format of a cell.

A cell is (model, granularity, sparsity, batch).  Every format's output is checked against the
masked dense output before it is timed; a format that disagrees is reported as WRONG, not timed.
Runaway guards: a compiled executable whose temporary buffer exceeds ``--mem-limit-gb`` is not
run; a format whose calls would overrun ``--cell-budget`` gets fewer runs (down to
``--min-runs``) and is marked ``capped``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import formats as fm
from benchmarks.peers import PEERS
from benchmarks.timing import Candidate, bound, compile_aot, iqr, time_rounds, warm_up
from benchmarks.workload import density, kernels
from prunejax.sparse import FORMATS as PJ_FORMATS

Builder = Callable[[fm.Ctx], fm.Built]

# Which granularities a prunejax format runs on by default (others: index formats).
PJ_GRANULARITIES: dict[str, set[str] | None] = {
    "auto": None,
    "block": {"block16"},
    "nm": {"2:4"},
    "bcoo": {"unstructured", "2:4"},
    "bcsr": {"unstructured"},
    "ell": {"unstructured", "2:4"},
    # The Pallas block kernel is a GPU kernel (on CPU its pure-JAX fallback): benchmarks.gpu.
    "pallas_block": {"block16"} if jax.default_backend() == "gpu" else set(),
}
# The prunejax.sparse formats timed as ``pj.<name>`` (``dense`` is the baseline itself).
PJ_NAMES = [n for n in PJ_FORMATS if n != "dense"]

# name -> (builder, granularities it applies to by default (None = all))
FORMATS: dict[str, tuple[Builder, set[str] | None]] = {
    "dense.aa": (fm.build_dense_aa, None),
    # Its cost does not depend on the mask's pattern: measured on unstructured masks only.
    "dense_x_mask": (fm.build_dense_x_mask, {"unstructured"}),
    **PEERS,
    "compact": (fm.build_compact, {"unit"}),
    "compact.auto": (fm.build_compact_auto, {"unit"}),
    **{
        f"pj.{n}": (fm.pj_builder(n), PJ_GRANULARITIES.get(n, {"unstructured", "2:4", "block16"}))
        for n in PJ_NAMES
    },
}
REFERENCE_FORMATS = {"dense.aa", "dense_x_mask", *PEERS}

# Formats not run by default on kernels larger than this many entries (slow to build there,
# and a known loss): pj.bcsr (BCSR on the right of x @ W: gather/scatter, ~30 s to build per
# 4096x4096 sparsity level, 0.01-0.1x of dense on LeNet already).
MAX_ENTRIES = {"pj.bcsr": 1_000_000}
# Pairs of identical computations (same matrix format, same product) are not run twice by
# default: name -> the equivalent that runs instead.  ``jsp.bcoo`` (built from NumPy indices)
# is kept over ``pj.bcoo`` (``BCOO.fromdense``, slow to build at 4096^2); ``pj.bcsr_t`` over
# ``jsp.bcsr`` (both: W^T as BCSR on the left).
DUPLICATES = {"pj.bcoo": "jsp.bcoo", "jsp.bcsr": "pj.bcsr_t"}
# At 0% sparsity on large kernels only these run (a sparse format then stores every entry).
ZERO_SPARSITY_FORMATS = ("dense.aa", "dense_x_mask", "pj.auto", "pj.dense_t", "onnxruntime")


def matches(name: str, wanted: Sequence[str]) -> bool:
    """Whether format ``name`` is asked for by ``wanted`` (full names or without the prefix)."""
    return name in wanted or name.split(".", 1)[-1] in wanted


def select_formats(gran: str, opts: Any) -> list[str]:
    """The formats run on granularity ``gran``: ``--formats`` or the defaults, see ``FORMATS``."""
    names = []
    for name, (_, grans) in FORMATS.items():
        if opts.formats is not None:
            if not matches(name, opts.formats):
                continue
        elif name in DUPLICATES and DUPLICATES[name] in FORMATS and not opts.all_pairs:
            continue
        if opts.all_pairs or grans is None or gran in grans:
            names.append(name)
    return names


def cell_formats(fmts: list[str], params: dict, sparsity: Any, opts: Any) -> list[str]:
    """``fmts`` less those too slow to build at this model's size (see ``MAX_ENTRIES``) and, at
    0% sparsity on kernels above ``--zero-sparsity-max`` entries, the sparse formats."""
    big = max(k.size for k in kernels(params))
    out = [
        f
        for f in fmts
        if opts.all_pairs
        or opts.formats is not None
        or f not in MAX_ENTRIES
        or big <= MAX_ENTRIES[f] // (1000 if opts.quick else 1)
    ]
    if sparsity == 0.0 and big > opts.zero_sparsity_max:
        out = [f for f in out if f in ZERO_SPARSITY_FORMATS]
    return out


def _failed(status: str, stage: str, e: Exception) -> dict:
    return {"status": status, "note": f"{stage}: {type(e).__name__}: {e}"[:300]}


def _checked_output(c: Candidate, ref: np.ndarray) -> tuple[float, dict | None]:
    """Run ``c`` once; ``(seconds, None)`` when its output equals the masked dense ``ref``."""
    t0 = time.perf_counter()
    out = c.call(*c.built.args)
    jax.block_until_ready(out)
    t_first = time.perf_counter() - t0
    out = np.asarray(out)
    scale = float(np.max(np.abs(ref))) + 1.0
    if out.shape == ref.shape and np.allclose(out, ref, rtol=1e-3, atol=1e-4 * scale):
        return t_first, None
    err = float(np.max(np.abs(out - ref))) if out.shape == ref.shape else float("nan")
    note = f"output differs from masked dense (max abs err {err:.3g}, shape {out.shape})"
    return t_first, {"status": "WRONG", "note": note}


def prepare(name: str, ctx: fm.Ctx, ref: np.ndarray, opts: Any, log) -> Candidate | dict:
    """Build, compile, check and warm up format ``name`` for a cell.

    Args:
      name: a ``FORMATS`` key.
      ctx: the cell.
      ref: the masked dense output.
      opts: the suite's options.
      log: a ``print``-like function.

    Returns:
      The candidate to time, or the fields of its result row when it is not timed (skipped,
      error, over the memory limit, WRONG).
    """
    t0 = time.perf_counter()
    try:
        built = FORMATS[name][0](ctx)
    except fm.Skip as e:
        return {"status": "skipped", "note": str(e)}
    except Exception as e:  # noqa: BLE001 - a broken format must not stop the suite
        log(f"    {name}: build error {e!r}"[:200])
        return _failed("error", "build", e)
    build_s = time.perf_counter() - t0
    try:
        call, temp, comp_s = compile_aot(built.fn, built.args, built.jitted)
    except Exception as e:  # noqa: BLE001
        log(f"    {name}: compile error {e!r}"[:200])
        return _failed("error", "compile", e)
    if temp is not None and temp > opts.mem_limit_gb * 2**30:
        gib = temp / 2**30
        note = f"compiled temporary {gib:.2f} GiB > --mem-limit-gb {opts.mem_limit_gb}; not run"
        return {
            "status": "skipped-memory",
            "temp_bytes": temp,
            "nbytes": built.nbytes,
            "kind": built.kind,
            "note": note,
        }
    c = Candidate(name, built, call, opts.runs, [], [], temp, comp_s)
    c.notes.append(f"build {build_s:.2f}s")
    try:
        t_first, wrong = _checked_output(c, ref)
    except Exception as e:  # noqa: BLE001
        log(f"    {name}: run error {e!r}"[:200])
        return _failed("error", "run", e)
    if wrong is not None:
        log(f"    {name}: WRONG output")
        return wrong
    warm_up(c, t_first, opts)
    if build_s + comp_s > 5:
        log(f"    {name}: build {build_s:.1f}s, compile {comp_s:.1f}s")
    return c


def flop_ratio(params: dict, small: dict) -> float:
    """Dense FLOPs / FLOPs of a compacted network (the bound of compaction)."""
    dense_flops = sum(k.size for k in kernels(params))
    small_flops = sum(int(np.prod(k.shape)) for k in kernels(small))
    return dense_flops / max(small_flops, 1)


def _candidate_fields(c: Candidate, ctx: fm.Ctx, d: float, dense_nbytes: int, dense_times) -> dict:
    ratio = statistics.median(c.ratios)
    bratio = (dense_nbytes / c.built.nbytes) if c.built.nbytes else None
    b = bound(c.built.kind, d, ctx.batch, bratio)
    if c.built.kind == "compact":
        b = flop_ratio(ctx.params, c.built.args[0])
    return {
        "status": c.status,
        "time_us": statistics.median(c.times) * 1e6,
        "dense_us": statistics.median(dense_times[: c.runs]) * 1e6,
        "ratio": ratio,
        "runs": c.runs,
        "ratio_iqr": iqr(c.ratios),
        "temp_bytes": c.temp_bytes,
        "nbytes": c.built.nbytes,
        "compile_s": c.compile_s,
        "kind": c.built.kind,
        "bound": b,
        "frac_bound": (ratio / b) if b else None,
        "note": "; ".join([c.built.note] + c.notes if c.built.note else c.notes),
    }


def _dense_fields(dense: fm.Built, temp: int | None, dense_times: list[float], opts: Any) -> dict:
    med = statistics.median(dense_times)
    return {
        "status": "ok" if len(dense_times) >= opts.runs else "capped",
        "time_us": med * 1e6,
        "dense_us": med * 1e6,
        "ratio": 1.0,
        "runs": len(dense_times),
        "temp_bytes": temp,
        "nbytes": dense.nbytes,
        "kind": "dense",
        "bound": 1.0,
        "frac_bound": 1.0,
        "note": "",
    }


def run_cell(ctx: fm.Ctx, fmt_names: Sequence[str], opts: Any, log) -> list[dict]:
    """Build, check and time dense + every format of one cell in shuffled rounds.

    Args:
      ctx: the cell.
      fmt_names: ``FORMATS`` keys to run.
      opts: the suite's options (``runs``, ``warmup``, ``min_runs``, ``cell_budget``,
        ``max_call``, ``mem_limit_gb``, ``seed``).
      log: a ``print``-like function.

    Returns:
      One row per format, dense first: the cell's fields, ``format``, ``status`` and, for the
      timed ones, median µs, ratio to dense, runs, bound, fraction of bound, bytes, notes.
    """
    dense = fm.build_dense(ctx)
    dense_call, dense_temp, _ = compile_aot(dense.fn, dense.args)
    ref = np.asarray(dense_call(*dense.args))
    d = density(ctx.masks)
    fields = {
        "model": ctx.model,
        "granularity": ctx.granularity,
        "sparsity": ctx.sparsity_label,
        "density": d,
        "batch": ctx.batch,
    }
    rows, cands = [], []
    for name in fmt_names:
        got = prepare(name, ctx, ref, opts, log)
        if isinstance(got, Candidate):
            cands.append(got)
        else:
            rows.append({**fields, "format": name, **got})
    dense_times = time_rounds(dense_call, dense.args, cands, opts)
    dense_row = {**fields, "format": "dense", **_dense_fields(dense, dense_temp, dense_times, opts)}
    timed_rows = [
        {**fields, "format": c.name, **_candidate_fields(c, ctx, d, dense.nbytes, dense_times)}
        for c in cands
    ]
    return [dense_row, *rows, *timed_rows]


def brief(rows: list[dict]) -> str:
    """One log line for a cell: dense time and every format's ratio or status."""
    parts = []
    for r in rows:
        if r["format"] == "dense":
            parts.append(f"dense {r['time_us'] / 1e3:.2f}ms")
        elif r.get("ratio") is not None:
            parts.append(
                f"{r['format']} {r['ratio']:.2f}x" + ("*" if r["status"] == "capped" else "")
            )
        elif r["status"] != "skipped":
            parts.append(f"{r['format']} {r['status']}")
    return " | ".join(parts)
