"""Speed of the Flax linen MNIST CNN before and after graph compaction, on this CPU.

Pairs of models, each timed in the same process in paired rounds (``benchmarks.timing``:
order shuffled per round, each sample a burst of calls each waited for; the speedup is the
median over rounds of ``t_dense / t_compact`` from the same round, which cancels drift and the
load of other processes), all plain XLA (jitted ``model.apply``, AOT-compiled, default flags):

* the example's CNN (``examples/flax_cnn.py``: conv 32, conv 64, dense 256, dense 10) and the
  same model compacted by ``prunejax.compact_graph`` after 50% of its conv filters and hidden
  units were pruned (16-32-128), with the example's trained params when ``--run-dir`` holds
  them (random params at those widths otherwise: dense XLA kernels' speed depends on shapes);
* its first stage alone (3x3 conv on the one-channel image, ReLU, max-pool) at 32 and at 16
  filters: where the compacted model's time goes;
* a CNN with a wider first conv (64-64-256 -> 32-32-128), random params.

Usage::

    python -m benchmarks.cnn                      # params from runs/flax_cnn if present
    python -m benchmarks.cnn --rounds 60 --out benchmarks/results

Writes ``cnn.json`` and ``cnn.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import prunejax as pj
from benchmarks.machine import cpu_model, loadavg, machine_info
from benchmarks.timing import timed
from examples.flax_cnn import CNN, rebuild


def isa_of_cpu() -> str:
    """The widest x86 vector ISA the CPU reports (XLA's CPU code generator targets the host)."""
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return "unknown"
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sse4_2", "SSE4.2")):
        if flag in flags:
            return name
    return "other"


class FirstStage(nn.Module):
    """The CNN's first stage alone: 3x3 conv (one input channel), ReLU, 2x2 max-pool."""

    c1: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.max_pool(nn.relu(nn.Conv(self.c1, (3, 3))(x)), (2, 2), (2, 2))


def _random(model: nn.Module) -> dict:
    x = jnp.zeros((1, 28, 28, 1), jnp.float32)
    return {"model": model, "params": jax.jit(model.init)(jax.random.key(0), x)["params"]}


def trained(run_dir: Path) -> tuple[str, dict, dict, dict] | None:
    """The example's saved dense and compacted models and its results, if ``run_dir`` has them."""
    dense_file = run_dir / "dense.prunejax.safetensors"
    compact_file = run_dir / "compact.prunejax.safetensors"
    results = run_dir / "results.json"
    if not (dense_file.exists() and compact_file.exists() and results.exists()):
        return None
    saved = json.loads(results.read_text())
    small, big = rebuild(saved["widths"]), CNN(**saved["dense_widths"])
    label = (
        f"example CNN {big.c1}-{big.c2}-{big.hidden} -> {small.c1}-{small.c2}-{small.hidden}"
        f" (trained, {run_dir})"
    )
    dense = {"model": big, "params": pj.load(dense_file)}
    return label, dense, {"model": small, "params": pj.load(compact_file)}, saved


def pairs(run_dirs: list[Path]) -> tuple[list[tuple[str, dict, dict]], list[tuple[str, dict]]]:
    """``(label, dense, compact)`` model pairs (``{"model", "params"}`` each) to time, and
    the ``(label, results.json)`` of the example runs found."""
    found = [t for t in (trained(d) for d in run_dirs) if t is not None]
    out = [(label, dense, compact) for label, dense, compact, _ in found]
    if not found:
        out.append(
            (
                "example CNN 32-64-256 -> 16-32-128 (random params)",
                _random(CNN()),
                _random(CNN(16, 32, 128)),
            )
        )
    out.append(
        (
            "first stage only: conv 32 -> 16 filters + ReLU + max-pool",
            _random(FirstStage(32)),
            _random(FirstStage(16)),
        )
    )
    if not any(t[1]["model"].c1 == 64 for t in found):
        out.append(
            (
                "wider first conv: CNN 64-64-256 -> 32-32-128 (random params)",
                _random(CNN(64, 64, 256)),
                _random(CNN(32, 32, 128)),
            )
        )
    return out, [(label, saved) for label, _, _, saved in found]


def render_runs(runs: list[tuple[str, dict]]) -> list[str]:
    """The example runs' accuracy, file size and FLOPs (``examples/flax_cnn.py``)."""
    lines = [
        "",
        "Example runs (`examples/flax_cnn.py`, full MNIST unless a subset is named):",
        "",
        "| run | epochs + fine-tune | accuracy dense / masked / compact | file KB dense -> "
        "compact | MFLOPs dense -> compact | max abs(compact - masked) |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in runs:
        a, d, c = r["accuracy"], r["dense"], r["compact"]
        lines.append(
            f"| {label} | {r['epochs']} + {r['finetune_epochs']} ({r['subset']} images) | "
            f"{100 * a['dense']:.2f}% / {100 * a['masked']:.2f}% / {100 * a['compact']:.2f}% | "
            f"{d['bytes'] / 1e3:.1f} -> {c['bytes'] / 1e3:.1f} ({c['bytes'] / d['bytes']:.1%}) | "
            f"{d['flops'] / 1e6:.2f} -> {c['flops'] / 1e6:.2f} ({c['flops'] / d['flops']:.1%}) | "
            f"{r['max_abs_diff']:.1e} |"
        )
    return lines


def compiled(entry: dict, batch: int) -> tuple[Any, tuple]:
    model, params = entry["model"], jax.tree.map(jnp.asarray, entry["params"])
    xb = jnp.asarray(np.random.default_rng(0).random((batch, 28, 28, 1), np.float32))
    fn = jax.jit(lambda p, v: model.apply({"params": p}, v)).lower(params, xb).compile()
    return fn, (params, xb)


def measure(dense: dict, compact: dict, batch: int, rounds: int, calls: int) -> dict:
    """Paired rounds at one batch size: medians and the median per-round speedup."""
    cands = {"dense": compiled(dense, batch), "compact": compiled(compact, batch)}
    for fn, args in cands.values():
        timed(fn, args, 3)
    rng = random.Random(0)
    times: dict[str, list[float]] = {k: [] for k in cands}
    ratios = []
    for _ in range(rounds):
        order = list(cands)
        rng.shuffle(order)
        got = {k: timed(*cands[k], calls) for k in order}
        for k, t in got.items():
            times[k].append(t)
        ratios.append(got["dense"] / got["compact"])
    q = statistics.quantiles(ratios, n=4)
    return {
        "batch": batch,
        "dense_ms": 1e3 * statistics.median(times["dense"]),
        "compact_ms": 1e3 * statistics.median(times["compact"]),
        "speedup": statistics.median(ratios),
        "speedup_iqr": [q[0], q[2]],
        "rounds": rounds,
        "calls_per_sample": calls,
    }


def render(result: dict) -> str:
    info = result["machine"]
    lines = [
        "# Flax CNN on MNIST: dense vs graph-compacted (batch latency, CPU)",
        "",
        f"CPU: {info['cpu']} ({result['isa']}), {info['cores']} cores visible; "
        f"jax/jaxlib {info['jax']}/{info['jaxlib']} (XLA CPU, default flags), "
        f"{info['date_utc']}; load average at start {info['loadavg_start']}, at end "
        f"{result['loadavg_end']}.  Both models of a pair are plain XLA (jitted `model.apply`),",
        "timed in paired rounds in one process; speedup = median over rounds of "
        "t_dense / t_compact.",
        "",
        "| models | batch | dense ms | compact ms | speedup | IQR |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {r['batch']} | {r['dense_ms']:.3f} | {r['compact_ms']:.3f} | "
            f"{r['speedup']:.2f}x | {r['speedup_iqr'][0]:.2f}-{r['speedup_iqr'][1]:.2f} |"
        )
    lines += [
        "",
        "The first-stage pair isolates the compacted CNN's first conv.  On XLA CPU (jaxlib "
        "0.10.2) a 3x3 convolution of a one-channel image with 8, 12 or 16 filters stays a "
        "separate `convolution` op in the compiled HLO, outside the YNNPACK fusion that takes it "
        "at 20 filters and more, and runs slower at 16 filters than at 32: that stage, not the "
        "FLOPs, bounds the compacted example CNN at batch 256.  With the first conv 64 wide "
        "(pruned to 32) the same compaction keeps XLA's fast path.",
    ]
    lines += render_runs(result["runs"])
    lines += [
        "",
        f"Reproduce: `python -m benchmarks.cnn --rounds {result['rows'][0]['rounds']}`"
        " after `python examples/flax_cnn.py` (and `--widths 64,64,256 --out runs/flax_cnn_wide`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run-dir",
        default="runs/flax_cnn,runs/flax_cnn_wide",
        help="examples/flax_cnn.py --out directories, comma-separated",
    )
    parser.add_argument("--batches", default="256,1")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=3, help="calls per timed sample")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    info = machine_info()
    rows = []
    todo, runs = pairs([Path(d) for d in args.run_dir.split(",")])
    for label, dense, compact in todo:
        for b in args.batches.split(","):
            row = measure(dense, compact, int(b), args.rounds, args.calls)
            rows.append({"label": label, **row})
            print(rows[-1], flush=True)
    result = {
        "machine": info,
        "isa": isa_of_cpu(),
        "cpu": cpu_model(),
        "rows": rows,
        "runs": runs,
        "loadavg_end": loadavg(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cnn.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "cnn.md").write_text(render(result))
    print(render(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
