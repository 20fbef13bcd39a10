"""Render a run's results: ``RESULTS.md``, ``results.json`` and ``plots/*.png``, written atomically.

``render_markdown(res)`` needs only the results dict, so a committed ``results.json`` can be
re-rendered without measuring (``python -m benchmarks.run --from-json PATH``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from benchmarks.targets import compute_targets, select
from benchmarks.timing import BURST_S, MAX_BURST, SMALL_CELL_ROUNDS, SMALL_CELL_S
from prunejax._util import atomic_path, atomic_write_text

# The cells of the key-ratios table: (model, granularity, sparsity), every batch measured.
KEY_CELLS = (
    ("wide", "unstructured", "0%"),
    ("wide", "unstructured", "90%"),
    ("wide", "block16", "90%"),
    ("wide", "unit", "50%"),
    ("wide", "2:4", "50%"),
    ("wide", "unstructured", "99%"),
    ("lenet", "unstructured", "han"),
    ("lenet", "unstructured", "90%"),
    ("lenet", "unit", "90%"),
    ("layer", "unstructured", "90%"),
    ("layer", "block16", "90%"),
)
STATUS_MARKS = {"skipped": "–", "skipped-memory": "mem", "WRONG": "WRONG", "error": "err"}


def fmt_ratio(r: dict | None) -> str:
    """A table entry: the ratio (``*`` when capped), else a mark for the status."""
    if r is None:
        return ""
    if r.get("ratio") is None:
        return STATUS_MARKS.get(r["status"], r["status"])
    return f"{r['ratio']:.2f}" + ("*" if r["status"] == "capped" else "")


def _table(header: list[str]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| --- " * len(header) + "|"]


def _method(st: dict) -> str:
    return (
        f"- Method: ratio = median over rounds of t_dense / t_format, dense re-timed in "
        f"every round with every format of the cell (order shuffled per round) in the same "
        f"process; `dense.aa` is an A/A control (dense timed as a candidate: its distance "
        f"from 1.00 is the cell's noise floor); {st['runs']} runs "
        f"after {st['warmup']} warm-up calls, `jax.block_until_ready`, AOT-compiled "
        f"executables; each run is a burst of back-to-back calls, each waited for, lasting "
        f">= {BURST_S * 1e3:.0f} ms (at most {MAX_BURST} calls; one call for slow formats): "
        f"time = burst time / calls, the steady-state latency of one request; cells whose "
        f"dense call is under {SMALL_CELL_S * 1e3:.0f} ms take {SMALL_CELL_ROUNDS}x the runs. "
        f"Runaway guard: per-format timed budget {st['cell_budget']} s per cell "
        f"(fewer runs, down to {st['min_runs']}, marked `*`), executables with a compiled "
        f"temporary above {st['mem_limit_gb']} GiB are not run (`mem`). At 0% sparsity on "
        f"kernels above {st['zero_sparsity_max']:,} entries only dense_x_mask, auto and "
        "dense_t run."
    )


def header_lines(info: dict) -> list[str]:
    """The header: date, machine, CPU, versions, load, command, method, baseline, sources."""
    L = ["# prunejax benchmark results\n"]
    L.append(f"- Date: {info['date_utc']}; wall time {info['wall_s'] / 60:.1f} min")
    L.append(f"- Machine: `{info['host']}`, {info['platform']}")
    L.append(
        f"- CPU: {info['cpu']}, {info['cores']} cores; backend `{info['backend']}` "
        f"({', '.join(sorted(set(info['devices'])))})"
    )
    if "isa" in info:
        L.append(
            f"- Kernel ISA path: `{info['isa']}` (PRUNEJAX_ISA={info['isa_requested']}; "
            f"this CPU runs {', '.join(info['cpu_isas']) or '?'})"
        )
    L.append(
        f"- Versions: Python {info['python']}, JAX {info['jax']} (jaxlib {info['jaxlib']}), "
        f"NumPy {info['numpy']}, SciPy {info['scipy']}"
    )
    la0, la1 = info.get("loadavg_start"), info.get("loadavg_end")
    if la0 and la1:
        L.append(f"- Load average at start {la0[0]:.2f}, at end {la1[0]:.2f} (1-min)")
    if info.get("note"):
        L.append(f"- Note: {info['note']}")
    L.append(f"- Command: `{info['command']}`")
    L.append(_method(info["settings"]))
    L.append(
        "- Dense baseline: `x @ W + b`, W stored (in, out), jitted (checked by the harness). "
        "Models: LeNet-300-100 = 784-300-100-10; wide = 4096-4096-4096-4096 (three 4096x4096 "
        "weight matrices, ReLU between); layer = one 4096x4096 matmul."
    )
    L.append(
        f"- prunejax.sparse formats: {', '.join(info['prunejax_formats']) or 'none'} "
        f"({info['prunejax_formats_source']}); masks from "
        f"{', '.join(info['mask_sources']) or '-'}; `cusparse` lowering "
        f"{'on' if info['bcoo_cusparse_lowering'] else 'off'}."
    )
    L.append(
        "- Every format's output was checked against the masked dense output before timing "
        "(`WRONG` = mismatch, not timed).\n"
    )
    return L


def caveat_lines(cells: list[dict]) -> list[str]:
    """A caveat when cells exceed their physical bound by more than 5%."""
    over = [c for c in cells if (c.get("frac_bound") or 0) > 1.05 and c["format"] != "dense"]
    if not over:
        return []
    n_meas = sum(1 for c in cells if c.get("ratio") and c["format"] != "dense")
    return [
        f"**Caveat**: {len(over)} of {n_meas} measured "
        "cells exceed their physical bound by more than 5% (frac > 1.05 in the details). "
        "The bound assumes the dense baseline runs at the machine's limit; above it, "
        "either XLA's dense dot runs below that limit at this shape (a tuned kernel then "
        "beats 1/d) or competing processes slowed the multithreaded dense baseline more "
        "than the format (compare the cell's `dense.aa` A/A control, and the load "
        "averages above).\n"
    ]


def targets_lines(res: dict) -> list[str]:
    """The targets table (``benchmarks.targets``)."""
    L = ["## Targets\n", *_table(["target", "measured", "goal", "status", "detail"])]
    for t in compute_targets(res):
        m = "" if t["measured"] is None else f"{t['measured']:.2f}"
        g = "" if t["goal"] is None else f"{t['goal']:g}"
        s = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        L.append(f"| {t['target']} | {m} | {g} | {s} | {t['detail']} |")
    return [*L, ""]


def key_ratio_lines(cells: list[dict]) -> list[str]:
    """The key-ratios table: the ``KEY_CELLS`` at every batch, every format that ran there."""
    L = ["## Key ratios (speedup over dense, same process; `*` = capped runs)\n"]
    rows_out = []
    used: set[str] = set()
    for model, gran, sp in KEY_CELLS:
        for b in sorted({c["batch"] for c in cells}):
            rs = select(cells, model=model, granularity=gran, sparsity=sp, batch=b)
            if rs:
                rows_out.append((model, gran, sp, b, rs))
                used |= {r["format"] for r in rs if r.get("ratio") is not None}
    fmts = [f for f in dict.fromkeys(c["format"] for c in cells) if f != "dense" and f in used]
    if rows_out:
        L += _table(["model", "granularity", "sparsity", "batch", "dense µs", *fmts])
    for model, gran, sp, b, rs in rows_out:
        by = {r["format"]: r for r in rs}
        L.append(
            f"| {model} | {gran} | {sp} | {b} | {by['dense']['time_us']:.0f} | "
            + " | ".join(fmt_ratio(by.get(f)) for f in fmts)
            + " |"
        )
    return [*L, ""]


def train_lines(res: dict) -> list[str]:
    """The training-step table, and how the 2-device rows were run (or why not)."""
    if not res.get("train"):
        return []
    L = ["## Training step (adam, 90% unstructured masks; ratio = masked / dense time)\n"]
    L += _table(
        ["model", "devices", "batch", "dense ms", "masked ms", "ratio", "masked via"]
        + ["pruned entries nonzero after steps"]
    )
    multi = res.get("train_multidevice")
    for t in list(res["train"]) + (multi if isinstance(multi, list) else []):
        L.append(
            f"| {t['model']} | {t['devices']} | {t['batch']} | {t['dense_us'] / 1e3:.2f} "
            f"| {t['masked_us'] / 1e3:.2f} | {t['ratio']:.3f} | {t['masked_source']} | "
            f"{t['pruned_entries_nonzero']} |"
        )
    if isinstance(multi, dict):
        L.append(f"\nMulti-device: {multi.get('note')}")
    else:
        L.append(
            "\nRows with 2 devices: data-parallel over the batch on 2 XLA host devices "
            "forced onto the same cores (`--xla_force_host_platform_device_count=2`), "
            "params, optimizer state and masks replicated. They show the masked step "
            "runs sharded; their times are not a multi-device speedup."
        )
    return [*L, ""]


ALL_CELLS_INTRO = (
    "Ratio = speedup over dense (higher is better); `–` = not applicable (see the "
    "details' note), `mem` = not run, compiled temporary above the limit. bound = "
    "physical bound at that density: batch 1 is memory-bound, dense bytes / format "
    "bytes (1/(2d) for CSR with int32 indices, ~1/d for blocks), capped at 1/d; larger "
    "batches 1/d of the FLOPs; compacted: its FLOP ratio. frac = ratio / bound (above 1 "
    "means the dense baseline ran below the machine's limit, or was slowed more than "
    "the format by other processes; see the caveat above). temp = XLA compiled "
    "temporary buffer (peak scratch beyond arguments and outputs), bytes = stored "
    "kernels and biases.\n"
)
DETAIL_COLUMNS = ["sparsity", "batch", "format", "status", "µs", "ratio", "bound", "frac"]
DETAIL_COLUMNS += ["temp MB", "bytes MB", "runs", "note"]


def _num(v: Any, spec: str, scale: float = 1.0) -> str:
    return "" if v is None else format(v / scale, spec)


def detail_row(r: dict) -> str:
    """One row of a group's details table."""
    return (
        f"| {r['sparsity']} | {r['batch']} | {r['format']} | {r['status']} | "
        f"{_num(r.get('time_us'), '.0f')} | {_num(r.get('ratio'), '.2f')} | "
        f"{_num(r.get('bound'), '.1f')} | {_num(r.get('frac_bound'), '.2f')} | "
        f"{_num(r.get('temp_bytes'), '.1f', 2**20)} | {_num(r.get('nbytes'), '.2f', 2**20)} | "
        f"{r.get('runs', '')} | {str(r.get('note', '')).replace('|', '/')} |"
    )


def group_lines(cells: list[dict], model: str, gran: str) -> list[str]:
    """One model and granularity: the ratio table by sparsity and batch, then the details."""
    gc = select(cells, model=model, granularity=gran)
    fm = list(dict.fromkeys(c["format"] for c in gc if c["format"] != "dense"))
    L = [f"### {model}, {gran}\n", *_table(["sparsity", "batch", "dense µs", *fm])]
    for sp in dict.fromkeys(c["sparsity"] for c in gc):
        for b in sorted({c["batch"] for c in gc}):
            by = {r["format"]: r for r in select(gc, sparsity=sp, batch=b)}
            if by:
                L.append(
                    f"| {sp} | {b} | {by['dense']['time_us']:.0f} | "
                    + " | ".join(fmt_ratio(by.get(f)) for f in fm)
                    + " |"
                )
    L.append("")
    L.append("<details><summary>details (µs, bound, fraction of bound, memory, notes)</summary>\n")
    L += _table(DETAIL_COLUMNS)
    L += [detail_row(r) for r in gc]
    return [*L, "\n</details>\n"]


def render_markdown(res: dict) -> str:
    """``RESULTS.md``: header, caveat, targets, key ratios, training step, every cell, notes.

    Args:
      res: the run's results (``info``, ``cells``, ``train``, ``train_multidevice``, ``notes``).

    Returns:
      The Markdown text.
    """
    cells = res["cells"]
    L = header_lines(res["info"]) + caveat_lines(cells) + targets_lines(res)
    L += key_ratio_lines(cells) + train_lines(res)
    L += ["## All cells, by model and granularity\n", ALL_CELLS_INTRO]
    for model, gran in dict.fromkeys((c["model"], c["granularity"]) for c in cells):
        L += group_lines(cells, model, gran)
    if res.get("notes"):
        L += ["## Notes\n", *(f"- {n}" for n in res["notes"]), ""]
    return "\n".join(L) + "\n"


def _by_sparsity(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda c: 1 - c["density"])


def _plot_bounds(ax: Any, gc: list[dict], gran: str, b: int) -> None:
    """The bound curves of one panel: the compacted FLOP ratio for units, else 1/d (1/(2d))."""
    if gran == "unit":
        # Unit pruning: the bound is the compacted network's FLOP ratio (rows of the next
        # layer go too), not 1/d of the weights.
        rs = _by_sparsity([c for c in select(gc, batch=b, format="compact") if c.get("bound")])
        if rs:
            x = [100 * (1 - r["density"]) for r in rs]
            ax.plot(x, [r["bound"] for r in rs], "k:", lw=1, label="FLOP-ratio bound (compact)")
        return
    sps = sorted({(1 - c["density"]) for c in select(gc, batch=b) if c["density"] > 0})
    if sps:
        x = [100 * s for s in sps]
        ax.plot(x, [1 / (1 - s) for s in sps], "k:", lw=1, label="1/d bound")
        if b == 1:
            ax.plot(x, [1 / (2 * (1 - s)) for s in sps], "k--", lw=0.8, label="1/(2d) bound")


def _plot_panel(ax: Any, gc: list[dict], model: str, gran: str, b: int) -> None:
    """One batch: every format's speedup vs sparsity, with the bounds, log scale."""
    for f in dict.fromkeys(c["format"] for c in gc if c["format"] != "dense"):
        rs = _by_sparsity([c for c in select(gc, batch=b, format=f) if c.get("ratio") is not None])
        if rs:
            x = [100 * (1 - r["density"]) for r in rs]
            ax.plot(x, [r["ratio"] for r in rs], marker="o", ms=3, label=f)
    _plot_bounds(ax, gc, gran, b)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_title(f"{model}, {gran}, batch {b}")
    ax.set_xlabel("weight sparsity (%)" + (" (last layer's units kept)" if gran == "unit" else ""))
    ax.set_ylabel("speedup over dense")
    ax.grid(True, which="both", alpha=0.3)


def render_plots(res: dict, outdir: str) -> list[str]:
    """``plots/speedup_<model>_<granularity>.png``: speedup vs sparsity, one panel per batch.

    Args:
      res: the run's results.
      outdir: the output folder (the plots go to ``outdir/plots``).

    Returns:
      The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cells = [c for c in res["cells"] if c["sparsity"] != "han"]
    for model, gran in dict.fromkeys((c["model"], c["granularity"]) for c in res["cells"]):
        gc = select(cells, model=model, granularity=gran)
        if not gc:
            continue
        batches = sorted({c["batch"] for c in gc})
        fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
        for ax, b in zip(axes[0], batches, strict=True):
            _plot_panel(ax, gc, model, gran, b)
        axes[0][-1].legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        fn = os.path.join(outdir, "plots", f"speedup_{model}_{gran.replace(':', 'of')}.png")
        with atomic_path(fn, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
        written.append(fn)
    return written


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, set):
        return sorted(o)
    raise TypeError(type(o).__name__)


def write_outputs(res: dict, outdir: str, *, plots: bool = True) -> list[str]:
    """Write ``results.json`` (with the targets), ``RESULTS.md`` and the plots under ``outdir``.

    Args:
      res: the run's results.
      outdir: the output folder (created if missing).
      plots: also render the plots.

    Returns:
      The paths written.
    """
    res = {**res, "targets": compute_targets(res)}
    paths = [os.path.join(outdir, "results.json"), os.path.join(outdir, "RESULTS.md")]
    atomic_write_text(paths[0], json.dumps(res, indent=1, default=_json_default) + "\n")
    atomic_write_text(paths[1], render_markdown(res))
    if plots:
        paths += render_plots(res, outdir)
    return paths
