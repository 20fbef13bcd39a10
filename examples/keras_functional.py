"""Prune the units of a Keras Functional MLP on MNIST and compact it into a smaller model.

The recipe, with Keras 3 on the JAX backend, for a model written with the Functional API
(``keras.Model(inputs, outputs)``) rather than ``keras.Sequential``:

1. train a Functional MLP 784-300-100-10 (with a ``Dropout`` between the hidden layers);
2. unit-prune 50% of the hidden units (``prunejax.keras.unit_masks``: the hidden ``Dense`` layers
   only, by the L2 norm of each unit's weights, Molchanov et al. 2017; the 10 output units are
   kept) and fine-tune with the masks held (``prunejax.keras.hold_masks``);
3. compact it (``prunejax.keras.compact_model``): a NEW Functional model 784-150-50-10 with the
   same layers and calls, whose outputs equal the masked model's;
4. save both with ``prunejax.keras.save_model`` and print accuracy, ``.keras`` file size and
   jitted inference time at batch 1 and 256 before and after (``examples/keras_report.py``).

Usage::

    python examples/keras_functional.py                 # all of MNIST (a few minutes on 2 cores)
    python examples/keras_functional.py --subset 2000   # the first 2,000 training images

Outputs go to ``runs/keras_functional/`` (``.keras`` files and ``results.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import prunejax  # noqa: E402
from prunejax import keras as pjk  # noqa: E402

try:  # imported as examples.keras_functional (the tests) or run as a script
    from examples import keras_report
except ImportError:  # pragma: no cover - run as a script: examples/ is sys.path[0]
    import keras_report  # type: ignore[no-redef]

HIDDEN = (300, 100)


def build_model() -> keras.Model:
    """The user's model: a Functional MLP on 28x28 images, logits out."""
    inp = keras.Input((28, 28), name="image")
    x = keras.layers.Flatten()(inp)
    x = keras.layers.Dense(HIDDEN[0], activation="relu", name="hidden_1")(x)
    x = keras.layers.Dropout(0.1)(x)
    x = keras.layers.Dense(HIDDEN[1], activation="relu", name="hidden_2")(x)
    out = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inp, out, name="functional_mlp")


def fit(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    callbacks: tuple = (),
) -> Any:
    """Adam with a cosine-decayed learning rate; a fresh optimizer every call."""
    steps = max(1, epochs * (-(-len(x) // batch_size)))
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=list(callbacks))
    return model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", type=int, default=None, help="first N training images")
    parser.add_argument("--epochs", type=int, default=10, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--unit-sparsity", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: auto)")
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parents[1] / "runs" / "keras_functional"),
        help="output directory (default: runs/keras_functional/ in the repository)",
    )
    args = parser.parse_args(argv)
    if args.subset is not None and args.subset < 1:
        parser.error(f"--subset must be >= 1, got {args.subset}")
    return args


def prune_and_compact(dense: Any, x: np.ndarray, y: np.ndarray, args: argparse.Namespace):
    """Steps 2-3: unit masks on the hidden layers, fine-tuned held, then compacted.

    Returns:
      ``(masked, compacted)``: the fine-tuned masked copy of ``dense`` and its compaction.
    """
    masked = keras.models.clone_model(dense)
    masked.set_weights(dense.get_weights())
    masks = pjk.unit_masks(masked, args.unit_sparsity)  # hidden Dense layers; outputs kept
    with pjk.hold_masks(masked, masks) as hold:
        fit(
            masked,
            x,
            y,
            epochs=args.finetune_epochs,
            lr=5e-4,
            batch_size=args.batch_size,
            callbacks=(hold,),
        )
    if not all(np.all(w[~m] == 0) for w, m in zip(masked.get_weights(), masks, strict=True)):
        raise AssertionError("a pruned weight is not exactly zero after fine-tuning")
    return masked, pjk.compact_model(masked)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe of the module docstring; return what ``results.json`` holds."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    mnist = prunejax.load_mnist(args.data_dir)
    n = args.subset or len(mnist.x_train)
    x_train, y_train = mnist.x_train[:n].reshape(-1, 28, 28), mnist.y_train[:n]
    x_test, y_test = mnist.x_test.reshape(-1, 28, 28), mnist.y_test

    dense = fit(
        build_model(), x_train, y_train, epochs=args.epochs, lr=1e-3, batch_size=args.batch_size
    )
    masked, compacted = prune_and_compact(dense, x_train, y_train, args)
    diff = float(
        np.abs(compacted.predict(x_test, verbose=0) - masked.predict(x_test, verbose=0)).max()
    )
    widths = [la.units for la in compacted.layers if isinstance(la, keras.layers.Dense)]
    models = {"dense": dense, "unit (masked)": masked, "unit compacted": compacted}
    rows = keras_report.report(
        models, x_test, y_test, out_dir=out, batch_sizes=(1, 256), repeats=args.repeats
    )
    print(
        f"keras {keras.__version__} ({keras.backend.backend()}), jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; {n} training images, "
        f"{args.epochs} + {args.finetune_epochs} epochs; latency = median of {args.repeats} "
        "jitted calls\n"
    )
    print(keras_report.format_table(rows))
    print(
        f"\ncompacted to 784-{'-'.join(map(str, widths))}; max |output difference| vs the "
        f"masked model {diff:.2e}; wall {time.perf_counter() - t0:.0f} s"
    )
    by = {r.name: r for r in rows}
    result = {
        "subset": n,
        "dense_widths": [*HIDDEN, 10],
        "widths": widths,
        "max_abs_diff": diff,
        "accuracy": {
            "dense": by["dense"].accuracy,
            "compact": by["unit compacted"].accuracy,
            "masked": by["unit (masked)"].accuracy,
        },
        "dense_bytes": by["dense"].keras_bytes,
        "compact_bytes": by["unit compacted"].keras_bytes,
        "latency_s": {r.name: {str(b): t for b, t in r.latency.items()} for r in rows},
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
