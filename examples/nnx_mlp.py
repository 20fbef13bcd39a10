"""Prune a Flax NNX MLP on MNIST, then run it sparse, compacted and from a small file.

The user's model is an ordinary ``nnx.Module`` (784-300-100-10, ReLU); prunejax never sees its
class, only its ``nnx.State``:

1. train it (``nnx.split`` -> a functional Adam loop on the state);
2. magnitude-prune ``--sparsity`` of every kernel (``prunejax.magnitude_masks`` on the
   ``nnx.State``; Han et al. 2015) and fine-tune with the masks held (``prunejax.masked``);
3. run the UNCHANGED model (``nnx.merge(graphdef, state)(x)``) with sparse kernels
   (``prunejax.sparsify`` on the state, ``prunejax.sparse_apply`` on the apply function), and
   compacted (``prunejax.compact`` on the state: dead units removed);
4. save the state (``prunejax.save``; ``prunejax.load`` gives an ``nnx.State`` back) and print
   accuracy, file bytes and jitted speed at batch 256 and batch 1, before and after.

Usage::

    python examples/nnx_mlp.py                           # all of MNIST (about a minute)
    python examples/nnx_mlp.py --subset 2000 --steps 50  # a smoke run (seconds)
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlp_report as rep  # noqa: E402  (examples/mlp_report.py, beside this script)

import prunejax as pj  # noqa: E402


class Mlp(nnx.Module):
    """The user's model: LeNet-300-100."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(784, 300, rngs=rngs)
        self.fc2 = nnx.Linear(300, 100, rngs=rngs)
        self.fc3 = nnx.Linear(100, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc3(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


def train(apply, state, tx, data, steps, batch, seed):  # noqa: ANN001, ANN201
    """``steps`` Adam steps of cross-entropy on the state (optax on the ``nnx.State``)."""

    def loss(state, x, y):  # noqa: ANN001, ANN202
        return optax.softmax_cross_entropy_with_integer_labels(apply(state, x), y).mean()

    @jax.jit
    def step(state, opt, x, y):  # noqa: ANN001, ANN202
        grads = jax.grad(loss)(state, x, y)
        updates, opt = tx.update(grads, opt, state)
        return optax.apply_updates(state, updates), opt

    opt = tx.init(state)
    for x, y in rep.minibatches(*data, batch, steps, seed):
        state, opt = step(state, opt, x, y)
    return state


def run(
    subset: int = 60000,
    steps: int = 3000,
    sparsity: float = 0.9,
    fmt: str = "csr",
    out: str = "runs/nnx_mlp",
    rounds: int = 30,
    batch: int = 128,
) -> dict[str, Any]:
    """The whole recipe; returns the results (rows, file sizes, the test logits of each form)."""
    x_tr, y_tr, x_te, y_te = rep.mnist(subset)
    graphdef, state = nnx.split(Mlp(nnx.Rngs(0)))

    def apply(state, x):  # noqa: ANN001, ANN202 - the user's unchanged forward
        return nnx.merge(graphdef, state)(x)

    dense = train(apply, state, optax.adam(1e-3), (x_tr, y_tr), steps, batch, 0)
    masks = pj.magnitude_masks(dense, sparsity)  # kernels only (the default where=)
    tx = pj.masked(optax.adam(3e-4), masks)
    tuned = train(apply, pj.apply_masks(dense, masks), tx, (x_tr, y_tr), steps // 2, batch, 1)
    small = pj.compact(tuned).params  # an nnx.State with narrower kernels
    sparse = pj.sparsify(tuned, fmt)  # an nnx.State holding kernel objects

    d = rep.out_dir(out)
    files = {
        "dense": pj.save(os.path.join(d, "dense.safetensors"), dense, format="dense"),
        "pruned": pj.save(os.path.join(d, "pruned.safetensors"), tuned),
        "compact": pj.save(  # compacted where that is smaller, then each leaf's smallest form
            os.path.join(d, "compact.safetensors"), tuned, format="auto", activation=jax.nn.relu
        ),
    }
    loaded = pj.load(os.path.join(d, "pruned.safetensors"))  # an nnx.State again

    run_dense = jax.jit(apply)
    run_sparse = jax.jit(pj.sparse_apply(apply))
    forwards = {
        "dense": lambda x: run_dense(dense, x),
        "pruned (masked dense)": lambda x: run_dense(tuned, x),
        f"sparse ({fmt})": lambda x: run_sparse(sparse, x),
        "compacted": lambda x: run_dense(small, x),
        "loaded": lambda x: run_dense(loaded, x),
    }
    res = rep.report(forwards, files, x_te, y_te, rounds, "nnx_mlp", small, sparsity)
    return {**res, "loaded_type": type(loaded).__name__}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return rep.cli(run, __doc__.splitlines()[0], "runs/nnx_mlp", argv)


if __name__ == "__main__":
    main()
