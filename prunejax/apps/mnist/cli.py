"""Command line: ``prunejax mnist`` trains LeNet-300-100 on MNIST, prunes it and reports.

The default recipe is Han et al. (2015), "Learning both Weights and Connections for Efficient
Neural Networks": train dense, then in several rounds prune each layer by magnitude towards its
own density (8% / 9% / 26% of the weights of the three layers for LeNet-300-100) and retrain
with the masks fixed (each round restarts a cosine-decayed Adam, and dropout shrinks with the
square root of the kept weights, Han's Eq. 2), then fine-tune.  ``--schedule polynomial`` prunes
gradually during retraining instead (Zhu & Gupta 2017).

Training uses AdamW (lr 5e-3, weight decay 0.1), dropout 0.2 and random translations of up to 2
pixels; the learning rate was chosen on the validation split (``--validation 10000``: the last
10,000 training images held out, errors reported on them; see
``benchmarks/results/main_job_selection.md``).  With these defaults LeNet-300-100 reaches
1.11 +- 0.05% dense and 1.18 +- 0.06% test error at 8.2% of the weights (seeds 0, 1, 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

import prunejax as pj
from prunejax._util import atomic_write_text
from prunejax.apps.mnist import compress
from prunejax.apps.mnist.augment import random_shift
from prunejax.apps.mnist.checkpoint import save_checkpoint
from prunejax.apps.mnist.data import load_mnist, num_batches
from prunejax.apps.mnist.optimizer import make_optimizer
from prunejax.apps.mnist.plots import plot_error_vs_density
from prunejax.apps.mnist.recipe import (
    MASK_METHODS,
    gradual_pruning,
    iterative_pruning,
    layer_densities,
    mask_builder,
)
from prunejax.apps.mnist.train import (
    FitResult,
    TrainConfig,
    classifier_loss,
    evaluate,
    fit,
    kernel_density,
)

__all__ = [
    "Job",
    "build_parser",
    "finetune",
    "format_table",
    "main",
    "prepare",
    "prune_gradually",
    "prune_iteratively",
    "results_of",
    "run_mnist",
    "train_dense",
    "write_outputs",
]

SCHEDULES = ("iterative", "oneshot", "polynomial")
VALIDATION_HELP = (
    "hold out the last N training images and report errors on them instead of the test set "
    "(choose settings this way; 10000 is the documented split)"
)
say = tqdm.write  # progress lines that do not break a running tqdm bar


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"widths must be positive ints, got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``prunejax`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="prunejax", description="Pruning for JAX models that really get smaller and faster."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "mnist",
        help="train LeNet-300-100 on MNIST, prune it (Han et al. 2015) and report",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/mnist"), help="output directory")
    p.add_argument("--data-dir", default=None, help="TFDS data directory holding mnist/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a short run (~1 min) for smoke tests")
    p.add_argument("--hidden", type=_ints, default=(300, 100), help="hidden widths")
    p.add_argument("--epochs", type=int, default=None, help="dense epochs (default 20; quick 3)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3, help="dense Adam learning rate")
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "exponential", "constant"))
    p.add_argument(
        "--dropout",
        type=float,
        default=0.2,
        help="dropout on hidden activations (retraining: scaled by sqrt(kept), Han et al.)",
    )
    p.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay (AdamW)")
    p.add_argument(
        "--shift",
        type=int,
        default=2,
        help="augment training images with random translations of up to this many pixels (0: none)",
    )
    p.add_argument(
        "--method",
        default="magnitude",
        choices=MASK_METHODS,
        help="magnitude: per-layer |w|; global: one threshold over all kernels; "
        "threshold: Han's quality x std per layer",
    )
    p.add_argument(
        "--schedule",
        default="iterative",
        choices=SCHEDULES,
        help="iterative prune-retrain rounds, one-shot, or gradual polynomial",
    )
    p.add_argument("--rounds", type=int, default=None, help="pruning rounds (default 5; quick 2)")
    p.add_argument(
        "--retrain-epochs",
        type=int,
        default=None,
        help="epochs per round (polynomial: epochs of gradual pruning)",
    )
    p.add_argument(
        "--retrain-lr", type=float, default=None, help="retraining learning rate (default: --lr)"
    )
    p.add_argument("--finetune-epochs", type=int, default=None)
    p.add_argument(
        "--densities",
        type=_floats,
        default=None,
        help="per-layer final densities, e.g. 0.08,0.09,0.26",
    )
    p.add_argument(
        "--target-density",
        type=float,
        default=None,
        help="overall kernel density; per-layer densities keep Han's proportions",
    )
    p.add_argument("--validation", type=int, default=0, help=VALIDATION_HELP)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    compress.add_parser(sub)
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    s = {
        "epochs": args.epochs if args.epochs is not None else (3 if quick else 20),
        "rounds": args.rounds if args.rounds is not None else (2 if quick else 5),
        "retrain_epochs": args.retrain_epochs
        if args.retrain_epochs is not None
        else (1 if quick else (15 if args.schedule == "polynomial" else 3)),
        "finetune_epochs": args.finetune_epochs
        if args.finetune_epochs is not None
        else (1 if quick else 8),
        "retrain_lr": args.retrain_lr if args.retrain_lr is not None else args.lr,
    }
    if args.schedule == "oneshot":
        s["rounds"] = 1
    for k in ("epochs", "rounds", "retrain_epochs", "finetune_epochs"):
        if s[k] < (1 if k == "rounds" else 0):
            raise ValueError(f"--{k.replace('_', '-')} must be >= {1 if k == 'rounds' else 0}")
    for k, v in (("lr", args.lr), ("retrain-lr", s["retrain_lr"])):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{k} must be a positive number, got {v}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.shift < 0:
        raise ValueError(f"--shift must be >= 0, got {args.shift}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    return s


def format_table(
    names: list[str],
    shapes: list[tuple[int, int]],
    dense: dict,
    pruned: dict,
    split: str = "test",
) -> str:
    """The per-layer table ``prunejax mnist`` prints: weights kept and test errors.

    Args:
      names: the layer names.
      shapes: their kernel shapes ``(in, out)``.
      dense: ``{"test_error"}`` of the dense network.
      pruned: ``{"test_error", "kept": {name: count}}`` of the pruned network.
      split: the split the errors were measured on (``"test"`` or ``"validation"``).

    Returns:
      The table, one line per row.
    """
    rows = [("layer", "shape", "dense kept", "pruned kept", "kept %")]
    tot = totk = 0
    for n, sh in zip(names, shapes, strict=True):
        size = sh[0] * sh[1]
        k = pruned["kept"][n]
        tot += size
        totk += k
        rows.append((n, f"{sh[0]}x{sh[1]}", f"{size:,}", f"{k:,}", f"{100 * k / size:.2f}"))
    rows.append(("total", "", f"{tot:,}", f"{totk:,}", f"{100 * totk / tot:.2f}"))
    rows.append(
        (
            f"{split} error",
            "",
            f"{100 * dense['test_error']:.2f}%",
            f"{100 * pruned['test_error']:.2f}%",
            "",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, r in enumerate(rows):
        lines.append(
            "  ".join(
                [r[0].ljust(widths[0])]
                + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
            )
        )
        if i == 0 or i == len(rows) - 3:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclasses.dataclass
class Job:
    """Everything the steps of one ``prunejax mnist`` run share."""

    args: argparse.Namespace
    st: dict[str, Any]
    data: Any
    params: Any
    names: list[str]
    shapes: list[tuple[int, int]]
    dens: tuple[float, ...]
    base_cfg: dict[str, Any]
    points: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def features(self) -> tuple[int, ...]:
        return (*self.args.hidden, 10)

    @property
    def model(self) -> Any:
        return pj.MLP(features=self.features, dropout=self.args.dropout)

    @property
    def sizes(self) -> list[int]:
        return [a * b for a, b in self.shapes]

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        return self.data.x_train, self.data.y_train

    @property
    def steps(self) -> int:
        return num_batches(len(self.data.x_train), self.args.batch_size)

    @property
    def ckdir(self) -> Path:
        return self.args.out / "checkpoints"

    @property
    def cfg(self) -> dict[str, Any]:
        """The settings stored in the pruning and fine-tuning checkpoints."""
        st = self.st
        return {
            **self.base_cfg,
            "retrain_lr": st["retrain_lr"],
            "method": self.args.method,
            "schedule": self.args.schedule,
            "densities": list(self.dens),
            "rounds": st["rounds"],
            "retrain_epochs": st["retrain_epochs"],
            "finetune_epochs": st["finetune_epochs"],
        }

    def config(self, epochs: int, seed: int, desc: str = "train") -> TrainConfig:
        progress = not self.args.no_progress
        return TrainConfig(epochs, self.args.batch_size, seed, progress=progress, desc=desc)

    def augment(self) -> Callable[..., Any] | None:
        return None if self.args.shift == 0 else partial(random_shift, max_shift=self.args.shift)

    @property
    def split(self) -> str:
        """The split errors are measured on: ``"validation"`` with ``--validation``, else test."""
        return "validation" if self.data.x_val is not None else "test"

    def test_eval(self, params: Any) -> dict[str, float]:
        """Metrics on the test split, or on the validation split with ``--validation``."""
        if self.data.x_val is not None:
            return evaluate(self.model, params, self.data.x_val, self.data.y_val)
        return evaluate(self.model, params, self.data.x_test, self.data.y_test)

    def retrain_opt(self, total: int) -> Any:
        a = self.args
        return make_optimizer(
            self.st["retrain_lr"], total, schedule=a.lr_schedule, weight_decay=a.weight_decay
        )

    def retrain_loss(self, kept: float) -> Any:
        # Han et al. (2015), Eq. 2: dropout shrinks with the square root of the kept connections
        return classifier_loss(
            pj.MLP(features=self.features, dropout=self.args.dropout * math.sqrt(kept))
        )

    def add_point(self, label: str, density: float, test_error: float) -> None:
        self.points.append({"label": label, "density": density, "test_error": test_error})


def prepare(args: argparse.Namespace) -> Job:
    """Check the settings, load MNIST and initialise the model (seeded).

    Args:
      args: the parsed ``prunejax mnist`` arguments.

    Returns:
      The :class:`Job` the other steps share.

    Raises:
      ValueError: a bad setting; FileNotFoundError: MNIST not found.
    """
    st = _settings(args)
    data = load_mnist(args.data_dir, validation=args.validation)
    if args.batch_size > len(data.x_train):
        raise ValueError(
            f"--batch-size ({args.batch_size}) is larger than the split ({len(data.x_train)})"
        )
    features = (*args.hidden, 10)
    model = pj.MLP(features=features, dropout=args.dropout)
    params = model.init(jax.random.key(args.seed), data.x_train[:1])["params"]
    params = jax.tree_util.tree_map(np.asarray, params)
    names = [f"Dense_{i}" for i in range(len(features))]
    shapes = [tuple(params[n]["kernel"].shape) for n in names]
    sizes = [a * b for a, b in shapes]
    dens = layer_densities(sizes, densities=args.densities, target=args.target_density)
    base_cfg = {
        "hidden": list(args.hidden),
        "dropout": args.dropout,
        "lr": args.lr,
        "lr_schedule": args.lr_schedule,
        "weight_decay": args.weight_decay,
        "shift": args.shift,
    }
    return Job(args, st, data, params, names, shapes, dens, base_cfg)


def train_dense(job: Job) -> tuple[FitResult, dict[str, float]]:
    """Dense training (checkpointed as ``checkpoints/dense.ckpt``).

    Args:
      job: the run.

    Returns:
      ``(fit result, test metrics)``.
    """
    a, epochs = job.args, job.st["epochs"]
    t0 = time.perf_counter()
    tx = make_optimizer(
        a.lr, max(1, job.steps * epochs), schedule=a.lr_schedule, weight_decay=a.weight_decay
    )
    dense = fit(
        classifier_loss(job.model),
        job.params,
        tx,
        job.train,
        job.config(epochs, a.seed, "dense"),
        checkpoint=job.ckdir / "dense.ckpt",
        resume=a.resume,
        run_config={**job.base_cfg, "phase": "dense", "epochs": epochs},
        augment=job.augment(),
    )
    d_eval = job.test_eval(dense.params)
    say(
        f"dense: {epochs} epochs, {job.split} error {100 * d_eval['error']:.2f}% "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    job.add_point("dense", 1.0, d_eval["error"])
    return dense, d_eval


def prune_iteratively(job: Job, params: Any) -> tuple[Any, Any]:
    """Han et al.'s prune-retrain rounds (one round: one-shot).

    Args:
      job: the run.
      params: the dense params.

    Returns:
      ``(params, masks)`` after the last round.
    """
    st = job.st
    per_layer = [pj.iterative_sparsity(st["rounds"], final=1.0 - d) for d in job.dens]
    rounds = [tuple(col[r] for col in per_layer) for r in range(st["rounds"])]

    def on_round(res: Any) -> None:
        job.add_point(f"round {res.round}", res.density, res.test_error)
        say(
            f"round {res.round}/{st['rounds']}: weights kept {100 * res.density:.2f}%, "
            f"{job.split} error {100 * res.test_error:.2f}%"
        )

    results = iterative_pruning(
        classifier_loss(job.model),
        params,
        job.train,
        sparsities=rounds,
        optimizer=job.retrain_opt,
        config=job.config(st["retrain_epochs"], job.args.seed),
        mask_fn=mask_builder(job.args.method, job.names),
        eval_fn=job.test_eval,
        retrain_loss=job.retrain_loss,
        on_round=on_round,
        checkpoint_dir=job.ckdir,
        resume=job.args.resume,
        run_config=job.cfg,
        augment=job.augment(),
    )
    return results[-1].params, results[-1].masks


def prune_gradually(job: Job, params: Any) -> tuple[Any, Any]:
    """Gradual pruning while retraining (Zhu & Gupta 2017).

    Args:
      job: the run.
      params: the dense params.

    Returns:
      ``(params, masks)``, the params masked.
    """
    final_s = tuple(1.0 - d for d in job.dens)
    build = mask_builder(job.args.method, job.names)

    def gradual_mask_fn(p: Any, f: Any) -> Any:
        return build(p, tuple(f * s for s in final_s))

    final_density = sum(d * n for d, n in zip(job.dens, job.sizes, strict=True)) / sum(job.sizes)
    pruned, masks, _ = gradual_pruning(
        job.retrain_loss(final_density),
        params,
        job.train,
        sparsity=1.0,
        optimizer=job.retrain_opt,
        config=job.config(job.st["retrain_epochs"], job.args.seed + 1),
        scope_fn=gradual_mask_fn,
        checkpoint=job.ckdir / "gradual.ckpt",
        resume=job.args.resume,
        run_config=job.cfg,
        update_every=max(1, job.steps // 4),
        augment=job.augment(),
    )
    pruned = pj.apply_masks(pruned, masks)
    g_err = job.test_eval(pruned)["error"]
    dg = float(kernel_density(pruned))
    job.add_point("gradual", dg, g_err)
    say(f"gradual pruning: weights kept {100 * dg:.2f}%, {job.split} error {100 * g_err:.2f}%")
    return pruned, masks


def finetune(job: Job, params: Any, masks: Any) -> Any:
    """Fine-tune with the final masks fixed (checkpointed as ``checkpoints/finetune.ckpt``).

    Args:
      job: the run.
      params, masks: the pruned params and their masks.

    Returns:
      The fine-tuned params.
    """
    epochs = job.st["finetune_epochs"]
    t0 = time.perf_counter()
    start = pj.apply_masks(params, masks)
    ft = fit(
        job.retrain_loss(float(kernel_density(start))),
        start,
        pj.masked(job.retrain_opt(max(1, job.steps * epochs)), masks),
        job.train,
        job.config(epochs, job.args.seed + 1000, "fine-tune"),
        checkpoint=job.ckdir / "finetune.ckpt",
        resume=job.args.resume,
        run_config={**job.cfg, "phase": "finetune"},
        augment=job.augment(),
    )
    f_err = job.test_eval(ft.params)["error"]
    job.add_point("fine-tuned", float(kernel_density(ft.params)), f_err)
    say(
        f"fine-tune: {epochs} epochs, {job.split} error {100 * f_err:.2f}% "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    return ft.params


def results_of(job: Job, d_eval: dict, params: Any, masks: Any, wall: float) -> dict[str, Any]:
    """The contents of ``results.json``.

    Args:
      job: the run (its settings and error-vs-density points).
      d_eval: the dense network's test metrics.
      params, masks: the final pruned params and masks.
      wall: the run's wall time in seconds.

    Returns:
      ``{"command", "seed", "settings", "dense", "pruned", "points", "wall_seconds"}``.
    """
    args, names, sizes = job.args, job.names, job.sizes
    p_eval = job.test_eval(params)
    kept = {n: int(np.count_nonzero(np.asarray(masks[n]["kernel"]))) for n in names}
    return {
        "command": "prunejax " + " ".join(getattr(args, "argv", ["mnist"])),
        "seed": args.seed,
        "split": job.split,
        "settings": {
            **job.st,
            **job.cfg,
            "epochs": job.st["epochs"],
            "batch_size": args.batch_size,
        },
        "dense": {"test_error": d_eval["error"], "density": 1.0},
        "pruned": {
            "test_error": p_eval["error"],
            "density": sum(kept.values()) / sum(sizes),
            "kept": kept,
            "layer_density": {n: kept[n] / s for n, s in zip(names, sizes, strict=True)},
        },
        "points": job.points,
        "wall_seconds": wall,
    }


def write_outputs(job: Job, result: dict, dense_params: Any, params: Any, masks: Any) -> None:
    """Write ``pruned.ckpt``, ``dense.ckpt``, ``error_vs_density.png`` and ``results.json``
    under ``--out``, each atomically.

    Args:
      job: the run.
      result: :func:`results_of`'s dict.
      dense_params: the dense params.
      params, masks: the final pruned params and masks.
    """
    args, out = job.args, job.args.out
    pruned = result["pruned"]
    meta = {
        "model": "MLP",
        "features": list(job.features),
        "dropout": args.dropout,
        "seed": args.seed,
        "test_error": pruned["test_error"],
        "density": pruned["density"],
    }
    save_checkpoint(out / "pruned.ckpt", {"params": params, "masks": masks}, meta)
    save_checkpoint(
        out / "dense.ckpt",
        {"params": dense_params},
        {**meta, "density": 1.0, "test_error": result["dense"]["test_error"]},
    )
    plot_error_vs_density(
        job.points,
        out / "error_vs_density.png",
        f"LeNet-{'-'.join(map(str, job.features[:-1]))} on MNIST, {args.method}/{args.schedule}, "
        f"seed {args.seed}",
    )
    atomic_write_text(out / "results.json", json.dumps(result, indent=2))


def run_mnist(args: argparse.Namespace) -> dict[str, Any]:
    """The ``prunejax mnist`` job; returns the results written to ``<out>/results.json``.

    Args:
      args: the parsed ``prunejax mnist`` arguments (:func:`build_parser`).

    Returns:
      The contents of ``results.json``.
    """
    t_start = time.perf_counter()
    job = prepare(args)
    say(
        f"prunejax mnist: LeNet-{'-'.join(map(str, job.features[:-1]))}, seed {args.seed}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"target densities {', '.join(f'{d:.3f}' for d in job.dens)}"
    )
    dense, d_eval = train_dense(job)
    t0 = time.perf_counter()
    if args.schedule in ("iterative", "oneshot"):
        params, masks = prune_iteratively(job, dense.params)
    else:
        params, masks = prune_gradually(job, dense.params)
    say(f"pruning: {time.perf_counter() - t0:.0f} s")
    if job.st["finetune_epochs"] > 0:
        params = finetune(job, params, masks)
    result = results_of(job, d_eval, params, masks, time.perf_counter() - t_start)
    write_outputs(job, result, dense.params, params, masks)
    out = args.out
    print()
    print(format_table(job.names, job.shapes, result["dense"], result["pruned"], job.split))
    print()
    print(
        f"seed {args.seed}; wall time {result['wall_seconds']:.0f} s; wrote {out / 'pruned.ckpt'}, "
        f"{out / 'error_vs_density.png'}, {out / 'results.json'}"
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prunejax`` console script.

    Returns:
      The exit status: 0 on success, 2 on bad input, 1 on a failed run, 130 on Ctrl-C.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "compress":
        return _guarded(lambda: compress.run(args, log=say))
    if args.command == "mnist":
        return _guarded(
            lambda: run_mnist(args),
            interrupted="\ninterrupted; the last complete checkpoint in "
            f"{args.out / 'checkpoints'} is usable: rerun with --resume",
        )
    return 0


def _guarded(job: Callable[[], Any], interrupted: str | None = None) -> int:
    """Run one command; map Ctrl-C, bad input and a failed run to exit statuses 130, 2, 1."""
    try:
        job()
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"prunejax: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"prunejax: training failed: {e}", file=sys.stderr)
        return 1
    return 0
