"""Paired timing: dense and every candidate of a cell in shuffled rounds, bursts, medians.

Every figure is a ratio to the dense baseline measured in the same process: in a cell the dense
forward and every candidate are timed in rounds (order shuffled per round, fixed seed), and each
candidate's ratio is the median over rounds of ``t_dense / t_candidate`` from the same round,
which cancels drift and load from other processes.  A timed sample is a burst of back-to-back
calls, each waited for (``jax.block_until_ready``); the timed callable is the AOT-compiled
executable.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

# A timed sample is a burst of back-to-back calls lasting at least this long: steady-state
# inference (a server answering request after request) rather than one call after the other
# formats of the round ran, whose cold caches and sleeping thread pool (tens of µs) would swamp
# sub-100 µs models.
BURST_S = 2e-3
MAX_BURST = 64
SMALL_CELL_S = 1e-3
SMALL_CELL_ROUNDS = 3


def timed(fn: Callable, args: tuple, calls: int = 1) -> float:
    """Latency: seconds per call of ``calls`` back-to-back calls, each one waited for.

    Every call is blocked on (``jax.block_until_ready``), so this is the latency of one request,
    not the throughput of pipelined asynchronous dispatch (which, for a ~60 µs LeNet call at
    batch 1, is ~3x lower and hides the kernel behind dispatch).

    A callable that runs in another process (``benchmarks.deepsparse_worker.RemoteForward``)
    has a ``time_calls(calls)`` method: it is asked for the burst and times it where it runs,
    so the round trip to the process is not counted.

    Args:
      fn: the callable.
      args: its arguments.
      calls: how many calls to average over.

    Returns:
      Seconds per call.
    """
    remote = getattr(fn, "time_calls", None)
    if remote is not None:
        return remote(calls)
    t0 = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / calls


def burst_size(t1: float) -> int:
    """Calls per timed sample for a call of ``t1`` seconds: a burst of >= ``BURST_S``."""
    return int(min(MAX_BURST, max(1, math.ceil(BURST_S / max(t1, 1e-9)))))


def compile_aot(
    fn: Callable, args: tuple, jitted: bool = True
) -> tuple[Callable, int | None, float]:
    """AOT-compile a jitted ``fn`` for ``args``.

    Args:
      fn: a ``jax.jit`` function (or any callable when ``jitted`` is False: returned as is).
      args: example arguments.
      jitted: whether ``fn`` is a ``jax.jit`` function.

    Returns:
      ``(executable, temporary bytes from XLA's memory analysis or None, compile seconds)``.
    """
    if not jitted:
        return fn, None, 0.0
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    dt = time.perf_counter() - t0
    temp = None
    try:
        ma = compiled.memory_analysis()
        if ma is not None:
            temp = int(ma.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - memory analysis is optional on some backends
        temp = None
    return compiled, temp, dt


@dataclasses.dataclass
class Candidate:
    """One timed format of a cell: its executable, planned runs and the samples taken."""

    name: str
    built: Any  # benchmarks.formats.Built
    call: Callable
    runs: int
    times: list
    ratios: list
    temp_bytes: int | None = None
    compile_s: float | None = None
    status: str = "ok"
    t1: float = 0.0  # one warm call, seconds
    burst: int = 1  # calls per timed sample (see burst_size)
    notes: list = dataclasses.field(default_factory=list)


def warm_up(c: Candidate, t_first: float, opts: Any) -> None:
    """Time one warm call of ``c``, and cut its runs if they would overrun the cell budget.

    Args:
      c: the candidate (``t1``, ``burst``, ``runs``, ``status`` and ``notes`` are set).
      t_first: seconds of its first (checked) call.
      opts: the suite's options (``warmup``, ``max_call``, ``runs``, ``min_runs``,
        ``cell_budget``).
    """
    args = c.built.args
    t1 = timed(c.call, args) if t_first <= opts.max_call else t_first
    if t1 <= opts.max_call:
        for _ in range(max(0, opts.warmup - 2)):
            t1 = min(t1, timed(c.call, args))
    if t1 * opts.runs > opts.cell_budget:
        c.runs = max(opts.min_runs, int(opts.cell_budget // max(t1, 1e-9)))
        if t1 > opts.max_call:
            c.runs = opts.min_runs
        if c.runs < opts.runs:
            c.status = "capped"
            c.notes.append(f"single call {t1 * 1e3:.0f} ms: {c.runs} runs")
    c.t1 = t1
    c.burst = burst_size(t1)


def plan_rounds(t_dense: float, cands: list[Candidate], opts: Any) -> int:
    """The number of rounds of a cell; candidates' runs are cut to it (marked ``capped``).

    Sub-millisecond cells take ``SMALL_CELL_ROUNDS`` x the runs (scheduling noise is a large
    part of a call); the rounds' predicted time stays within ``cell_budget x (1 + formats)``.

    Args:
      t_dense: seconds of one warm dense call.
      cands: the cell's candidates.
      opts: the suite's options (``runs``, ``min_runs``, ``cell_budget``).

    Returns:
      How many rounds to time.
    """
    n_rounds = opts.runs
    if t_dense < SMALL_CELL_S:
        n_rounds = opts.runs * SMALL_CELL_ROUNDS
        for c in cands:
            if c.runs == opts.runs:
                c.runs = n_rounds
    t_round = t_dense * burst_size(t_dense) + sum(
        min(c.t1 * burst_size(c.t1), opts.cell_budget / max(c.runs, 1)) for c in cands
    )
    max_rounds = int(opts.cell_budget * (1 + len(cands)) // max(t_round, 1e-9))
    if max_rounds < n_rounds:
        n_rounds = max(opts.min_runs, max_rounds)
        for c in cands:
            if c.runs > n_rounds:
                c.runs = n_rounds
                c.status = "capped"
                c.notes.append(f"cell budget: {n_rounds} rounds")
    return n_rounds


def time_rounds(
    dense_call: Callable, dense_args: tuple, cands: list[Candidate], opts: Any
) -> list[float]:
    """Time dense and the candidates in shuffled rounds; fills each candidate's times and ratios.

    The order inside a round is shuffled (fixed seed ``opts.seed``): for short calls the position
    in the round matters (thread-pool wake-up, caches), and a fixed order would bias every ratio.

    Args:
      dense_call: the dense executable (already called once).
      dense_args: its arguments.
      cands: the candidates (warmed up, see ``warm_up``).
      opts: the suite's options.

    Returns:
      The dense time of every round, seconds per call.
    """
    t_dense = min(timed(dense_call, dense_args) for _ in range(max(1, opts.warmup - 1)))
    dense_burst = burst_size(t_dense)
    n_rounds = plan_rounds(t_dense, cands, opts)
    order_rng = np.random.default_rng(opts.seed)
    dense_times: list[float] = []
    for r in range(n_rounds):
        slots: list[Candidate | None] = [None, *(c for c in cands if r < c.runs)]
        t_round: dict[int, float] = {}
        for k in order_rng.permutation(len(slots)):
            c = slots[k]
            t_round[k] = (
                timed(dense_call, dense_args, dense_burst)
                if c is None
                else timed(c.call, c.built.args, c.burst)
            )
        dense_times.append(t_round[0])
        for k, c in enumerate(slots[1:], start=1):
            c.times.append(t_round[k])
            c.ratios.append(t_round[0] / t_round[k])
    return dense_times


def iqr(xs: list[float]) -> list[float] | None:
    """The first and third quartiles of ``xs`` (None below 4 samples)."""
    if len(xs) < 4:
        return None
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


def bound(kind: str, d: float, batch: int, bytes_ratio: float | None) -> float | None:
    """Physical bound on the speedup over dense at density ``d``.

    Batch 1 is memory-bound: the bound is dense bytes / format bytes (1/(2d) for CSR with int32
    indices, ~1/(1.5d) with uint16 indices, ~1/d for blocks), never above 1/d.  Larger batches
    are compute-bound: 1/d of the FLOPs.  Dense-kind formats (dense x mask) are bound by 1
    (or their byte ratio at batch 1).

    Args:
      kind: the format's kind (``"dense"`` or another).
      d: the cell's density.
      batch: the batch size.
      bytes_ratio: dense bytes / format bytes, if known.

    Returns:
      The bound, or None at density 0.
    """
    if d <= 0:
        return None
    flop = 1.0 if kind == "dense" else 1.0 / d
    if batch == 1 and bytes_ratio:
        return min(flop, bytes_ratio)
    return flop
