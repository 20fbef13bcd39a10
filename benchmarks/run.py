"""prunejax benchmark suite: pruned-MLP inference and training speed, as ratios to dense.

One command runs everything and writes, under ``--out`` (default: ``benchmarks/results``):

* ``results.json``  every cell, machine-readable;
* ``RESULTS.md``    header (machine, CPU, cores, JAX, date), targets, key ratios, full tables;
* ``plots/*.png``   speedup vs sparsity, one figure per model and granularity, one panel per batch.

Method: every figure is a ratio to the dense baseline measured in the same process, dense and
every format of a cell timed in shuffled rounds (``benchmarks.timing``); every format's output
is checked against the masked dense output first (``benchmarks.cells``).  The modules:
``workload`` (models, params, masks, the dense baseline), ``formats`` and ``peers`` (what is
timed), ``cells`` (one cell), ``timing``, ``train_step``, ``machine``, ``targets`` (the speed
targets, as data), ``render`` (RESULTS.md and plots).

Run ``python -m benchmarks.run --help`` for the options; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import prunejax as pj
from benchmarks import cells as cl
from benchmarks import workload as wl
from benchmarks.formats import Ctx
from benchmarks.machine import loadavg, machine_info
from benchmarks.render import write_outputs
from benchmarks.train_step import bench_multidevice, bench_train, multidevice_worker

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SETTINGS = ("runs", "warmup", "min_runs", "cell_budget", "max_call", "mem_limit_gb")
SETTINGS += ("train_batch", "seed", "zero_sparsity_max")

# ----------------------------------------------------------------------------- the suite


def sparsity_points(model: str, gran: str, opts: argparse.Namespace) -> list[tuple[str, Any]]:
    """``(label, sparsity)`` of the cells of a model and granularity.

    2:4 runs at 50% only; LeNet's unstructured cells add Han et al.'s per-layer density
    (label ``"han"``) unless ``--no-han``.
    """
    sps = opts.sparsities
    if sps is None:
        sps = wl.MODEL_DEFAULT_SPARSITIES.get(model, wl.SPARSITIES)
    pts: list[tuple[str, Any]] = [(f"{round(s * 100, 2):g}%", float(s)) for s in sps]
    if gran == "2:4":
        return [(label, s) for label, s in pts if abs(s - 0.5) <= 1e-9]
    if model == "lenet" and opts.han and gran == "unstructured":
        names = wl.layer_names(wl.MODELS["lenet"])
        han = {n: round(1 - d, 4) for n, d in zip(names, wl.HAN_LENET_DENSITY, strict=True)}
        pts.append(("han", han))
    return pts


def run_model(model: str, opts: argparse.Namespace, log, notes: list[str]) -> list[dict]:
    """Every cell of one model: granularities x sparsities x batches.

    Args:
      model: a ``MODELS`` key.
      opts: the suite's options.
      log: a ``print``-like function.
      notes: collects why cells were skipped.

    Returns:
      The cells' rows.
    """
    dims = wl.MODELS[model]
    params = wl.init_params(dims, opts.seed)
    wl.check_dense_layout(params, dims)
    grans = opts.granularities
    if grans is None:
        grans = wl.MODEL_DEFAULT_GRANULARITIES.get(model, wl.GRANULARITIES)
    rng = np.random.default_rng(opts.seed + 7)
    xs = {b: rng.standard_normal((b, dims[0]), dtype=np.float32) for b in opts.batches}
    rows: list[dict] = []
    for gran in grans:
        fmts = cl.select_formats(gran, opts)
        for label, s in sparsity_points(model, gran, opts):
            t_m = time.perf_counter()
            try:
                masks = wl.build_masks(params, gran, s)
            except (ValueError, TypeError) as e:
                shape = "divisible" in str(e)  # a shape problem: same at every sparsity
                what = f"{model} {gran}: skipped," if shape else f"{model} {gran} {label}:"
                notes.append(f"{what} masks not built ({e})")
                log(f"  {what} masks not built: {e}")
                if shape:
                    break
                continue
            log(f"  {model} {gran} {label}: masks in {time.perf_counter() - t_m:.1f}s")
            pruned = pj.apply_masks(params, masks)
            cell_fmts = cl.cell_formats(fmts, params, s, opts)
            cache: dict = {}
            for b in opts.batches:
                ctx = Ctx(model, dims, gran, label, params, masks, pruned, b, xs[b], cache)
                t0 = time.perf_counter()
                cell = cl.run_cell(ctx, cell_fmts, opts, log)
                rows.extend(cell)
                dt = time.perf_counter() - t0
                log(f"  {model:5s} {gran:12s} {label:>5s} b={b:<4d} ({dt:5.1f}s) " + cl.brief(cell))
    return rows


def run_training(opts: argparse.Namespace, log) -> tuple[list[dict], Any]:
    """The training-step rows (one device) and the 2-device ones (or a note, or None)."""
    if not opts.train:
        return [], None
    # --quick: the wide model's train step is seconds per call; LeNet shows the path.
    models = [m for m in opts.models if not (opts.quick and m == "wide")]
    train = [bench_train(m, wl.MODELS[m], opts, log) for m in models]
    return train, (bench_multidevice(opts, log) if opts.multidevice else None)


def run_suite(opts: argparse.Namespace, log=print) -> dict:
    """Measure every cell and training step the options ask for.

    Args:
      opts: parsed options (``parse_args``).
      log: a ``print``-like function for progress.

    Returns:
      ``{"info", "cells", "train", "train_multidevice", "notes"}``, as ``results.json`` holds it.
    """
    t_start = time.perf_counter()
    if opts.cusparse:
        jax.config.update("jax_bcoo_cusparse_lowering", True)
    info = machine_info()
    log(
        f"jax {info['jax']} on {info['backend']} ({info['cpu']}, {info['cores']} cores); "
        f"prunejax.sparse formats: {cl.PJ_NAMES}"
    )
    notes = []
    for f in opts.formats or []:
        if not any(cl.matches(n, [f]) for n in cl.FORMATS):
            notes.append(
                f"format {f!r} is not available (not in prunejax.sparse / harness): skipped"
            )
            log(f"  format {f!r} not available: skipped")
    cells = [row for model in opts.models for row in run_model(model, opts, log, notes)]
    train, multi = run_training(opts, log)
    info["loadavg_end"] = loadavg()
    info["wall_s"] = time.perf_counter() - t_start
    info["command"] = "python -m benchmarks.run " + " ".join(opts.argv)
    info["note"] = opts.note
    info["prunejax_formats"] = cl.PJ_NAMES
    info["prunejax_formats_source"] = "prunejax.sparse.FORMATS"
    info["mask_sources"] = ["prunejax.masks"]
    info["settings"] = {k: getattr(opts, k) for k in SETTINGS}
    return {
        "info": info,
        "cells": cells,
        "train": train,
        "train_multidevice": multi,
        "notes": notes,
    }


# ----------------------------------------------------------------------------- CLI


def _csv(typ):
    def parse(s: str):
        return [typ(v) for v in s.split(",") if v.strip()]

    return parse


def _sparsity_list(s: str) -> list[float]:
    out = []
    for v in s.split(","):
        f = float(v)
        f = f / 100 if f > 1 else f
        if not 0 <= f <= 1:
            raise argparse.ArgumentTypeError(f"sparsity {v} is not in [0, 1] (or 0-100 %)")
        out.append(f)
    return out


def _grid_args(p: argparse.ArgumentParser) -> None:
    """What is measured: models, granularities, sparsities, batches, formats."""
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (< 2 min on 2 idle cores): sparsity 90%%, batch 1/256, "
        "unstructured/unit/block16, 5 runs, LeNet train step only, no "
        "multi-device, no pj.bcsr",
    )
    models = sorted(wl.MODELS)
    p.add_argument("--models", type=_csv(str), help=f"comma list of {models} (default: lenet,wide)")
    grans = list(wl.GRANULARITIES)
    p.add_argument("--granularities", type=_csv(str), help=f"comma list of {grans}")
    p.add_argument(
        "--sparsities",
        type=_sparsity_list,
        help="comma list, fractions or percent (default 0,50,80,90,95,98,99)",
    )
    p.add_argument("--batches", type=_csv(int), help="default 1,32,256")
    p.add_argument(
        "--formats",
        type=_csv(str),
        help="comma list of format names (e.g. jsp.bcoo,pj.ell,auto), run where they "
        "apply to the granularity (see --all-pairs); default: all",
    )
    p.add_argument(
        "--all-pairs",
        action="store_true",
        help="run every format on every granularity (ignore the applicability table)",
    )
    p.add_argument(
        "--no-han",
        dest="han",
        action="store_false",
        help="skip the LeNet point at Han et al.'s 8/9/26%% density",
    )


def _timing_args(p: argparse.ArgumentParser) -> None:
    """How it is timed: runs, warm-up, budgets, guards, training steps."""
    p.add_argument("--runs", type=int, help="timed runs per format (default 20)")
    p.add_argument("--warmup", type=int, help="warm-up calls (default 3)")
    p.add_argument("--min-runs", type=int, default=3)
    p.add_argument(
        "--cell-budget",
        type=float,
        help="seconds of timed calls per format per cell before runs are cut (default 2)",
    )
    p.add_argument(
        "--max-call",
        type=float,
        default=1.0,
        help="a single call slower than this gets --min-runs runs",
    )
    p.add_argument(
        "--mem-limit-gb",
        type=float,
        default=1.0,
        help="do not run executables whose compiled temporary exceeds this",
    )
    p.add_argument(
        "--zero-sparsity-max",
        type=int,
        default=1_000_000,
        help="at 0%% sparsity, only dense_x_mask, auto and dense_t run on kernels larger than "
        "this many entries",
    )
    p.add_argument("--no-train", dest="train", action="store_false")
    p.add_argument("--no-multidevice", dest="multidevice", action="store_false")
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--md-timeout", type=float, default=600)
    p.add_argument(
        "--cusparse",
        action="store_true",
        help="set jax_bcoo_cusparse_lowering=True (GPU: BCOO/BCSR via cuSPARSE; no "
        "effect on CPU). Run once with and once without to compare.",
    )
    p.add_argument("--seed", type=int, default=0)


def _output_args(p: argparse.ArgumentParser) -> None:
    """Where the results go."""
    p.add_argument("--note", default="", help="free text for the RESULTS.md header")
    p.add_argument(
        "--out", default=RESULTS_DIR, help="output folder (default: benchmarks/results/)"
    )
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument(
        "--from-json",
        metavar="PATH",
        help="measure nothing: re-render RESULTS.md and the plots from a results.json",
    )
    p.add_argument(
        "--_multidevice-worker", dest="md_worker", action="store_true", help=argparse.SUPPRESS
    )


def _check_and_default(p: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    """Reject unknown names and bad counts; fill the defaults (smaller ones with ``--quick``)."""
    q = opts.quick
    if opts.models is None:
        opts.models = ["lenet", "wide"]
    for m in opts.models:
        if m not in wl.MODELS:
            p.error(f"unknown model {m!r} (choose from {sorted(wl.MODELS)})")
    for g in opts.granularities or []:
        if g not in wl.GRANULARITIES:
            p.error(f"unknown granularity {g!r} (choose from {list(wl.GRANULARITIES)})")
    if opts.sparsities is None and q:
        opts.sparsities = [0.5, 0.9] if opts.granularities == ["2:4"] else [0.9]
        if opts.granularities is None:
            opts.granularities = ["unstructured", "unit", "block16"]
    if opts.batches is None:
        opts.batches = [1, 256] if q else list(wl.BATCHES)
    if any(b < 1 for b in opts.batches):
        p.error("batches must be >= 1")
    opts.runs = opts.runs if opts.runs is not None else (5 if q else 20)
    opts.warmup = opts.warmup if opts.warmup is not None else (2 if q else 3)
    opts.cell_budget = opts.cell_budget if opts.cell_budget is not None else (1.0 if q else 2.0)
    if opts.runs < 1 or opts.min_runs < 1:
        p.error("--runs and --min-runs must be >= 1")
    opts.min_runs = min(opts.min_runs, opts.runs)
    opts.multidevice = opts.multidevice and not q
    if opts.formats is not None:
        opts.formats = ["pj.auto" if f == "auto" else f for f in opts.formats]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``--help`` lists the options).

    Args:
      argv: the arguments (default ``sys.argv[1:]``).

    Returns:
      The options, defaults filled in; ``opts.argv`` holds the arguments as given.
    """
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _grid_args(p)
    _timing_args(p)
    _output_args(p)
    opts = p.parse_args(argv)
    opts.argv = list(sys.argv[1:] if argv is None else argv)
    _check_and_default(p, opts)
    return opts


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the suite (or re-render a ``results.json``) and write the outputs.

    Args:
      argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
      The results dict (empty for the multi-device worker).
    """
    opts = parse_args(argv)
    if opts.md_worker:
        multidevice_worker(opts)
        return {}
    if opts.from_json:
        with open(opts.from_json) as f:
            res = json.load(f)
        res.pop("targets", None)
        paths = write_outputs(res, opts.out, plots=opts.plots)
        print(f"re-rendered {len(paths)} files under {opts.out} from {opts.from_json}")
        return res
    if jax.default_backend() == "cpu" and opts.cusparse:
        print("note: --cusparse has no effect on the CPU backend")
    t0 = time.perf_counter()
    res = run_suite(opts)
    paths = write_outputs(res, opts.out, plots=opts.plots)
    print(f"wrote {len(paths)} files under {opts.out} in {time.perf_counter() - t0:.0f} s")
    return res


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
