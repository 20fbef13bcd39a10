"""Prune an Equinox MLP on MNIST, then run it sparse, compacted and from a small file.

The user's model is an ordinary ``eqx.Module`` (784-300-100-10, ReLU, ``eqx.nn.Linear`` layers
whose weights are ``(out, in)`` and used as ``W @ x`` on one example, batched with
``jax.vmap``).  prunejax takes the module itself:

1. train it (``eqx.partition(model, eqx.is_array)`` -> Adam on the arrays);
2. magnitude-prune ``--sparsity`` of every weight (``prunejax.magnitude_masks`` on the arrays;
   Han et al. 2015) and fine-tune with the masks held (``prunejax.masked``);
3. run the UNCHANGED module call (``jax.vmap(model)(x)``) with sparse kernels
   (``prunejax.sparsify`` on the module: each ``(out, in)`` weight becomes a
   ``TransposedKernel``; ``prunejax.sparse_apply`` on the call), and compacted
   (``prunejax.compact`` on the module: a narrower module of the same class);
4. save the module (``prunejax.save``; ``prunejax.load(path, like=model)`` gives a module back)
   and print accuracy, file bytes and jitted speed at batch 256 and batch 1, before and after.

Usage::

    python examples/equinox_mlp.py                           # all of MNIST (about a minute)
    python examples/equinox_mlp.py --subset 2000 --steps 50  # a smoke run (seconds)
"""

from __future__ import annotations

import os
import sys
from typing import Any

import equinox as eqx
import jax
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlp_report as rep  # noqa: E402  (examples/mlp_report.py, beside this script)

import prunejax as pj  # noqa: E402


class Mlp(eqx.Module):
    """The user's model: LeNet-300-100 on one flattened image."""

    layers: list[eqx.nn.Linear]

    def __init__(self, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.layers = [
            eqx.nn.Linear(784, 300, key=k1),
            eqx.nn.Linear(300, 100, key=k2),
            eqx.nn.Linear(100, 10, key=k3),
        ]

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def forward(model: Any) -> Any:
    """A jitted ``x -> logits`` for a module (arrays traced, everything else static)."""
    arrays, static = eqx.partition(model, eqx.is_array)
    run = jax.jit(lambda a, x: jax.vmap(eqx.combine(a, static))(x))
    return lambda x: run(arrays, x)


def train(model, tx, data, steps, batch, seed):  # noqa: ANN001, ANN201
    """``steps`` optimizer steps of cross-entropy on the module's arrays."""
    params, static = eqx.partition(model, eqx.is_array)

    def loss(params, x, y):  # noqa: ANN001, ANN202
        logits = jax.vmap(eqx.combine(params, static))(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt, x, y):  # noqa: ANN001, ANN202
        grads = jax.grad(loss)(params, x, y)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    opt = tx.init(params)
    for x, y in rep.minibatches(*data, batch, steps, seed):
        params, opt = step(params, opt, x, y)
    return eqx.combine(params, static)


def run(
    subset: int = 60000,
    steps: int = 3000,
    sparsity: float = 0.9,
    fmt: str = "csr",
    out: str = "runs/equinox_mlp",
    rounds: int = 30,
    batch: int = 128,
) -> dict[str, Any]:
    """The whole recipe; returns the results (rows, file sizes, the test logits of each form)."""
    x_tr, y_tr, x_te, y_te = rep.mnist(subset)
    model = Mlp(jax.random.key(0))
    dense = train(model, optax.adam(1e-3), (x_tr, y_tr), steps, batch, 0)
    params, static = eqx.partition(dense, eqx.is_array)
    masks = pj.magnitude_masks(params, sparsity)  # weights only (the default where=)
    pruned = eqx.combine(pj.apply_masks(params, masks), static)
    tuned = train(pruned, pj.masked(optax.adam(3e-4), masks), (x_tr, y_tr), steps // 2, batch, 1)
    small = pj.compact(tuned).params  # an Mlp with narrower Linear layers
    sparse = pj.sparsify(tuned, fmt)  # an Mlp whose weights are TransposedKernels

    d = rep.out_dir(out)
    files = {
        "dense": pj.save(os.path.join(d, "dense.safetensors"), dense, format="dense"),
        "pruned": pj.save(os.path.join(d, "pruned.safetensors"), tuned),
        "compact": pj.save(  # compacted where that is smaller, then each leaf's smallest form
            os.path.join(d, "compact.safetensors"), tuned, format="auto", activation=jax.nn.relu
        ),
    }
    loaded = pj.load(os.path.join(d, "pruned.safetensors"), like=model)  # an Mlp again

    sp_arrays, sp_static = eqx.partition(sparse, eqx.is_array)
    run_sparse = jax.jit(pj.sparse_apply(lambda a, x: jax.vmap(eqx.combine(a, sp_static))(x)))
    forwards = {
        "dense": forward(dense),
        "pruned (masked dense)": forward(tuned),
        f"sparse ({fmt})": lambda x: run_sparse(sp_arrays, x),
        "compacted": forward(small),
        "loaded": forward(loaded),
    }
    res = rep.report(forwards, files, x_te, y_te, rounds, "equinox_mlp", small, sparsity)
    return {**res, "loaded_type": type(loaded).__name__, "compacted_type": type(small).__name__}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return rep.cli(run, __doc__.splitlines()[0], "runs/equinox_mlp", argv)


if __name__ == "__main__":
    main()
