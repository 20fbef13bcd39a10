"""Deep Compression of LeNet-300-100 on MNIST: prune, share weights, entropy-code, reload, score.

Han, Mao & Dally (ICLR 2016), "Deep Compression: Compressing Deep Neural Networks with Pruning,
Trained Quantization and Huffman Coding", Table 2 (LeNet-300-100): 8% of the weights kept, 6-bit
shared weights, 1,070 KB -> 27 KB (40x) at 1.58% top-1 error.  The pipeline here:

1. dense training (AdamW, cosine learning rate, random translations of the training images,
   whole epochs as one jitted ``lax.scan``: :func:`prunejax.apps.mnist.fit_scan`);
2. gradual magnitude pruning (Zhu & Gupta 2017) from the dense network to an overall kernel
   density, split over the layers by ERK (Evci et al. 2020) or Han et al.'s 8 : 9 : 26
   proportions; the sparsity rises over the first ``prune_fraction`` of the epochs, the rest
   train with the final masks;
3. weight sharing: per-layer k-means codebooks of ``2**b`` centroids over the kept weights
   (:func:`prunejax.kmeans_quantize`, linear initialisation as in the paper), then the centroids
   (and the float biases) fine-tuned with Adam, codes and masks fixed;
4. :func:`prunejax.save` (entropy-coded sparse encodings), :func:`prunejax.load` back into a
   plain float tree and the error of :func:`prunejax.mlp_apply` (ReLU between layers) on it.

Every setting is chosen on the validation split (the last 10,000 training images,
:data:`prunejax.apps.mnist.VALIDATION_SIZE`); the training set is the first 50,000.  With
``split="validation"`` a run measures the validation error only; the test error is measured for
the final configurations (``split="test"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import prunejax as pj
from prunejax._util import PyTree, atomic_path, atomic_write_text
from prunejax.apps.mnist.augment import shift_images
from prunejax.apps.mnist.data import VALIDATION_SIZE, load_mnist
from prunejax.apps.mnist.optimizer import make_optimizer
from prunejax.apps.mnist.plots import plot_error_vs_size
from prunejax.apps.mnist.recipe import layer_densities
from prunejax.apps.mnist.train import TrainConfig, fit_scan

__all__ = [
    "ALLOCATIONS",
    "PAPER_LENET_300_100",
    "CompressSettings",
    "Stage",
    "Trainer",
    "kernel_allocation",
    "quantize_model",
    "compressed_stage",
    "layer_rows",
    "pruned_stage",
    "run_grid",
]

ALLOCATIONS = ("erk", "han")

PAPER_LENET_300_100 = {
    "layers": {
        "Dense_0": {"weights_kept": 0.08, "bits_per_weight": 6, "bits_per_index": 5},
        "Dense_1": {"weights_kept": 0.09, "bits_per_weight": 6, "bits_per_index": 5},
        "Dense_2": {"weights_kept": 0.26, "bits_per_weight": 6, "bits_per_index": 5},
    },
    "total_kept": 0.08,
    "dense_bytes": 1_070_000,
    "compressed_bytes": 27_000,
    "ratio": 40,
    "test_error": 0.0158,
}
"""Han, Mao & Dally (2016), Table 2 / Table 1: LeNet-300-100 (6-bit weights, 5-bit indices)."""


@dataclasses.dataclass(frozen=True)
class CompressSettings:
    """The training budget and optimizer of the pipeline (one value per run).

    Attributes:
      lr, weight_decay: AdamW of the dense training and the pruning (cosine decay per phase).
      shift: random translation of the training images by up to this many pixels.
      batch_size: examples per step.
      dense_epochs: dense training epochs.
      prune_epochs: epochs of gradual pruning (sparsity rising over the first
        ``prune_fraction``, masks rebuilt every ``update_every`` steps; the rest train with the
        final masks).
      quant_epochs, quant_lr: Adam fine-tuning of the centroids and biases (cosine decay).
      allocation: ``"erk"`` or ``"han"``, how the kept weights are split over the layers.
    """

    lr: float = 2e-2
    weight_decay: float = 0.1
    shift: int = 1
    batch_size: int = 256
    dense_epochs: int = 15
    prune_epochs: int = 30
    prune_fraction: float = 0.6
    update_every: int = 100
    quant_epochs: int = 2
    quant_lr: float = 1e-3
    allocation: str = "erk"


# ----------------------------------------------------------------------------- training


def _loss(params: Any, x: jax.Array, y: jax.Array, key: jax.Array | None = None) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(pj.mlp_apply(params, x), y).mean()


@dataclasses.dataclass(frozen=True)
class _Phase:
    """An optimizer built inside ``jit`` from traced ``aux`` (per-leaf targets), hashable."""

    kind: str
    lr: float
    total: int
    wd: float
    tail: tuple = ()

    def __call__(self, aux: Any) -> optax.GradientTransformation:
        inner = make_optimizer(self.lr, max(int(self.total), 1), weight_decay=self.wd)
        if self.kind == "dense":
            return inner
        begin, end, every = self.tail
        progress = pj.polynomial_sparsity(0.0, 1.0, begin_step=begin, end_step=end, power=3.0)

        def mask_fn(p: Any, f: jax.Array) -> Any:
            return pj.magnitude_masks(p, {k: f * v for k, v in aux.items()})

        return pj.pruning(
            inner, mask_fn, progress, begin_step=begin, end_step=end, update_every=every
        )


class _CodebookLoss:
    """Cross-entropy of the dequantized model as a function of its codebooks and biases
    (hashed by identity, so ``fit_scan`` compiles it once per quantized model)."""

    def __init__(self, q: PyTree) -> None:
        self.q = q

    def __call__(self, theta: Any, x: jax.Array, y: jax.Array, key: Any = None) -> jax.Array:
        return _loss(pj.dequantize(pj.with_codebooks(self.q, theta)), x, y)


@jax.jit
def _errors(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sum(jnp.argmax(pj.mlp_apply(params, x), -1) != y)


class Trainer:
    """The training set on the device, the evaluation split and the settings."""

    def __init__(self, data: Any, settings: CompressSettings, split: str) -> None:
        if split not in ("validation", "test"):
            raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
        if data.x_val is None:
            raise ValueError("the pipeline needs MNIST with a validation split")
        if settings.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {settings.allocation}")
        self.s, self.split = settings, split
        self.x, self.y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
        self.xv, self.yv = jnp.asarray(data.x_val), jnp.asarray(data.y_val)
        self.xt, self.yt = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
        self.steps = len(self.x) // settings.batch_size
        if self.steps < 1:
            raise ValueError(f"batch_size {settings.batch_size} > {len(self.x)} training examples")
        self.augment = (
            None if settings.shift == 0 else partial(shift_images, max_shift=settings.shift)
        )

    def _fit(self, phase: _Phase, params: Any, aux: Any, epochs: int, seed: int, loss=_loss):
        cfg = TrainConfig(epochs=epochs, batch_size=self.s.batch_size, seed=seed, desc=phase.kind)
        return fit_scan(loss, phase, params, (self.x, self.y), cfg, aux=aux, augment=self.augment)

    def dense(self, seed: int) -> PyTree:
        """Initialise LeNet-300-100 from ``seed`` and train it dense."""
        s = self.s
        params = pj.MLP().init(jax.random.PRNGKey(seed), jnp.zeros((1, 784)))["params"]
        phase = _Phase("dense", s.lr, self.steps * s.dense_epochs, s.weight_decay)
        return self._fit(phase, params, None, s.dense_epochs, seed)[0]

    def prune(self, dense: PyTree, density: float, seed: int) -> tuple[PyTree, PyTree]:
        """Gradual magnitude pruning from ``dense`` to the overall kernel ``density``."""
        s = self.s
        total = self.steps * s.prune_epochs
        end = max(1, int(round(s.prune_fraction * total)))
        tail = (0, end, max(1, min(s.update_every, end)))
        targets = {
            k: jnp.float32(v) for k, v in kernel_allocation(dense, density, s.allocation).items()
        }
        phase = _Phase("gradual", s.lr, total, s.weight_decay, tail)
        params, state = self._fit(phase, dense, targets, s.prune_epochs, seed + 1)
        masks = jax.tree_util.tree_map(np.asarray, pj.current_masks(state))
        return jax.tree_util.tree_map(np.asarray, pj.apply_masks(params, masks)), masks

    def finetune_codebooks(self, q: PyTree, seed: int) -> PyTree:
        """Adam on the centroids and biases of ``q`` (codes and masks fixed)."""
        s = self.s
        if s.quant_epochs == 0:
            return q
        phase = _Phase("dense", s.quant_lr, self.steps * s.quant_epochs, 0.0)
        theta = pj.codebooks(q)
        theta, _ = self._fit(phase, theta, None, s.quant_epochs, seed + 2, _CodebookLoss(q))
        return pj.with_codebooks(q, jax.tree_util.tree_map(np.asarray, theta))

    def error(self, params: PyTree, split: str | None = None) -> float:
        """Error of ``pj.mlp_apply(params)`` on the run's split (or ``split``)."""
        split = self.split if split is None else split
        x, y = (self.xv, self.yv) if split == "validation" else (self.xt, self.yt)
        return float(_errors(params, x, y)) / len(y)


# ----------------------------------------------------------------------------- pieces


def kernel_allocation(params: PyTree, density: float, allocation: str) -> dict[str, float]:
    """Per-kernel sparsity targets that keep the overall kernel ``density``.

    Args:
      params: the MLP params (``Dense_i/kernel`` leaves).
      density: overall fraction of kernel weights kept, in ``(0, 1]``.
      allocation: ``"erk"`` (:func:`prunejax.erk_sparsity`, Evci et al. 2020) or ``"han"``
        (Han et al. 2015's 8 : 9 : 26 proportions, :func:`layer_densities`).

    Returns:
      ``{"Dense_i/kernel": sparsity}``.

    Raises:
      ValueError: ``density`` outside ``(0, 1]`` or an unknown ``allocation``.
    """
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if allocation == "erk":
        return {k: float(v) for k, v in pj.erk_sparsity(params, 1.0 - float(density)).items()}
    if allocation == "han":
        names = sorted(params, key=lambda n: int(n.split("_")[-1]))
        sizes = [int(np.size(params[n]["kernel"])) for n in names]
        dens = layer_densities(sizes, target=float(density))
        return {f"{n}/kernel": 1.0 - d for n, d in zip(names, dens, strict=True)}
    raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")


def quantize_model(params: PyTree, masks: PyTree, bits: int, bias_bits: int = 0) -> PyTree:
    """Per-layer k-means weight sharing of the kept kernel weights (and optionally the biases).

    Args:
      params: pruned params (zeros where ``masks`` is False).
      masks: their boolean masks.
      bits: code width of every kernel (``2**bits`` centroids per layer).
      bias_bits: code width of every bias vector (its own codebook); 0 keeps biases float32.

    Returns:
      The params with :class:`prunejax.Quantized` kernels (and biases).
    """
    table: dict[str, int] = {}
    for name in params:
        table[f"{name}/kernel"] = int(bits)
        if bias_bits:
            table[f"{name}/bias"] = int(bias_bits)
    full = jax.tree_util.tree_map(lambda m: np.ones(np.shape(m), bool), masks)
    masks = {n: {**full[n], "kernel": np.asarray(masks[n]["kernel"], bool)} for n in masks}
    return pj.kmeans_quantize(params, table, masks=masks, where=lambda p, x: True)


def layer_rows(q: PyTree) -> list[dict[str, Any]]:
    """Per kernel of a quantized model: shape, weights kept, code width, and from
    :func:`prunejax.size_report` the layer's bytes in the ``format="auto"`` file by part.

    Args:
      q: the quantized params.

    Returns:
      One dict per layer: ``layer``, ``shape``, ``weights``, ``weights_kept``,
      ``bits_per_weight`` (code width), ``value_bits`` and ``bits_per_index`` (entropy-coded
      bits per kept weight), ``bytes`` (kernel, bias and their header entries) and ``parts``.
    """
    parts = {row.name: row.parts for row in pj.size_report(q).layers}
    rows = []
    for name in sorted(q, key=lambda n: int(n.split("_")[-1])):
        k = q[name]["kernel"]
        kept = int(np.count_nonzero(np.asarray(k.mask)))
        pr = parts.get(name) or {}
        rows.append(
            {
                "layer": name,
                "shape": list(k.shape),
                "weights": k.size,
                "weights_kept": kept,
                "bits_per_weight": k.bits,
                "value_bits": 8 * pr["values"] / kept if pr and kept else None,
                "bits_per_index": 8 * pr["indices"] / kept if pr and kept else None,
                "bytes": int(sum(pr.values())) if pr else None,
                "parts": dict(pr),
            }
        )
    return rows


# ----------------------------------------------------------------------------- the stages


@dataclasses.dataclass
class Stage:
    """One point of the error-vs-size curve: a model after a pipeline stage and its file."""

    stage: str
    seed: int
    density: float
    bits: int | None
    bias_bits: int | None
    file_bytes: int
    val_error: float
    test_error: float | None
    no_entropy_bytes: int | None = None
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    path: str | None = None


def _cache_file(
    cache: Path | None, what: str, settings: CompressSettings, **key: Any
) -> Path | None:
    if cache is None:
        return None
    fields = {**dataclasses.asdict(settings), **key}
    if what == "dense":  # the dense network depends on the dense phase only
        fields = {
            k: fields[k]
            for k in ("lr", "weight_decay", "shift", "batch_size", "dense_epochs", "seed")
        }
    elif what == "pruned":
        fields.pop("quant_epochs")
        fields.pop("quant_lr")
    tag = "_".join(f"{k}={fields[k]}" for k in sorted(fields))
    return cache / f"{what}-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.npz"


def _cached(path: Path | None, build: Callable[[], Any]) -> Any:
    """``build()``'s pytree of arrays, stored in ``path`` (a ``.npz``) for the next run."""
    if path is not None and path.is_file():
        with np.load(path) as z:
            flat = {k: z[k] for k in z.files}
        tree: dict = {}
        for k, v in flat.items():
            *parents, last = k.split("/")
            node = tree
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = v
        return tree
    out = build()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = {
            "/".join(str(getattr(q, "key", q)) for q in kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(out)[0]
        }
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
            np.savez(f, **flat)
        os.replace(f.name, path)
    return out


def _measure(
    trainer: Trainer, path: Path, tree: PyTree, **save_kw: Any
) -> tuple[int, float, float | None]:
    """Save ``tree``, load the file back with :func:`prunejax.load` and score what was loaded."""
    nbytes = pj.save(path, tree, **save_kw)
    loaded = pj.load(path)
    test = trainer.error(loaded, "test") if trainer.split == "test" else None
    return int(nbytes), trainer.error(loaded, "validation"), test


def pruned_stage(trainer: Trainer, pruned: PyTree, masks: PyTree, path: Path, meta: dict) -> Stage:
    """The pruned float32 model (pruning alone: no weight sharing, no entropy coding) saved with
    :func:`prunejax.save` in the smaller of its plain sparse encodings (``bitmask`` or ``csr``),
    reloaded and scored.

    Args:
      trainer: the run's trainer (its split decides whether the test error is measured).
      pruned, masks: the pruned params and their masks.
      path: the model file.
      meta: ``seed`` and ``density``.

    Returns:
      The ``"pruned"`` stage.
    """
    sizes = {f: pj.save(path, pruned, masks=masks, format=f) for f in ("csr", "bitmask")}
    fmt = min(sizes, key=sizes.get)
    nbytes, val, test = _measure(trainer, path, pruned, masks=masks, format=fmt)
    rows = [
        {
            "layer": n,
            "shape": list(np.shape(pruned[n]["kernel"])),
            "weights": int(np.size(masks[n]["kernel"])),
            "weights_kept": int(np.count_nonzero(masks[n]["kernel"])),
            "bits_per_weight": 32,
            "format": fmt,
        }
        for n in sorted(pruned, key=lambda n: int(n.split("_")[-1]))
    ]
    d = meta["density"]
    return Stage("pruned", meta["seed"], d, None, None, nbytes, val, test, None, rows, str(path))


def compressed_stage(trainer: Trainer, q: PyTree, path: Path, meta: dict) -> Stage:
    """The quantized model saved with :func:`prunejax.save` (``format="auto"``: entropy-coded
    codes and relative indices where smaller), reloaded into a plain float tree and scored; and
    the same model saved with ``format="qrelative"`` (fixed-width codes and relative indices, no
    entropy coding: the ``no_entropy_bytes`` point).

    Args:
      trainer: the run's trainer.
      q: the fine-tuned quantized params.
      path: the model file.
      meta: ``seed``, ``density``, ``bits``, ``bias_bits``.

    Returns:
      The ``"compressed"`` stage.
    """
    ext = pj.fileformat.EXTENSION
    plain = path.with_name(path.name.removesuffix(ext) + "_qrelative" + ext)
    no_entropy = pj.save(plain, q, format="qrelative")
    nbytes, val, test = _measure(trainer, path, q)
    return Stage(
        "compressed",
        meta["seed"],
        meta["density"],
        meta["bits"],
        meta["bias_bits"],
        nbytes,
        val,
        test,
        int(no_entropy),
        layer_rows(q),
        str(path),
    )


def run_grid(
    trainer: Trainer,
    seeds: Sequence[int],
    points: Sequence[tuple[float, int, int]],
    files: Path,
    *,
    cache: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[Stage]:
    """The pipeline at every seed and point; per seed one dense network, per (seed, density)
    one pruned network, shared by the points at that density.

    Args:
      trainer: data, settings and the split errors are measured on.
      seeds: the seeds (init, batch order, augmentation).
      points: ``(density, bits, bias_bits)`` triples (``bits`` 0: the pruned model only).
      files: the folder the model files go to.
      cache: a folder for the trained dense/pruned networks (``.npz``), reused by a later run
        with the same settings; ``None`` trains everything.
      log: where progress lines go (they show the validation error only).

    Returns:
      Per seed the ``"dense"`` stage, per density the ``"pruned"`` stage, per point the
      ``"compressed"`` stage.
    """
    out: list[Stage] = []
    ext = pj.fileformat.EXTENSION
    files.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        t0 = time.perf_counter()
        dense = _cached(
            _cache_file(cache, "dense", trainer.s, seed=seed), partial(trainer.dense, seed)
        )
        out.append(_dense_stage(trainer, dense, files / f"dense_s{seed}{ext}", seed))
        log(
            f"seed {seed}: dense, val error {100 * out[-1].val_error:.2f}% "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        for d in sorted({p[0] for p in points}):
            t0 = time.perf_counter()
            pruned, masks = _pruned(trainer, dense, d, seed, cache)
            stem = f"lenet300_s{seed}_d{d:g}"
            meta: dict[str, Any] = {"seed": seed, "density": d}
            out.append(pruned_stage(trainer, pruned, masks, files / f"{stem}_pruned{ext}", meta))
            log(
                f"seed {seed}: pruned to {100 * d:g}%, {out[-1].file_bytes:,} B, val error "
                f"{100 * out[-1].val_error:.2f}% ({time.perf_counter() - t0:.0f} s)"
            )
            for _, b, bb in sorted(p for p in points if p[0] == d and p[1] > 0):
                t0 = time.perf_counter()
                q = trainer.finetune_codebooks(quantize_model(pruned, masks, b, bb), seed)
                meta = {"seed": seed, "density": d, "bits": b, "bias_bits": bb}
                out.append(compressed_stage(trainer, q, files / f"{stem}_b{b}_bb{bb}{ext}", meta))
                log(
                    f"seed {seed}: density {100 * d:g}%, {b}-bit weights, "
                    f"{bb or 32}-bit biases: {out[-1].file_bytes:,} B, val error "
                    f"{100 * out[-1].val_error:.2f}% ({time.perf_counter() - t0:.0f} s)"
                )
    return out


def _dense_stage(trainer: Trainer, dense: PyTree, path: Path, seed: int) -> Stage:
    nbytes, val, test = _measure(trainer, path, dense)
    return Stage("dense", seed, 1.0, None, None, nbytes, val, test, None, [], str(path))


def _pruned(trainer: Trainer, dense: PyTree, d: float, seed: int, cache: Path | None) -> tuple:
    def build() -> dict[str, Any]:
        params, masks = trainer.prune(dense, d, seed)
        return {"params": params, "masks": masks}

    both = _cached(_cache_file(cache, "pruned", trainer.s, seed=seed, density=d), build)
    return both["params"], jax.tree_util.tree_map(lambda m: np.asarray(m, bool), both["masks"])


# ----------------------------------------------------------------------------- summary


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(stages: Sequence[Stage]) -> list[dict[str, Any]]:
    """One row per configuration (stage, density, bits, bias bits) over its seeds.

    Args:
      stages: :func:`run_grid`'s stages.

    Returns:
      Rows with ``seeds``, ``file_bytes`` (mean) and ``file_bytes_max``, ``no_entropy_bytes``,
      ``val_error_mean``/``_std`` and, when measured, ``test_error_mean``/``_std``.
    """
    groups: dict[tuple, list[Stage]] = {}
    for st in stages:
        groups.setdefault((st.stage, st.density, st.bits, st.bias_bits), []).append(st)
    rows = []
    for (stage, d, b, bb), sts in groups.items():
        vm, vs = _mean_std([x.val_error for x in sts])
        tests = [x.test_error for x in sts if x.test_error is not None]
        tm, ts = _mean_std(tests) if tests else (None, None)
        fw = [x.no_entropy_bytes for x in sts if x.no_entropy_bytes is not None]
        rows.append(
            {
                "stage": stage,
                "density": d,
                "bits": b,
                "bias_bits": bb,
                "seeds": [x.seed for x in sts],
                "file_bytes": statistics.fmean(x.file_bytes for x in sts),
                "file_bytes_max": max(x.file_bytes for x in sts),
                "no_entropy_bytes": statistics.fmean(fw) if fw else None,
                "val_error_mean": vm,
                "val_error_std": vs,
                "test_error_mean": tm,
                "test_error_std": ts,
            }
        )
    return rows


def select(rows: Sequence[dict[str, Any]], max_bytes: float) -> dict[str, Any] | None:
    """The compressed configuration with the lowest mean VALIDATION error among those whose
    every file fits in ``max_bytes`` (``None`` if none fits)."""
    fits = [r for r in rows if r["stage"] == "compressed" and r["file_bytes_max"] <= max_bytes]
    return min(fits, key=lambda r: (r["val_error_mean"], r["file_bytes"])) if fits else None


def pareto(rows: Sequence[dict[str, Any]], key: str = "val_error_mean") -> list[dict[str, Any]]:
    """The compressed rows no other row beats in both mean file size and ``key``."""
    comp = sorted(
        (r for r in rows if r["stage"] == "compressed" and r[key] is not None),
        key=lambda r: (r["file_bytes"], r[key]),
    )
    out, best = [], float("inf")
    for r in comp:
        if r[key] < best:
            out.append(r)
            best = r[key]
    return out


# ----------------------------------------------------------------------------- command line


def _triples(text: str) -> tuple[tuple[float, int, int], ...]:
    out = []
    for item in (t for t in text.split(",") if t.strip()):
        parts = item.split("/")
        try:
            d, b, bb = float(parts[0]), int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
        except (ValueError, IndexError):
            raise argparse.ArgumentTypeError(
                f"expected density/bits[/bias_bits] items, got {item!r}"
            ) from None
        out.append((d, b, bb))
    return tuple(out)


def _numbers(kind: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers, got {text!r}"
            ) from None

    return parse


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``compress`` subcommand to the ``prunejax`` parser's subparsers ``sub``."""
    p = sub.add_parser(
        "compress",
        help="Deep Compression of LeNet-300-100: prune, share weights, entropy-code (Han 2016)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = CompressSettings()
    p.add_argument("--out", type=Path, default=Path("runs/compress"), help="output directory")
    p.add_argument("--data-dir", default=None, help="TFDS data directory holding mnist/")
    p.add_argument("--seeds", type=_numbers(int), default=(0, 1, 2))
    p.add_argument(
        "--split",
        choices=("validation", "test"),
        default="test",
        help="the split errors are reported on (choose settings on validation)",
    )
    p.add_argument(
        "--points",
        type=_triples,
        default=((0.02, 4, 0),),
        help="density/bits[/bias_bits] items (bits 0: pruning only; bias_bits 0: float32 biases)",
    )
    p.add_argument(
        "--densities",
        type=_numbers(float),
        default=None,
        help="with --bits/--bias-bits: the grid of points instead of --points",
    )
    p.add_argument("--bits", type=_numbers(int), default=(4,))
    p.add_argument("--bias-bits", type=_numbers(int), default=(0,))
    for f in dataclasses.fields(CompressSettings):
        kind = str if f.name == "allocation" else type(getattr(d, f.name))
        p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=getattr(d, f.name))
    p.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="train on the first N training images only (smoke tests)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="folder for the trained dense/pruned networks, reused across runs",
    )
    p.add_argument("--no-artifact", action="store_true", help="do not copy the smallest 100x file")
    p.add_argument("--name", default="compression", help="stem of the report files in --out")
    p.add_argument("--files", type=Path, default=None, help="model files folder (--out/files)")
    p.add_argument(
        "--merge", default=None, help="combine the JSON reports of per-seed runs (same settings)"
    )
    return p


def settings_of(args: argparse.Namespace) -> CompressSettings:
    """The :class:`CompressSettings` of parsed arguments, checked.

    Raises:
      ValueError: a setting out of range (named).
    """
    s = CompressSettings(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(CompressSettings)}
    )
    for name in ("lr", "quant_lr"):
        v = getattr(s, name)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
    for name in (
        "dense_epochs",
        "prune_epochs",
        "quant_epochs",
        "shift",
        "batch_size",
        "update_every",
    ):
        if getattr(s, name) < (1 if name in ("batch_size", "update_every", "prune_epochs") else 0):
            raise ValueError(f"--{name.replace('_', '-')} is out of range: {getattr(s, name)}")
    if not 0.0 < s.prune_fraction <= 1.0:
        raise ValueError(f"--prune-fraction must be in (0, 1], got {s.prune_fraction}")
    if s.allocation not in ALLOCATIONS:
        raise ValueError(f"--allocation must be one of {ALLOCATIONS}, got {s.allocation!r}")
    return s


def points_of(args: argparse.Namespace) -> list[tuple[float, int, int]]:
    """The ``(density, bits, bias_bits)`` points of parsed arguments, checked.

    Raises:
      ValueError: a density outside ``(0, 1]`` or bits outside ``0..16`` (named).
    """
    if args.densities is not None:
        pts = [(d, b, bb) for d in args.densities for b in args.bits for bb in args.bias_bits]
    else:
        pts = list(args.points)
    if not pts:
        raise ValueError("no points to run: give --points or --densities")
    for d, b, bb in pts:
        if not 0.0 < d <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {d}")
        if not (0 <= b <= 16 and 0 <= bb <= 16):
            raise ValueError(f"bits must be in 0..16 (0: not quantized), got {b}/{bb}")
    return sorted(set(pts))


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The ``prunejax compress`` job: the pipeline at every point and seed, then the report.

    Args:
      args: the parsed ``prunejax compress`` arguments (:func:`add_parser`).
      log: where progress lines go.

    Returns:
      The contents of ``<out>/compression.json``.
    """
    if args.merge:
        return merge(args, args.merge.split(","), log)
    t0 = time.perf_counter()
    settings, points = settings_of(args), points_of(args)
    data = load_mnist(args.data_dir, validation=VALIDATION_SIZE)
    if args.train_limit is not None:
        n = int(args.train_limit)
        data = data._replace(x_train=data.x_train[:n], y_train=data.y_train[:n])
    trainer = Trainer(data, settings, args.split)
    log(
        f"prunejax compress: {len(data.x_train):,} training images, errors on the "
        f"{args.split} split; points {points}; seeds {list(args.seeds)}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    files = args.out / "files" if args.files is None else args.files
    stages = run_grid(trainer, args.seeds, points, files, cache=args.cache, log=log)
    result = report(args, settings, stages, time.perf_counter() - t0, len(data.x_train))
    log(result["text"])
    return result


TARGETS = (("100x", 100, 0.0160), ("40x", 40, 0.0145))
"""(name, compression ratio, test-error target) of the reproduction."""

REFERENCE_DENSE_BYTES = 1_068_942
"""The dense float32 LeNet-300-100 file the targets were set against; a size limit is the
stricter of ``REFERENCE_DENSE_BYTES // ratio`` and the measured dense file's ``// ratio``."""


def size_limit(dense_bytes: int, ratio: int) -> int:
    """The largest file that is ``ratio`` times smaller than the dense file (both references)."""
    return min(int(dense_bytes), REFERENCE_DENSE_BYTES) // int(ratio)


def _pct(v: float | None, sd: float | None = None) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.2f}%" if sd is None else f"{100 * v:.2f} ± {100 * sd:.2f}%"


def _layer_lines(stage: Stage) -> list[tuple[str, ...]]:
    """The per-layer lines of :func:`format_table`."""
    paper = PAPER_LENET_300_100
    lines = []
    for lay in stage.layers:
        pl = paper["layers"].get(lay["layer"], {})
        kept = lay["weights_kept"]
        lines.append(
            (
                lay["layer"],
                f"{lay['weights']:,}",
                f"{kept:,} ({100 * kept / lay['weights']:.2f}%)",
                str(lay["bits_per_weight"])
                + ("" if lay.get("value_bits") is None else f" ({lay['value_bits']:.2f})"),
                "—" if lay.get("bits_per_index") is None else f"{lay['bits_per_index']:.2f}",
                "—" if lay.get("bytes") is None else f"{lay['bytes']:,}",
                f"{100 * pl.get('weights_kept', 0):.0f}%",
                str(pl.get("bits_per_weight", "")),
                str(pl.get("bits_per_index", "")),
            )
        )
    return lines


def format_table(row: dict[str, Any], stage: Stage, dense_bytes: int) -> str:
    """Deep Compression's Table 2 for one configuration, next to the paper's LeNet-300-100.

    Args:
      row: the configuration's :func:`summarize` row.
      stage: one of its compressed stages (the file whose per-layer numbers are shown).
      dense_bytes: the dense float32 file's bytes.

    Returns:
      The table, one line per row.
    """
    paper = PAPER_LENET_300_100
    head = (
        "layer",
        "weights",
        "kept",
        "bits/weight (coded)",
        "bits/index",
        "bytes",
        "paper kept",
        "paper bits/w",
        "paper bits/idx",
    )
    lines = [head, *_layer_lines(stage)]
    tw = sum(x["weights"] for x in stage.layers)
    tk = sum(x["weights_kept"] for x in stage.layers)
    known = [x["bytes"] for x in stage.layers if x.get("bytes") is not None]
    if known:
        lines.append(
            ("file header", "", "", "", "", f"{stage.file_bytes - sum(known):,}", "", "", "")
        )
    lines.append(
        (
            "total",
            f"{tw:,}",
            f"{tk:,} ({100 * tk / tw:.2f}%)",
            "",
            "",
            f"{stage.file_bytes:,}",
            f"{100 * paper['total_kept']:.0f}%",
            "",
            "",
        )
    )
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    text = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    err = (
        _pct(row["test_error_mean"], row["test_error_std"])
        if row["test_error_mean"] is not None
        else f"validation {_pct(row['val_error_mean'], row['val_error_std'])}"
    )
    text.append(
        f"file {stage.file_bytes:,} B of {dense_bytes:,} B dense float32 = "
        f"{dense_bytes / stage.file_bytes:.1f}x smaller; error {err} over {len(row['seeds'])} "
        f"seed(s) — paper: {paper['dense_bytes'] // 1000:,} KB -> "
        f"{paper['compressed_bytes'] // 1000} KB ({paper['ratio']}x), "
        f"{100 * paper['test_error']:.2f}% test error"
    )
    return "\n".join(text)


def _artifact(args: argparse.Namespace, stages: Sequence[Stage], row: dict) -> dict[str, Any]:
    """Copy the smallest file of the configuration ``row`` to ``lenet300_compressed<ext>``."""
    mine = [
        st
        for st in stages
        if st.stage == "compressed"
        and (st.density, st.bits, st.bias_bits) == (row["density"], row["bits"], row["bias_bits"])
    ]
    best = min(mine, key=lambda st: (st.file_bytes, st.seed))
    dest = args.out / f"lenet300_compressed{pj.fileformat.EXTENSION}"
    with atomic_path(dest) as tmp:
        shutil.copyfile(best.path, tmp)
    return {
        "path": dest.name,
        "source": Path(best.path).name,
        "seed": best.seed,
        "file_bytes": best.file_bytes,
        "test_error": best.test_error,
        "val_error": best.val_error,
    }


def report(
    args: argparse.Namespace,
    settings: CompressSettings,
    stages: list[Stage],
    wall: float,
    train_examples: int = 50_000,
) -> dict[str, Any]:
    """Write ``compression.json``, ``compression.md`` and ``compression.png`` under ``--out``
    (and, on the test split, the artifact of the 100x configuration chosen on validation).

    Args:
      args: the parsed arguments (``out``, ``name``, ``split``, ``seeds``, ``argv``).
      settings: the run's settings.
      stages: :func:`run_grid`'s stages.
      wall: the run's wall time in seconds.
      train_examples: the number of training images.

    Returns:
      The JSON's contents, with ``"text"``: the tables as printed.
    """
    rows = summarize(stages)
    dense_bytes = next(st.file_bytes for st in stages if st.stage == "dense")
    chosen, texts = {}, []
    for name, ratio, _ in TARGETS:
        row = select(rows, size_limit(dense_bytes, ratio))
        chosen[name] = row
        if row is not None:
            st = min(
                (
                    x
                    for x in stages
                    if x.stage == "compressed"
                    and (x.density, x.bits, x.bias_bits)
                    == (row["density"], row["bits"], row["bias_bits"])
                ),
                key=lambda x: x.file_bytes,
            )
            texts.append(
                f"{name} target (<= {size_limit(dense_bytes, ratio):,} B), chosen on validation:\n"
                + format_table(row, st, dense_bytes)
            )
        else:
            texts.append(
                f"{name} target (<= {size_limit(dense_bytes, ratio):,} B): no configuration fits"
            )
    cmd = "prunejax " + " ".join(getattr(args, "argv", ["compress"]))
    result: dict[str, Any] = {
        "command": cmd,
        "name": args.name,
        "split": args.split,
        "selected_on": "validation",
        "dense_file_bytes": dense_bytes,
        "settings": dataclasses.asdict(settings),
        "seeds": list(args.seeds),
        "train_examples": train_examples,
        "wall_seconds": wall,
        "chosen": chosen,
        "pareto": pareto(rows, "test_error_mean" if args.split == "test" else "val_error_mean"),
        "summary": rows,
        "stages": [dataclasses.asdict(s) for s in stages],
    }
    if args.split == "test" and chosen["100x"] is not None and not args.no_artifact:
        art = _artifact(args, stages, chosen["100x"])
        result.update(
            file_bytes=art["file_bytes"],
            test_error=art["test_error"],
            test_error_mean=chosen["100x"]["test_error_mean"],
            test_error_std=chosen["100x"]["test_error_std"],
            artifact=art,
        )
    result["text"] = "\n\n".join(texts)
    _write(args.out, result, rows)
    return result


def _markdown(result: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    split = result["split"]
    s = result["settings"]
    lines = [
        "# Deep Compression of LeNet-300-100 on MNIST",
        "",
        f"Generated by `{result['command']}` on "
        f"{_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} — {platform.machine()}, "
        f"{os.cpu_count()} cores, JAX {jax.__version__} ({jax.default_backend()}); wall time "
        f"{result['wall_seconds'] / 60:.1f} min.",
        "",
        f"Training set: the first {result['train_examples']:,} MNIST training images; "
        "validation: the last 10,000; "
        f"errors below are on the **{split}** split"
        + (
            " (settings were chosen on validation before this run)."
            if split == "test"
            else " (no test error was measured)."
        ),
        f"Seeds {result['seeds']}. Dense: {s['dense_epochs']} epochs AdamW lr {s['lr']} "
        f"(cosine), weight decay {s['weight_decay']}, random shifts of up to {s['shift']} px, "
        f"batch {s['batch_size']}. Gradual magnitude pruning (Zhu & Gupta 2017) over "
        f"{s['prune_epochs']} epochs ({s['allocation']} allocation over layers, sparsity rising "
        f"over the first {100 * s['prune_fraction']:.0f}%). Per-layer k-means weight sharing "
        f"(linear init), centroids and biases fine-tuned {s['quant_epochs']} epochs with Adam lr "
        f"{s['quant_lr']}. Files: `pj.save`, reloaded with `pj.load` and run with "
        "`pj.mlp_apply` for every error below. Dense float32 file: "
        f"{result['dense_file_bytes']:,} B.",
        "",
        "```",
        result["text"],
        "```",
        "",
        "## Every configuration",
        "",
        'No-entropy bytes: the same quantized model saved with `format="qrelative"` '
        "(fixed-width codes and fixed-width relative indices with escapes, the paper's layout "
        "before Huffman coding). Pruned rows: float32 weights in the smaller of the `csr` and "
        "`bitmask` encodings.",
        "",
        "| stage | weights kept | bits (weights/biases) | file bytes | ratio | no-entropy bytes "
        "| validation error | test error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    dense = result["dense_file_bytes"]
    for r in sorted(rows, key=lambda r: (r["stage"] != "dense", -r["density"], r["file_bytes"])):
        bits = "32/32" if r["bits"] is None else f"{r['bits']}/{r['bias_bits'] or 32}"
        fw = "—" if r["no_entropy_bytes"] is None else f"{r['no_entropy_bytes']:,.0f}"
        lines.append(
            f"| {r['stage']} | {100 * r['density']:.2f}% | {bits} | {r['file_bytes']:,.0f} | "
            f"{dense / r['file_bytes']:.1f}x | {fw} | "
            f"{_pct(r['val_error_mean'], r['val_error_std'])} | "
            f"{_pct(r['test_error_mean'], r['test_error_std'])} |"
        )
    return "\n".join(lines) + "\n"


def _write(out: Path, result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    name = result.get("name", "compression")
    atomic_write_text(out / f"{name}.json", json.dumps(result, indent=1, default=float) + "\n")
    atomic_write_text(out / f"{name}.md", _markdown(result, rows))
    key = "test_error_mean" if result["split"] == "test" else "val_error_mean"
    std = key.replace("mean", "std")
    series: dict[str, list] = {
        "pruning alone (float32 sparse file)": [],
        "+ weight sharing (fixed-width codes and indices)": [],
        "+ entropy coding (the file)": [],
    }
    labels = list(series)
    for r in rows:
        pt = (100 * r[key], 100 * r[std])
        if r["stage"] == "pruned":
            series[labels[0]].append((r["file_bytes"], *pt))
        elif r["stage"] == "compressed":
            series[labels[1]].append((r["no_entropy_bytes"], *pt))
            series[labels[2]].append((r["file_bytes"], *pt))
    for lab in labels[1:]:  # the best error at each size: the Pareto front of each stage
        front, best = [], float("inf")
        for p in sorted(series[lab]):
            if p[1] < best:
                front.append(p)
                best = p[1]
        series[lab] = front
    dense = result["dense_file_bytes"]
    targets = [
        (size_limit(dense, ratio), 100 * err, f"{name} target") for name, ratio, err in TARGETS
    ]
    plot_error_vs_size(
        series,
        out / f"{name}.png",
        "LeNet-300-100 on MNIST: error vs file size",
        targets=targets,
        ylabel=f"{result['split']} error (%)",
    )


def merge(args: argparse.Namespace, paths: Sequence[str], log: Callable[[str], None]) -> dict:
    """One report from the reports of runs that differ only in their seeds (run side by side).

    Args:
      args: the parsed arguments (``--out``, ``--name``, ``--no-artifact``).
      paths: the runs' JSON reports.
      log: where the tables go.

    Returns:
      The merged report, as written.

    Raises:
      ValueError: the runs' settings or splits differ.
    """
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for p, part in zip(paths, parts, strict=True):
        if (part["settings"], part["split"]) != (first["settings"], first["split"]):
            raise ValueError(f"{p} was run with other settings or split than {paths[0]}")
    stages = [Stage(**st) for part in parts for st in part["stages"]]
    command = " ; ".join([*(part["command"] for part in parts), "prunejax " + " ".join(args.argv)])
    args.split = first["split"]
    args.seeds = [s for part in parts for s in part["seeds"]]
    settings = CompressSettings(**first["settings"])
    wall = sum(part["wall_seconds"] for part in parts)
    result = report(args, settings, stages, wall, first["train_examples"])
    result["command"] = command
    result["merged_from"] = [str(p) for p in paths]
    _write(args.out, result, result["summary"])
    log(result["text"])
    return result
