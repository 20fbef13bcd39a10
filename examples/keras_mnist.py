"""Prune a Keras MLP on MNIST until it really shrinks and speeds up.

The recipe, with Keras 3 on the JAX backend:

1. train a ``keras.Sequential`` MLP 784-300-100-10 (LeNet-300-100) on MNIST;
2. magnitude-prune 90% of its weights (``prunejax.magnitude_masks`` on ``model.get_weights()``,
   one global threshold, Han et al. 2015; ``--magnitude-rounds`` iterates prune-retrain rounds)
   and fine-tune in Keras with the masks held (``prunejax.keras.hold_masks``: pruned weights stay
   exactly zero through ``model.fit``);
3. unit-prune 50% of the hidden units (``prunejax.unit_masks``), fine-tune with the masks held,
   and compact the result into a NEW, narrower Keras model (784-150-50-10,
   ``prunejax.keras.compact_model``);
4. save every model as ``.keras`` and in prunejax's small file format (``prunejax.save``) and
   print a before/after table: test accuracy, parameters, file sizes, and inference time at
   batch 1 and 256 (median of many jitted calls, all models timed in this process).
5. save the magnitude model as a Deep Compression file (``prunejax.keras.save_quantized``:
   k-means weight sharing with ``--bits`` bits, entropy-coded codes and relative indices), load it
   back into a copy of the model (``load_quantized``) and print its size and test accuracy.

The magnitude-pruned model shows that zeros alone shrink neither a ``.keras`` file nor the
inference time (Keras stores and multiplies dense tensors); prunejax's sparse file does shrink.
The compacted model is smaller and faster as a plain Keras model.

Usage::

    python examples/keras_mnist.py            # the full recipe (a few minutes on 2 cores)
    python examples/keras_mnist.py --quick    # a smoke run (well under 2 minutes)

Outputs go to ``runs/keras_mnist/`` (``.keras`` files, prunejax files, ``results.json`` and
``results.md``).  The measurements (accuracy, file bytes, jitted latency, the table) are in
``examples/keras_report.py`` beside this script.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import keras_report  # noqa: E402  (examples/keras_report.py, beside this script)
import numpy as np  # noqa: E402

import prunejax  # noqa: E402
from prunejax import keras as pjk  # noqa: E402

HIDDEN = (300, 100)

Log = Callable[[str], None]


def build_model() -> keras.Sequential:
    """The user's model: LeNet-300-100 as a Keras Sequential on 28x28 images."""
    return keras.Sequential(
        [
            keras.Input((28, 28), name="image"),
            keras.layers.Flatten(),
            *(keras.layers.Dense(n, activation="relu") for n in HIDDEN),
            keras.layers.Dense(10),
        ],
        name="lenet_300_100",
    )


def fit(model, x, y, *, epochs, lr, batch_size, callbacks=()):
    """Adam with a cosine-decayed learning rate; a fresh optimizer every call."""
    steps = epochs * (-(-len(x) // batch_size))
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(lr, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
        callbacks=list(callbacks),
        shuffle=True,
    )
    return model


def copy_model(model) -> keras.Sequential:
    clone = keras.Sequential.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    return clone


def pruned_exactly(model, masks) -> bool:
    return all(np.all(w[~m] == 0) for w, m in zip(model.get_weights(), masks, strict=True))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with the epoch and timing defaults of a quick or a full run filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few epochs, fewer timing runs")
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parents[1] / "runs" / "keras_mnist"),
        help="output directory (default: runs/keras_mnist/ in the repository)",
    )
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense-epochs", type=int, default=None)
    parser.add_argument("--finetune-epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--magnitude-sparsity", type=float, default=0.9)
    parser.add_argument(
        "--magnitude-rounds",
        type=int,
        default=1,
        help="prune-retrain rounds (Han et al. 2015); 3 rounds measured no better than 1 here",
    )
    parser.add_argument(
        "--round-epochs", type=int, default=3, help="fine-tune epochs of each round but the last"
    )
    parser.add_argument("--unit-sparsity", type=float, default=0.5)
    parser.add_argument(
        "--bits", type=int, default=5, help="code width of the compressed magnitude model's file"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per batch size")
    args = parser.parse_args(argv)
    args.dense_epochs = args.dense_epochs or (2 if args.quick else 20)
    args.finetune_epochs = args.finetune_epochs or (1 if args.quick else 10)
    args.repeats = args.repeats or (100 if args.quick else 500)
    return args


def prune_magnitude(dense, data, args: argparse.Namespace, log: Log):
    """Step 2: magnitude masks on the Keras weight list, fine-tuned with the masks held.

    With ``--magnitude-rounds`` > 1, repeated at growing sparsity as in Han et al. 2015.

    Returns:
      ``(model, rounds)``: the pruned, fine-tuned copy of ``dense`` and the sparsity per round.
    """
    x_train, y_train, x_test, y_test = data
    ft_epochs = args.finetune_epochs
    magnitude = copy_model(dense)
    rounds = prunejax.iterative_sparsity(args.magnitude_rounds, final=args.magnitude_sparsity)
    for r, sparsity in enumerate(rounds, 1):
        mag_masks = prunejax.magnitude_masks(magnitude.get_weights(), sparsity, scope="global")
        epochs = ft_epochs if r == len(rounds) else args.round_epochs
        with pjk.hold_masks(magnitude, mag_masks) as hold:
            fit(
                magnitude,
                x_train,
                y_train,
                epochs=epochs,
                lr=5e-4,
                batch_size=args.batch_size,
                callbacks=[hold],
            )
        log(f"magnitude round {r}/{len(rounds)}: sparsity {sparsity:.3f}, {epochs} epochs")
    print(prunejax.sparsity_report(mag_masks))
    if not pruned_exactly(magnitude, mag_masks):
        raise AssertionError("a pruned weight of the magnitude model is not exactly zero")
    acc = keras_report.evaluate_accuracy(magnitude, x_test, y_test)
    log(
        f"magnitude {args.magnitude_sparsity:.0%}: fine-tuned {ft_epochs} epochs, pruned "
        f"weights exactly zero, test acc {acc:.4f}"
    )
    return magnitude, rounds


def prune_units(dense, data, args: argparse.Namespace, log: Log):
    """Step 3: unit masks on the hidden layers, fine-tuned held, compacted into a narrower model.

    Returns:
      ``(unit, compacted, widths)``: the masked model, the compacted one and its Dense widths.
    """
    x_train, y_train, x_test, _ = data
    unit = copy_model(dense)
    unit_masks = prunejax.unit_masks(
        unit.get_weights(), args.unit_sparsity, where=pjk.hidden_dense_where(unit)
    )
    with pjk.hold_masks(unit, unit_masks) as hold:
        fit(
            unit,
            x_train,
            y_train,
            epochs=args.finetune_epochs,
            lr=5e-4,
            batch_size=args.batch_size,
            callbacks=[hold],
        )
    if not pruned_exactly(unit, unit_masks):
        raise AssertionError("a pruned weight of the unit model is not exactly zero")
    compacted = pjk.compact_model(unit)
    widths = [layer.units for layer in compacted.layers if isinstance(layer, keras.layers.Dense)]
    diff = np.abs(compacted.predict(x_test, verbose=0) - unit.predict(x_test, verbose=0)).max()
    log(
        f"unit {args.unit_sparsity:.0%}: fine-tuned {args.finetune_epochs} epochs, compacted to "
        f"784-{'-'.join(map(str, widths))}; max |logit difference| vs masked model {diff:.2e}"
    )
    return unit, compacted, widths


def compress(magnitude, x_test, y_test, out: Path, bits: int, log: Log) -> dict:
    """Step 5: the magnitude model as a Deep Compression file (Han, Mao & Dally 2016: k-means
    weight sharing over the kept weights, entropy-coded codes and relative indices), loaded back
    into a copy of the model and scored.

    Returns:
      ``{"bits", "bytes", "accuracy"}`` of the compressed file.
    """
    path = out / "magnitude.compressed.safetensors"
    nbytes = pjk.save_quantized(magnitude, path, bits=bits)
    restored = copy_model(magnitude)
    pjk.load_quantized(restored, path)
    acc = keras_report.evaluate_accuracy(restored, x_test, y_test)
    log(
        f"magnitude model compressed ({bits}-bit shared weights, entropy coded): "
        f"{nbytes:,} B file, test acc {acc:.4f}"
    )
    return {"bits": bits, "bytes": nbytes, "accuracy": acc}


def measure(models: dict, x_test, y_test, out: Path, repeats: int) -> list:
    """Step 4: every model measured in this process, plus the size of its prunejax file.

    Returns:
      The :class:`keras_report.ModelReport` rows, with ``extra["prunejax file"]`` set.
    """
    rows = keras_report.report(
        models, x_test, y_test, out_dir=out, batch_sizes=(1, 256), repeats=repeats
    )
    for row in rows:
        # prunejax's small file: the smallest encoding per leaf (sparse for the magnitude
        # model, compacted for the unit-pruned one)
        row.extra["prunejax file"] = prunejax.save(
            Path(row.path).with_suffix(".prunejax.safetensors"),
            models[row.name].get_weights(),
            format="auto",
            activation=jax.nn.relu,
        )
    return rows


def check_targets(rows: list) -> dict[str, bool]:
    """The recipe's targets, judged on the rows ``[dense, magnitude, unit, compacted]``."""
    d, mag, _, comp = rows
    return {
        "unit: accuracy within 0.3 points of dense": 100 * (d.accuracy - comp.accuracy) <= 0.3,
        "unit: compacted .keras <= 55% of dense": comp.keras_bytes <= 0.55 * d.keras_bytes,
        "unit: >= 1.5x faster at batch 256": d.latency[256] / comp.latency[256] >= 1.5,
        "magnitude: accuracy within 0.3 points of dense": 100 * (d.accuracy - mag.accuracy) <= 0.3,
        "magnitude: prunejax file <= 1/4 of dense .keras": (
            mag.extra["prunejax file"] <= d.keras_bytes / 4
        ),
    }


def write_results(out: Path, args: argparse.Namespace, rows: list, rounds, widths, wall) -> dict:
    """Print the table and the checks; write ``results.md`` and ``results.json`` to ``out``."""
    checks = check_targets(rows)
    header = (
        f"keras {keras.__version__} ({keras.backend.backend()}), jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; "
        f"{'quick' if args.quick else 'full'} run: dense {args.dense_epochs} epochs, fine-tune "
        f"{args.finetune_epochs} epochs (magnitude: {args.magnitude_rounds} rounds); "
        f"latency = median of {args.repeats} jitted calls; wall {wall:.0f} s"
    )
    lines = [header, "", keras_report.format_table(rows), ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items()]
    text = "\n".join(lines)
    print("\n" + text)
    (out / "results.md").write_text(text + "\n")
    result = {
        "quick": args.quick,
        "dense_epochs": args.dense_epochs,
        "finetune_epochs": args.finetune_epochs,
        "magnitude_rounds": list(rounds),
        "repeats": args.repeats,
        "wall_s": wall,
        "keras": keras.__version__,
        "jax": jax.__version__,
        "compacted_widths": widths,
        "rows": [
            {
                "name": r.name,
                "accuracy": r.accuracy,
                "params": r.params,
                "nonzero": r.nonzero,
                "keras_bytes": r.keras_bytes,
                "prunejax_bytes": r.extra["prunejax file"],
                "latency_s": {str(b): t for b, t in r.latency.items()},
            }
            for r in rows
        ],
        "checks": checks,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe (steps 1-4 of the module docstring); return what ``results.json`` holds."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)  # noqa: E731

    keras.utils.set_random_seed(args.seed)
    mnist = prunejax.load_mnist(args.data_dir)
    x_train = mnist.x_train.reshape(-1, 28, 28)
    x_test = mnist.x_test.reshape(-1, 28, 28)
    data = (x_train, mnist.y_train, x_test, mnist.y_test)
    log(
        f"MNIST {x_train.shape} / {x_test.shape}; keras {keras.__version__} "
        f"({keras.backend.backend()}), jax {jax.__version__}, {jax.devices()[0].platform}"
    )

    # 1. dense
    dense = fit(
        build_model(),
        x_train,
        mnist.y_train,
        epochs=args.dense_epochs,
        lr=1e-3,
        batch_size=args.batch_size,
    )
    acc = keras_report.evaluate_accuracy(dense, x_test, mnist.y_test)
    log(f"dense: {args.dense_epochs} epochs, test acc {acc:.4f}")

    # 2. magnitude pruning; 3. unit pruning and compaction
    magnitude, rounds = prune_magnitude(dense, data, args, log)
    unit, compacted, widths = prune_units(dense, data, args, log)

    # 4. the before/after table, every model measured in this process
    mag_name = f"magnitude-{args.magnitude_sparsity:.0%}"
    unit_name = f"unit-{args.unit_sparsity:.0%}"
    models = {
        "dense": dense,
        f"{mag_name} (dense zeros)": magnitude,
        f"{unit_name} (dense zeros)": unit,
        f"{unit_name} compacted": compacted,
    }
    rows = measure(models, x_test, mnist.y_test, out, args.repeats)
    result = write_results(out, args, rows, rounds, widths, time.perf_counter() - t_start)
    # 5. the magnitude model as a compressed (weight-shared, entropy-coded) file
    result["compressed"] = compress(magnitude, x_test, mnist.y_test, out, args.bits, log)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}/ (results.md, results.json, *.keras, *.prunejax.safetensors)")
    return result


if __name__ == "__main__":
    main()
