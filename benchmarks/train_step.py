"""Training-step speed: ``pj.masked(optax.adam)`` vs plain adam, interleaved; ratio masked/dense.

Also the same step data-parallel over 2 host devices forced onto the same cores
(``--xla_force_host_platform_device_count=2``), in a subprocess (``python -m benchmarks.run
--_multidevice-worker``): it shows the masked step runs sharded; its times are not a
multi-device speedup.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import prunejax as pj
from benchmarks.workload import MODELS, build_masks, init_params, mlp_forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPARSITY = 0.9
MASKED_SOURCE = "prunejax.masked"
MULTIDEVICE_TAG = "@@MULTIDEVICE@@"


def _step_fn(tx: optax.GradientTransformation) -> Callable:
    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(mlp_forward(p, x), y).mean()

    def step(p, s, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    return jax.jit(step, donate_argnums=(0, 1))


def _inputs(dims, opts: Any, shardings) -> tuple[Any, Any, Callable]:
    rng = np.random.default_rng(opts.seed + 1)
    x = rng.standard_normal((opts.train_batch, dims[0]), dtype=np.float32)
    y = rng.integers(0, dims[-1], opts.train_batch).astype(np.int32)
    if shardings is None:
        return jnp.asarray(x), jnp.asarray(y), jax.device_put
    rep, data = shardings
    return jax.device_put(x, data), jax.device_put(y, data), lambda t: jax.device_put(t, rep)


def _interleave(states: dict, x, y, opts: Any) -> tuple[dict[str, list[float]], int]:
    """Alternate dense and masked steps; the run count is capped like an inference cell."""
    times: dict[str, list[float]] = {name: [] for name in states}
    n = opts.runs
    r = 0
    while r < opts.warmup + n:
        for name, st in states.items():
            f, p, s = st
            t0 = time.perf_counter()
            p, s, loss = f(p, s, x, y)
            jax.block_until_ready((p, s, loss))
            dt = time.perf_counter() - t0
            st[1:] = [p, s]
            if r >= opts.warmup:
                times[name].append(dt)
        if r == opts.warmup:  # first timed round: cap the runs like an inference cell
            t_round = times["dense"][0] + times["masked"][0]
            n = min(n, max(opts.min_runs, int(opts.cell_budget * 3 // max(t_round, 1e-9))))
        r += 1
    return times, n


def bench_train(model: str, dims, opts: Any, log, *, shardings=None) -> dict:
    """Masked train step vs dense train step (adam), interleaved; ratio = masked / dense time.

    Args:
      model: the model's name (for the result).
      dims: its layer widths.
      opts: the suite's options (``seed``, ``train_batch``, ``runs``, ``warmup``, ``min_runs``,
        ``cell_budget``).
      log: a ``print``-like function.
      shardings: ``(replicated, data)`` shardings for the data-parallel step, or None.

    Returns:
      The result row: median µs of both steps, their ratio, runs, and how many pruned entries
      are nonzero after the masked steps (must be 0).
    """
    params = init_params(dims, opts.seed)
    masks = build_masks(params, "unstructured", SPARSITY)
    pruned = pj.apply_masks(params, masks)
    x, y, put = _inputs(dims, opts, shardings)
    txs = {"dense": optax.adam(1e-3), "masked": pj.masked(optax.adam(1e-3), put(masks))}
    states = {}
    for name, tx in txs.items():
        p = put(pruned)
        states[name] = [_step_fn(tx), p, tx.init(p)]
    times, n = _interleave(states, x, y, opts)
    # Correctness: pruned entries stay exactly zero under the masked optimizer.
    pm = states["masked"][1]
    leaked = sum(int(np.sum(np.asarray(pm[k]["kernel"])[~masks[k]["kernel"]] != 0)) for k in pm)
    ratios = [m / d for m, d in zip(times["masked"], times["dense"], strict=True)]
    res = {
        "model": model,
        "batch": opts.train_batch,
        "sparsity": SPARSITY,
        "optimizer": "adam",
        "masked_source": MASKED_SOURCE,
        "mask_source": "prunejax.masks",
        "dense_us": statistics.median(times["dense"]) * 1e6,
        "masked_us": statistics.median(times["masked"]) * 1e6,
        "ratio": statistics.median(ratios),
        "runs": n,
        "pruned_entries_nonzero": leaked,
        "devices": 1 if shardings is None else len(jax.devices()),
    }
    log(
        f"  train {model}: masked/dense = {res['ratio']:.3f} ({res['dense_us'] / 1e3:.1f} ms dense)"
    )
    return res


def multidevice_worker(opts: Any) -> None:
    """Runs inside a subprocess with 2 host devices: data-parallel train steps, JSON on stdout."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devs = jax.devices()
    if len(devs) < 2:
        print(json.dumps({"error": f"only {len(devs)} device(s)"}))
        return
    mesh = Mesh(np.array(devs[:2]), ("data",))
    sh = (NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data")))
    out = [bench_train(m, MODELS[m], opts, lambda s: None, shardings=sh) for m in opts.models]
    print(MULTIDEVICE_TAG + json.dumps(out))


def bench_multidevice(opts: Any, log) -> list[dict] | dict:
    """The 2-device train steps, run in a subprocess (CPU backend only).

    Args:
      opts: the suite's options (``models``, ``runs``, ``warmup``, ``train_batch``, ``seed``,
        ``md_timeout``).
      log: a ``print``-like function.

    Returns:
      One result row per model, or ``{"note": why not}``.
    """
    if jax.default_backend() != "cpu":
        return {"note": "multi-device subprocess uses forced host devices; CPU backend only"}
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "benchmarks.run", "--_multidevice-worker"]
    cmd += ["--models", ",".join(opts.models), "--runs", str(opts.runs)]
    cmd += ["--warmup", str(opts.warmup), "--train-batch", str(opts.train_batch)]
    cmd += ["--seed", str(opts.seed)]
    try:
        p = subprocess.run(
            cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=opts.md_timeout
        )
    except subprocess.TimeoutExpired:
        return {"note": f"multi-device subprocess exceeded {opts.md_timeout}s"}
    for line in p.stdout.splitlines():
        if line.startswith(MULTIDEVICE_TAG):
            res = json.loads(line[len(MULTIDEVICE_TAG) :])
            for r in res:
                log(f"  train 2-device {r['model']}: masked/dense = {r['ratio']:.3f}")
            return res
    return {
        "note": f"multi-device subprocess failed (rc {p.returncode}): "
        f"{(p.stderr or p.stdout)[-400:]}"
    }
