"""The GPU benchmark: one script, nothing installed at run time, results in two files.

    python -m benchmarks.gpu --out DIR           # full run (< 6 min on an H200)
    python -m benchmarks.gpu --quick --out DIR   # smoke run (small shapes; also runs on CPU)

Sections, each recorded even when it fails (its error is kept, the run goes on), results
rewritten after every section so that a killed run still leaves what it measured:

1. the machine: ``nvidia-smi`` (card, driver, CUDA), ``jax.devices()[0].device_kind``, JAX;
2. correctness of the Pallas block kernel on the device (Triton, not interpreted) for 16/32/64
   blocks, fp32/bf16, awkward batches, split and unsplit, against a float64 reference;
3. cells, in order of importance (the whole run is bounded in time): the 3 x 4096x4096 MLP at
   90% 16x16 blocks; BCOO/BCSR's crossover sparsity per batch on one 4096x4096 layer; the MLP at
   90% unstructured, LeNet-300-100, 2:4; batch 1, 32, 256, 4096: dense fp32 (cuBLAS, the
   baseline), dense bf16, compaction, BCOO and BCSR with and without cuSPARSE, the Pallas block
   kernel, ``auto``; ratios to dense from shuffled rounds in this process (median of
   ``t_dense / t_form`` per round), the fraction of HBM bandwidth at batch 1;
4. ``pytest tests/test_gpu_kernels.py tests/test_sparse.py`` if pytest is installed.

Writes ``results_gpu.json`` and ``RESULTS_GPU.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import gpu_cells as gc
from benchmarks import gpu_report as rep
from benchmarks.machine import cpu_model
from benchmarks.workload import build_masks, init_params
from prunejax.masks import apply_masks, block_masks, magnitude_masks
from prunejax.sparse import gpu as pgpu

FULL = {
    "models": {"wide": (4096, 4096, 4096, 4096), "lenet": (784, 300, 100, 10)},
    # sections in order of importance: the time budget cuts the last ones
    "order": (
        ("wide", "block16"),
        "crossover",
        ("wide", "unstructured"),
        ("lenet", "unstructured"),
        ("wide", "2:4"),
        ("lenet", "2:4"),
    ),
    "batches": (1, 32, 256, 4096),
    "layer": 4096,
    "sparsities": (0.5, 0.8, 0.9, 0.95, 0.98, 0.99),
    "check_shape": (256, 192),
}
QUICK = {
    "models": {"wide": (256, 256, 256, 256), "lenet": (784, 300, 100, 10)},
    "order": (
        ("wide", "block16"),
        "crossover",
        ("wide", "unstructured"),
        ("lenet", "unstructured"),
    ),
    "batches": (1, 32),
    "layer": 256,
    "sparsities": (0.5, 0.9, 0.99),
    "check_shape": (128, 64),
}


def run_cmd(cmd: list[str], timeout: float) -> str:
    """A command's stdout (stripped), or ``"unavailable: <why>"``."""
    if shutil.which(cmd[0]) is None:
        return f"unavailable: {cmd[0]} not found"
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable: {e}"
    return r.stdout.strip() if r.returncode == 0 else f"unavailable: rc {r.returncode}"


def machine() -> dict:
    """Card, driver, CUDA, JAX and host of this run."""
    import jaxlib

    dev = jax.devices()[0]
    q = "--query-gpu=name,driver_version,memory.total"
    smi = run_cmd(["nvidia-smi", q, "--format=csv,noheader"], 20)
    head = run_cmd(["nvidia-smi"], 20)
    cuda = next((ln for ln in head.splitlines() if "CUDA Version" in ln), "")
    info = {
        "device_kind": str(dev.device_kind),
        "platform": dev.platform,
        "backend": jax.default_backend(),
        "gpu": smi.splitlines()[0] if smi else smi,
        "driver": smi.split(",")[1].strip() if smi.count(",") >= 2 else None,
        "cuda": cuda.split("CUDA Version:")[-1].strip(" |") if cuda else None,
        "jax": jax.__version__,
        "jaxlib": getattr(jaxlib, "__version__", "?"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "peak_bandwidth": rep.peak_bandwidth(str(dev.device_kind)),
    }
    try:
        info["environment"] = jax.print_environment_info(return_string=True)
    except Exception as e:  # noqa: BLE001 - informative only
        info["environment"] = f"unavailable: {e}"
    return info


def check_kernel(on_gpu: bool, shape: tuple[int, int]) -> list[dict]:
    """The Pallas kernel against a float64 reference on this device (interpreted off the GPU)."""
    rows = []
    rng = np.random.default_rng(0)
    for side in (16, 32, 64):
        for dtype, tol in ((jnp.float32, 2e-2), (jnp.bfloat16, 2.0**-6)):
            for batch, split in ((1, 0), (37, 1), (256, 3)):
                name = f"block {side} {jnp.dtype(dtype).name} batch {batch} split {split}"
                try:
                    w = rng.standard_normal(shape).astype(np.float32)
                    w = np.where(block_masks({"k": w}, 0.7, block=(side, side))["k"], w, 0)
                    w = np.asarray(jnp.asarray(w, dtype).astype(jnp.float32))
                    x = jnp.asarray(rng.standard_normal((batch, shape[0])), dtype)
                    k = pgpu.PallasBlockKernel.fromdense(
                        w.astype(dtype), (side, side), split=split, interpret=not on_gpu
                    )
                    y = jax.jit(lambda x, k: x @ k)(x, k)
                    ref = np.asarray(x, np.float64) @ w.astype(np.float64)
                    err = gc.rel_error(y, ref)
                    rows.append({"name": name, "err": err, "tol": tol, "ok": bool(err <= tol)})
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    rows.append(
                        {"name": name, "ok": False, "note": f"{type(e).__name__}: {e}"[:300]}
                    )
                if not on_gpu:
                    break  # interpreted: one batch per block and dtype is enough
    for r in rows:
        r.setdefault("note", "" if on_gpu else "interpreted (no GPU)")
    return rows


def cell_rows(
    model: str, pattern: str, pruned: dict, batch: int, ctx: dict, budget: rep.Budget
) -> list[dict]:
    """Build, check and time every form of one cell; one row per form."""
    base = {"model": model, "pattern": pattern, "batch": batch}
    forms, rows = [], []
    ref = None
    for name, thunk in gc.build_forms(
        pruned, batch, pattern, ctx["kind"], ctx["on_gpu"], ctx["auto_runs"]
    ):
        row = {**base, "format": name}
        if not budget.allows(ctx["cell_s"]):
            rows.append({**row, "status": "budget", "note": "time budget spent"})
            continue
        try:
            f = thunk()
            if ref is None:
                gc.compile_form(f, ctx["mem_limit"])
                ref = np.asarray(f.exe(f.params, f.x), np.float64)
            row.update(gc.prepare(f, ref, ctx["mem_limit"], ctx["max_call"]))
            row["note"] = f.note
            forms.append((f, row))
        except Exception as e:  # noqa: BLE001 - recorded, the cell goes on
            msg = f"{type(e).__name__}: {e}"
            status = (
                "skipped" if "skipped" in msg else "mem" if isinstance(e, MemoryError) else "error"
            )
            row.update(status=status, note=msg[:400])
        rows.append(row)
    timed_forms(forms, ctx, base)
    return rows


def timed_forms(forms: list[tuple[gc.Form, dict]], ctx: dict, base: dict) -> None:
    """Time the prepared forms in rounds (a call over ``max_call`` once) and fill their rows."""
    if not forms or forms[0][0].name != "dense":
        return
    fast = [f for f, _ in forms if f.t1 <= ctx["max_call"]]
    gc.time_rounds(fast, ctx["cell_s"])
    dense = forms[0][0]
    t_dense = float(np.median(dense.times))
    for f, row in forms:
        times = f.times or [f.t1]
        med = float(np.median(times))
        ratio = rep.median_ratio(dense.times, f.times) if f.times else t_dense / f.t1
        row.update(
            median_us=med * 1e6, ratio=ratio, runs=len(times), status=row.get("status", "ok")
        )
        if not f.times:
            row["note"] = (row.get("note") or "") + f" one call ({f.t1:.2f} s > max call)"
        if base["batch"] == 1:
            row["hbm_frac"] = rep.hbm_fraction(row["stored_bytes"], med, ctx["peak"])


def layer_crossover(ctx: dict, budget: rep.Budget, n: int, sparsities: tuple) -> list[dict]:
    """BCOO / BCSR ratios to dense on one n x n layer per sparsity, batch and cuSPARSE setting."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((n, n), dtype=np.float32)
    pruned_by_s = {s: np.where(magnitude_masks({"k": w}, s)["k"], w, 0) for s in sparsities}
    out = []
    for fmt, cus in (("bcoo", True), ("bcoo", False), ("bcsr_t", True)):
        for batch in ctx["batches"]:
            pts, notes = [], []
            for s in sparsities:
                if not budget.allows(ctx["cell_s"]):
                    notes.append(f"{s}: time budget spent")
                    continue
                one = {"Dense_0": {"kernel": pruned_by_s[s], "bias": np.zeros(n, np.float32)}}
                r = crossover_point(one, batch, fmt, cus, ctx)[-1]
                pts.append((s, r.get("ratio")))
                if r.get("status") != "ok":
                    notes.append(f"{s}: {r.get('note', '')[:80]}")
            row = {"format": fmt, "batch": batch, "cusparse": cus, "points": pts}
            out.append({**row, "crossover": rep.crossover(pts), "notes": notes, "layer": n})
    return out


def crossover_point(pruned: dict, batch: int, fmt: str, cus: bool, ctx: dict) -> list[dict]:
    """Dense and one sparse form of a one-layer network, timed together: their two rows."""
    name = f"{fmt}_cusparse" if cus else fmt
    forms = [
        (n, t)
        for n, t in gc.build_forms(pruned, batch, "x", ctx["kind"], False, 1)
        if n in ("dense", name)
    ]
    rows, prepared, ref = [], [], None
    for n, thunk in forms:
        row = {"format": n}
        try:
            f = thunk()
            if ref is None:
                gc.compile_form(f, ctx["mem_limit"])
                ref = np.asarray(f.exe(f.params, f.x), np.float64)
            row.update(gc.prepare(f, ref, ctx["mem_limit"], ctx["max_call"]))
            prepared.append((f, row))
        except Exception as e:  # noqa: BLE001
            row.update(status="error", note=f"{type(e).__name__}: {e}"[:300])
        rows.append(row)
    timed_forms(prepared, {**ctx, "cell_s": ctx["cell_s"] / 3}, {"batch": batch})
    return rows


def run_pytest(timeout: float) -> dict:
    """``pytest tests/test_gpu_kernels.py tests/test_sparse.py -q`` if pytest is importable."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_gpu_kernels.py",
        "tests/test_sparse.py",
    ]
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"command": " ".join(cmd[2:]), "summary": "not run: pytest is not installed"}
    if timeout < 20:
        return {"command": " ".join(cmd[2:]), "summary": f"not run: {timeout:.0f} s left for it"}
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        tail = (r.stdout + r.stderr).strip().splitlines()
        summary, rc = (tail[-1] if tail else ""), r.returncode
        failures = [ln for ln in tail if ln.startswith("FAILED") or ln.startswith("ERROR")][:20]
    except subprocess.TimeoutExpired:
        summary, rc, failures = f"timed out after {timeout:.0f} s", None, []
    return {
        "command": " ".join(cmd[2:]),
        "rc": rc,
        "summary": summary,
        "failures": failures,
        "seconds": time.perf_counter() - t0,
    }


def section(res: dict, name: str, fn: Callable[[], Any], key: str, out: str) -> None:
    """Run one section; record its result or error and its time; rewrite the outputs."""
    t0 = time.perf_counter()
    try:
        val = fn()
        if isinstance(res.get(key), list) and isinstance(val, list):
            res[key].extend(val)
        else:
            res[key] = val
        status = "ok"
    except Exception as e:  # noqa: BLE001 - a failing section never aborts the run
        status = f"error: {type(e).__name__}: {e}"[:400]
    res["sections"].append(f"{name}: {status} ({time.perf_counter() - t0:.0f} s)")
    res["targets"] = rep.compute_targets(res["cells"], res.get("_on_gpu", False))
    res["elapsed_s"] = time.perf_counter() - res["_t0"]
    rep.write_results({k: v for k, v in res.items() if not k.startswith("_")}, out)
    print(res["sections"][-1], flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", required=True, help="folder for results_gpu.json and RESULTS_GPU.md")
    ap.add_argument("--quick", action="store_true", help="small shapes, few cells (smoke run)")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="whole run (default 345; quick 150)"
    )
    ap.add_argument(
        "--pytest-s",
        type=float,
        default=None,
        help="seconds kept for pytest at the end (default 110; quick 0 = skip)",
    )
    ap.add_argument(
        "--cell-s", type=float, default=None, help="timed rounds per cell (default 1.0)"
    )
    ap.add_argument(
        "--crossover-s", type=float, default=90.0, help="most seconds for the crossover"
    )
    ap.add_argument("--max-call", type=float, default=1.0, help="a call slower than this runs once")
    ap.add_argument(
        "--mem-limit-gb", type=float, default=None, help="skip compiled temporaries above"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    cfg = QUICK if a.quick else FULL
    if a.pytest_s is None:
        a.pytest_s = 0.0 if a.quick else 110.0
    budget = rep.Budget(
        ((150 if a.quick else 345) if a.budget_s is None else a.budget_s) - max(a.pytest_s, 0)
    )
    on_gpu = jax.default_backend() == "gpu"
    res: dict = {
        "mode": "quick" if a.quick else "full",
        "cells": [],
        "crossover": [],
        "checks": [],
        "sections": [],
        "_t0": time.perf_counter(),
        "_on_gpu": on_gpu,
    }
    section(res, "machine", machine, "info", a.out)
    kind = res.get("info", {}).get("device_kind", "cpu")
    ctx = {
        "kind": kind,
        "on_gpu": on_gpu,
        "batches": cfg["batches"],
        "max_call": a.max_call,
        "cell_s": (0.3 if a.quick else 1.0) if a.cell_s is None else a.cell_s,
        "auto_runs": 5 if a.quick else 10,
        "mem_limit": ((40 if on_gpu else 2) if a.mem_limit_gb is None else a.mem_limit_gb) * 2**30,
        "peak": res.get("info", {}).get("peak_bandwidth"),
    }
    section(res, "pallas checks", lambda: check_kernel(on_gpu, cfg["check_shape"]), "checks", a.out)
    for group in cfg["order"]:
        if group == "crossover":
            cross = rep.Budget(min(budget.left(), a.crossover_s))
            run = functools.partial(layer_crossover, ctx, cross, cfg["layer"], cfg["sparsities"])
            section(res, "crossover", run, "crossover", a.out)
            continue
        model, pattern = group
        params = init_params(cfg["models"][model], seed=0)
        pruned = apply_masks(params, build_masks(params, pattern, 0.9))
        for batch in cfg["batches"]:
            run = functools.partial(cell_rows, model, pattern, pruned, batch, ctx, budget)
            section(res, f"{model} {pattern} b{batch}", run, "cells", a.out)
    pytest_s = max(0.0, min(a.pytest_s, budget.left() + a.pytest_s)) if a.pytest_s > 0 else 0
    section(res, "pytest", lambda: run_pytest(pytest_s), "pytest", a.out)
    print(f"wrote {os.path.join(a.out, 'RESULTS_GPU.md')}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
