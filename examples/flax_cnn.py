"""Prune a Flax linen CNN on MNIST and make it physically smaller with graph compaction.

The user's own model, 2 conv + 2 dense layers written with ``flax.linen``:

1. train it on MNIST (Adam, cross-entropy);
2. prune 50% of the filters of both conv layers and 50% of the hidden dense units by L2 norm
   (``prunejax.unit_masks``, whole output channels with their biases; the 10 output units are
   kept by default), then fine-tune with the masks held (``prunejax.masked``: pruned weights
   stay exactly zero);
3. compact it from its computation graph (``prunejax.compact_graph``): the jaxpr says which
   slices belong to each channel (a conv filter, its bias, the next conv's input channel, the
   ``7 * 7`` rows of the first dense kernel that the flattened channel feeds), and every dead
   channel and unit is cut out of all of them; the module is rebuilt at the new widths
   (``CNN(c1, c2, hidden)``) and checked to compute what the masked model computes;
4. save the dense, the masked and the compacted params (``prunejax.save``) and print test
   accuracy, file size, FLOPs per example (``prunejax.size_report``) and the batch-256 CPU
   latency of the jitted forward pass before/after (``benchmarks/cnn.py`` measures the speed
   properly, with the CPU named).

Usage::

    python examples/flax_cnn.py                      # full MNIST (a few minutes on 2 cores)
    python examples/flax_cnn.py --subset 512 --epochs 1 --finetune-epochs 1   # seconds

Outputs (the three model files and ``results.json``) go to ``--out`` (``runs/flax_cnn``).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import prunejax as pj
from prunejax.report import conv_spatial


class CNN(nn.Module):
    """2 conv (3x3, SAME, ReLU, 2x2 max-pool) + 2 dense layers, widths as fields."""

    c1: int = 32
    c2: int = 64
    hidden: int = 256

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.max_pool(nn.relu(nn.Conv(self.c1, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(self.c2, (3, 3))(x)), (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


def rebuild(widths: dict[str, Any]) -> CNN:
    """The user's module at the widths ``compact_graph`` found."""
    return CNN(
        c1=widths["params/Conv_0"], c2=widths["params/Conv_1"], hidden=widths["params/Dense_0"]
    )


def train(
    model: CNN, params: Any, data: tuple, tx: optax.GradientTransformation, args: Any, epochs: int
) -> Any:
    """``epochs`` epochs of mini-batch training with ``tx``; returns the params."""

    def loss_fn(p: Any, xb: jax.Array, yb: jax.Array) -> jax.Array:
        logits = model.apply({"params": p}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(p: Any, state: Any, xb: jax.Array, yb: jax.Array) -> tuple:
        grads = jax.grad(loss_fn)(p, xb, yb)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    x, y = data
    state = tx.init(params)
    batch = min(args.batch_size, len(x))
    for epoch in range(epochs):
        for xb, yb in pj.batches(x, y, batch, seed=args.seed, epoch=epoch):
            params, state = step(params, state, xb, yb)
    return params


@functools.cache
def _predict(model: CNN) -> Callable:
    return jax.jit(lambda p, xb: jnp.argmax(model.apply({"params": p}, xb), -1))


def accuracy(model: CNN, params: Any, x: np.ndarray, y: np.ndarray) -> float:
    fn = _predict(model)
    hits = sum(
        int((np.asarray(fn(params, x[i : i + 1000])) == y[i : i + 1000]).sum())
        for i in range(0, len(x), 1000)
    )
    return hits / len(x)


def latencies(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each jitted thunk, the thunks timed round-robin."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", type=int, default=None, help="first N training images")
    parser.add_argument(
        "--widths", default="32,64,256", help="dense model's conv1,conv2,hidden widths"
    )
    parser.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of units pruned")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=30, help="timed batch-256 calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: auto)")
    parser.add_argument("--out", default="runs/flax_cnn", help="output directory")
    args = parser.parse_args(argv)
    if args.subset is not None and args.subset < 1:
        parser.error(f"--subset must be >= 1, got {args.subset}")
    try:
        args.widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        args.widths = ()
    if len(args.widths) != 3 or min(args.widths) < 1:
        parser.error(f"--widths must be three positive integers c1,c2,hidden, got {args.widths}")
    return args


def load(args: argparse.Namespace) -> tuple:
    mnist = pj.load_mnist(args.data_dir)
    n = args.subset or len(mnist.x_train)
    n_test = len(mnist.x_test) if args.subset is None else min(len(mnist.x_test), n)
    train_xy = (mnist.x_train[:n].reshape(-1, 28, 28, 1), mnist.y_train[:n])
    test_xy = (mnist.x_test[:n_test].reshape(-1, 28, 28, 1), mnist.y_test[:n_test])
    return train_xy, test_xy


def sizes(params: dict[str, Any], model: CNN, out: Path, name: str) -> dict[str, int]:
    """File bytes (``prunejax.save``, smallest encoding per leaf) and FLOPs per example."""
    nbytes = pj.save(out / f"{name}.prunejax.safetensors", params)
    spatial = conv_spatial(
        lambda p, x: model.apply({"params": p}, x),
        params,
        jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32),
    )
    flops = pj.size_report(params, spatial=spatial).total()["flops_dense"]
    return {"bytes": int(nbytes), "flops": int(flops)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (x, y), (x_test, y_test) = load(args)
    model = CNN(*args.widths)
    params = jax.jit(model.init)(jax.random.key(args.seed), x[:1])["params"]
    params = train(model, params, (x, y), optax.adam(args.lr), args, args.epochs)
    acc = {"dense": accuracy(model, params, x_test, y_test)}

    # conv filters and hidden units, by L2 norm; the head Dense_1 keeps its 10 units (named, as
    # Conv_<n> and Dense_<n> names do not say which family comes first)
    masks = pj.unit_masks(params, args.sparsity, output="Dense_1")
    masked = pj.apply_masks(params, masks)
    masked = train(
        model, masked, (x, y), pj.masked(optax.adam(args.lr / 2), masks), args, args.finetune_epochs
    )
    acc["masked"] = accuracy(model, masked, x_test, y_test)

    small = pj.compact_graph(
        lambda v, xb: model.apply(v, xb), {"params": masked}, x[:2], masks=masks
    )
    compact_model = rebuild(small.widths)
    compact = small.params["params"]
    acc["compact"] = accuracy(compact_model, compact, x_test, y_test)
    xb = jnp.asarray(np.resize(x_test, (256, 28, 28, 1)))
    dense_fn = jax.jit(lambda p, v: model.apply({"params": p}, v))
    small_fn = jax.jit(lambda p, v: compact_model.apply({"params": p}, v))
    diff = float(jnp.max(jnp.abs(small_fn(compact, xb) - dense_fn(masked, xb))))
    secs = latencies(
        {"dense": lambda: dense_fn(params, xb), "compact": lambda: small_fn(compact, xb)},
        args.repeats,
    )
    result = {
        "subset": len(x),
        "epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs,
        "widths": small.widths,
        "dense_widths": dict(zip(("c1", "c2", "hidden"), args.widths, strict=True)),
        "accuracy": acc,
        "max_abs_diff": diff,
        "dense": sizes(params, model, out, "dense"),
        "masked": sizes(masked, model, out, "masked"),
        "compact": sizes(compact, compact_model, out, "compact"),
        "batch256_seconds": secs,
        "speedup": secs["dense"] / secs["compact"],
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    return result


def report(r: dict[str, Any]) -> None:
    d, c = r["dense"], r["compact"]
    print(f"widths: {r['dense_widths']} -> {r['widths']}")
    print(f"{'model':<10}{'accuracy':>10}{'file KB':>10}{'MFLOPs':>10}{'batch-256 ms':>14}")
    for name in ("dense", "masked", "compact"):
        ms = r["batch256_seconds"].get(name)
        print(
            f"{name:<10}{100 * r['accuracy'][name]:>9.2f}%{r[name]['bytes'] / 1e3:>10.1f}"
            f"{r[name]['flops'] / 1e6:>10.2f}{'' if ms is None else f'{1e3 * ms:.2f}':>14}"
        )
    print(
        f"compact/dense: file {c['bytes'] / d['bytes']:.1%}, FLOPs {c['flops'] / d['flops']:.1%}"
        f", speed {r['speedup']:.2f}x; max |compact - masked| = {r['max_abs_diff']:.2e}"
    )


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
