"""What the framework examples (``nnx_mlp.py``, ``equinox_mlp.py``) share: the MNIST subset,
minibatches, accuracy, paired timing, the machine description and the before/after table."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

import prunejax as pj
from prunejax.sparse.tuning import machine_key, time_interleaved

# outputs compared between the masked dense model and its sparse/compacted/loaded forms
RTOL, ATOL = 1e-4, 1e-5


def mnist(subset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The first ``subset`` training and ``min(subset, 10000)`` test images, flattened."""
    d = pj.load_mnist()
    n_test = min(subset, len(d.x_test))
    return d.x_train[:subset], d.y_train[:subset], d.x_test[:n_test], d.y_test[:n_test]


def minibatches(
    x: np.ndarray, y: np.ndarray, batch: int, steps: int, seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``steps`` shuffled minibatches (a new permutation every epoch)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    pos = 0
    for _ in range(steps):
        if pos + batch > len(order):
            order, pos = rng.permutation(len(x)), 0
        idx = order[pos : pos + batch]
        pos += batch
        yield x[idx], y[idx]


def accuracy(forward: Callable[[np.ndarray], Any], x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``forward`` (a jitted ``x -> logits``) in chunks of 1000."""
    hits = 0
    for i in range(0, len(x), 1000):
        hits += int((np.asarray(forward(x[i : i + 1000])).argmax(-1) == y[i : i + 1000]).sum())
    return hits / len(x)


def timings(
    forwards: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, rounds: int
) -> dict[str, dict[str, float]]:
    """Median microseconds per call at batch 256 and batch 1, all models in the same rounds."""
    out: dict[str, dict[str, float]] = {name: {} for name in forwards}
    for label, xb in (("batch256_us", x[:256]), ("batch1_us", x[:1])):
        xb = jax.device_put(xb)
        calls = {n: (lambda f=f, xb=xb: jax.block_until_ready(f(xb))) for n, f in forwards.items()}
        for name, us in time_interleaved(calls, rounds).items():
            out[name][label] = float(np.median(us))
    return out


def machine() -> str:
    """The CPU model, the compiled kernels' ISA and the threads, for every speed number."""
    k = machine_key()
    return f"{k['cpu']}, kernel ISA {k['isa']}, {k['threads']} threads, JAX {k['backend']}"


def table(rows: list[dict[str, Any]], dense: str) -> str:
    """A Markdown table of the rows (accuracy, file bytes, times, speedups over ``dense``)."""
    base = next(r for r in rows if r["model"] == dense)
    head = "| model | test accuracy | file bytes | batch 256 (ms) | batch 1 (µs) |"
    lines = [head, "|---|---:|---:|---:|---:|"]
    for r in rows:
        s256 = base["batch256_us"] / r["batch256_us"]
        s1 = base["batch1_us"] / r["batch1_us"]
        size = "-" if r.get("file_bytes") is None else f"{r['file_bytes']:,}"
        lines.append(
            f"| {r['model']} | {100 * r['accuracy']:.2f}% | {size} | "
            f"{r['batch256_us'] / 1000:.3f} ({s256:.2f}x) | {r['batch1_us']:.1f} ({s1:.2f}x) |"
        )
    return "\n".join(lines)


def report(forwards, files, x_te, y_te, rounds, name, small, sparsity):  # noqa: ANN001, ANN201
    """Accuracy, file bytes and times of every form; the table; the results dict."""
    times = timings(forwards, x_te, rounds)
    # a sparse model is saved as its pruned weights: the same file as the masked model
    file_of = {"dense": "dense", "pruned": "pruned", "sparse": "pruned", "compacted": "compact"}
    rows = [
        {
            "model": m,
            "accuracy": accuracy(f, x_te, y_te),
            "file_bytes": files.get(file_of.get(m.split(" ")[0], "")),
            **times[m],
        }
        for m, f in forwards.items()
    ]
    logits = {m: np.asarray(f(x_te[:256])) for m, f in forwards.items()}
    ref = logits["pruned (masked dense)"]
    diffs = {m: max_diff(v, ref) for m, v in logits.items() if m != "dense"}
    shapes = [
        tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(small) if hasattr(leaf, "shape")
    ]
    print(f"\n{name}: {100 * sparsity:.0f}% of every kernel pruned; compacted kernels {shapes}")
    print(f"speed measured on {machine()}\n")
    print(table(rows, "dense"))
    print(f"\nmax |logit - masked dense logit| on 256 test images: {json.dumps(diffs)}")
    return {"rows": rows, "files": files, "logits": logits, "max_diff": diffs}


def max_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def out_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def cli(run: Callable[..., dict[str, Any]], description: str, out: str, argv: list[str] | None):
    """The examples' shared command line: parse ``argv`` and call ``run`` with the options."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--subset", type=int, default=60000, help="training images (test: up to 10k)")
    p.add_argument("--steps", type=int, default=3000, help="training steps (fine-tune: half)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--format", default="csr", help="sparse format (prunejax.sparse.FORMATS)")
    p.add_argument("--rounds", type=int, default=30, help="timing rounds")
    p.add_argument("--out", default=out)
    a = p.parse_args(argv)
    return run(a.subset, a.steps, a.sparsity, a.format, a.out, a.rounds)
