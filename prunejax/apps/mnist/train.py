"""Training with masks: one train step shared by two loops, and evaluation.

* :func:`fit` — the host loop: NumPy batches (optionally augmented on the host) fed to a jitted
  data-parallel step, progress, NaN detection, a checkpoint after every epoch and exact resume.
* :func:`fit_scan` — whole epochs as one jitted ``lax.scan`` over data kept on the device
  (in-jit augmentation such as :func:`prunejax.apps.mnist.shift_images`), for long benchmark
  runs where the per-step dispatch of :func:`fit` would dominate.

Both call :func:`train_step` with a loss function ``loss_fn(params, x, y, key)`` returning a
scalar loss or ``(loss, aux)`` with ``aux`` a dict of scalar metrics (e.g. ``{"accuracy": ...}``);
:func:`classifier_loss` builds one for a Flax classifier.

Determinism: the batch order of epoch ``e`` depends only on ``(seed, e)``
(:func:`prunejax.apps.mnist.epoch_order`) and the key of step ``t`` of :func:`fit` is
``fold_in(key(seed), t)``, so a run resumed from a checkpoint replays exactly the steps an
uninterrupted run would have done.

Data parallelism (:func:`fit`): the step runs over a 1-D ``jax.sharding.Mesh`` of devices (axis
``"data"``): every batch is sharded over it, params and optimizer state are replicated, and XLA
inserts the gradient all-reduce; there is no hand-written communication.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prunejax._util import PyTree, check_int
from prunejax.apps.mnist.checkpoint import (
    CheckpointError,
    leaf_shapes,
    restore_checkpoint,
    save_checkpoint,
)
from prunejax.apps.mnist.data import batch_indices, batches, num_batches
from prunejax.apps.mnist.progress import EpochMeter

__all__ = [
    "ClassifierLoss",
    "FitResult",
    "TrainConfig",
    "classifier_loss",
    "data_mesh",
    "evaluate",
    "fit",
    "fit_scan",
    "kernel_density",
    "make_train_step",
    "scan_epoch",
    "train_step",
]

LossFn = Callable[..., Any]
"""``loss_fn(params, x, y, key) -> loss`` or ``-> (loss, aux)``, ``aux`` a dict of scalars."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how :func:`fit` / :func:`fit_scan` train.

    Attributes:
      epochs: number of epochs (``>= 0``).
      batch_size: examples per step (``<= len(x)``; :func:`fit`: a multiple of the number of
        mesh devices).
      seed: seed of the shuffling and of the step keys (dropout, augmentation).
      progress: show progress (:func:`fit`: a bar on a terminal, one line per epoch otherwise).
      desc: name of the phase in progress and error messages.
      log_every: :func:`fit`'s steps between progress updates and NaN checks.
    """

    epochs: int
    batch_size: int
    seed: int = 0
    progress: bool = True
    desc: str = "train"
    log_every: int = 50


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      params: trained params (NumPy arrays on the host).
      opt_state: final optimizer state.
      history: one dict per epoch: ``epoch``, ``loss`` and the loss function's aux metrics
        (e.g. ``accuracy``; training, mean over the epoch), ``density`` (of kernels, at the end
        of the epoch) and, with ``eval_fn``, its metrics prefixed ``test_`` (e.g.
        ``test_loss``/``test_accuracy``/``test_error``).
    """

    params: PyTree
    opt_state: Any
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- the step


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh (axis ``"data"``) over ``devices``.

    Args:
      devices: the devices (default: all local devices).

    Returns:
      The mesh.
    """
    devs = list(jax.local_devices() if devices is None else devices)
    if not devs:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.array(devs), ("data",))


def kernel_density(params: PyTree) -> jax.Array:
    """Fraction of nonzero entries over all leaves with ``ndim >= 2`` (the kernels).

    Args:
      params: a params pytree.

    Returns:
      A float32 scalar (1 when there are no kernels).
    """
    leaves = [x for x in jax.tree_util.tree_leaves(params) if jnp.ndim(x) >= 2]
    if not leaves:
        return jnp.ones((), jnp.float32)
    nz = sum(jnp.count_nonzero(x) for x in leaves)
    return (nz / sum(x.size for x in leaves)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ClassifierLoss:
    """Mean softmax cross-entropy of a Flax classifier, with its accuracy as aux metric.

    Attributes:
      model: a Flax module called as ``model.apply({"params": p}, x, train=True,
        rngs={"dropout": key})`` (e.g. :class:`prunejax.models.MLP`).
    """

    model: Any

    def __call__(
        self, params: PyTree, x: jax.Array, y: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(loss, {"accuracy": acc})`` of the batch ``(x, y)`` in training mode."""
        logits = self.model.apply({"params": params}, x, train=True, rngs={"dropout": key})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


def classifier_loss(model: Any) -> ClassifierLoss:
    """The training loss of a Flax classifier, for :func:`fit`.

    Args:
      model: the Flax module (e.g. :class:`prunejax.models.MLP`).

    Returns:
      ``loss_fn(params, x, y, key) -> (loss, {"accuracy": ...})``.
    """
    return ClassifierLoss(model)


def _with_aux(loss_fn: LossFn) -> Callable[..., tuple[jax.Array, dict]]:
    def f(params: PyTree, x: jax.Array, y: jax.Array, key: jax.Array) -> Any:
        out = loss_fn(params, x, y, key)
        return out if isinstance(out, tuple) else (out, {})

    return f


def train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    params: PyTree,
    opt_state: Any,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
) -> tuple[PyTree, Any, jax.Array, dict[str, jax.Array]]:
    """One optimizer step on the batch ``(x, y)`` (pure; call it inside ``jit``).

    Args:
      loss_fn: ``(params, x, y, key) -> loss`` or ``(loss, aux)``.
      tx: the optimizer.
      params, opt_state: the current params and optimizer state.
      x, y: the batch.
      key: random key handed to ``loss_fn`` (e.g. dropout).

    Returns:
      ``(params, opt_state, loss, aux)``: the updated params and state, and the batch's loss and
      aux metrics before the update.
    """
    (loss, aux), grads = jax.value_and_grad(_with_aux(loss_fn), has_aux=True)(params, x, y, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux


def make_train_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh | None = None
) -> Callable[..., Any]:
    """:func:`train_step` jitted over a device mesh, for :func:`fit`.

    The step is ``(params, opt_state, x, y, key, t) -> (params, opt_state, metrics)`` with the
    key of step ``t`` being ``fold_in(key, t)``; ``metrics`` holds float32 scalars: ``loss`` and
    the aux metrics of the batch (before the update) and the kernel ``density`` (after).  ``x``
    and ``y`` are sharded over the mesh's ``"data"`` axis, everything else is replicated.

    Args:
      loss_fn: ``(params, x, y, key) -> loss`` or ``(loss, aux)``.
      tx: the optimizer.
      mesh: a 1-D device mesh from :func:`data_mesh` (default: one over all local devices).

    Returns:
      The jitted step function (it donates its params and optimizer-state arguments).
    """
    mesh = data_mesh() if mesh is None else mesh
    repl = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec("data"))

    def step(params, opt_state, x, y, key, t):
        key = jax.random.fold_in(key, t)
        params, opt_state, loss, aux = train_step(loss_fn, tx, params, opt_state, x, y, key)
        metrics = {"loss": loss, **aux, "density": kernel_density(params)}
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return params, opt_state, metrics

    return jax.jit(
        step,
        in_shardings=(repl, repl, data, data, repl, repl),
        out_shardings=repl,
        donate_argnums=(0, 1),
    )


# ----------------------------------------------------------------------------- evaluation

_EVAL_CACHE: dict[int, Any] = {}


def _eval_fn(model: Any) -> Any:
    key = hash(model)
    if key not in _EVAL_CACHE:

        @jax.jit
        def fn(params, x, y):
            logits = model.apply({"params": params}, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
            return loss, jnp.sum(jnp.argmax(logits, -1) == y)

        _EVAL_CACHE[key] = fn
    return _EVAL_CACHE[key]


def evaluate(
    model: Any, params: PyTree, x: np.ndarray, y: np.ndarray, *, batch_size: int = 10_000
) -> dict[str, float]:
    """Mean cross-entropy loss, accuracy and error of a Flax classifier on ``(x, y)``.

    Args:
      model: the Flax module (applied in inference mode).
      params: its params.
      x, y: inputs and integer labels.
      batch_size: examples per evaluation batch.

    Returns:
      ``{"loss", "accuracy", "error"}`` as Python floats.
    """
    params = jax.device_get(params)
    fn = _eval_fn(model)
    loss_sum = correct = 0.0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        ls, c = fn(params, jnp.asarray(xb), jnp.asarray(yb))
        loss_sum += float(ls)
        correct += float(c)
    n = len(x)
    return {"loss": loss_sum / n, "accuracy": correct / n, "error": (n - correct) / n}


# ----------------------------------------------------------------------------- fit


def _check_config(config: TrainConfig, n: int, mesh: Mesh) -> None:
    check_int(config.epochs, name="epochs", minimum=0)
    check_int(config.batch_size, name="batch_size", minimum=1)
    check_int(config.log_every, name="log_every", minimum=1)
    if config.batch_size > n:
        raise ValueError(
            f"batch_size ({config.batch_size}) is larger than the split ({n} examples)"
        )
    ndev = mesh.devices.size
    if config.batch_size % ndev:
        raise ValueError(
            f"batch_size ({config.batch_size}) must be a multiple of the number of devices ({ndev})"
        )


def _model_name(loss_fn: LossFn) -> str:
    model = getattr(loss_fn, "model", None)
    if model is not None:
        return type(model).__name__
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


def _resume(
    checkpoint: str | os.PathLike, state: dict, meta_base: dict, epochs: int
) -> tuple[dict, list[dict[str, float]], int]:
    """``(state, history, start epoch)`` from ``checkpoint``, refusing other settings and
    metadata that do not agree with themselves (an epoch without its history records)."""
    tree, meta = restore_checkpoint(checkpoint, state)
    config = meta_base["config"]
    if meta.get("config") != config:
        raise CheckpointError(
            f"checkpoint {checkpoint} was written with other settings "
            f"({meta.get('config')}) than this run ({config}); "
            "start afresh (no resume) or use another output directory"
        )
    if meta.get("model") != meta_base["model"]:
        raise CheckpointError(
            f"checkpoint {checkpoint} was written for model {meta.get('model')!r}, "
            f"this run trains {meta_base['model']!r}"
        )
    start_epoch, history = meta.get("epoch"), meta.get("history")
    if type(start_epoch) is not int or not 1 <= start_epoch <= epochs:
        raise CheckpointError(
            f"checkpoint {checkpoint} has epoch {start_epoch!r}; this run has epochs 1..{epochs}"
        )
    if not isinstance(history, list) or [
        h.get("epoch") if isinstance(h, dict) else None for h in history
    ] != list(range(1, start_epoch + 1)):
        raise CheckpointError(
            f"checkpoint {checkpoint} is inconsistent: epoch {start_epoch} but its history "
            "does not hold one record per epoch 1..epoch"
        )
    return tree, history, start_epoch


def _host_copy(tree: PyTree, sharding: NamedSharding) -> PyTree:
    # the step donates its params/state buffers: the caller's arrays must survive
    return jax.device_put(jax.tree_util.tree_map(np.array, jax.device_get(tree)), sharding)


def _train_epoch(
    step_fn: Callable[..., Any],
    state: tuple[PyTree, Any],
    data: tuple[np.ndarray, np.ndarray],
    config: TrainConfig,
    epoch: int,
    key: jax.Array,
    mesh: Mesh,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None,
) -> tuple[tuple[PyTree, Any], dict[str, float]]:
    """One epoch of host batches through ``step_fn``; returns the state and the epoch's record."""
    x, y = data
    steps = num_batches(len(x), config.batch_size)
    meter = EpochMeter(
        steps, config.desc, epoch, config.epochs, epoch * steps, progress=config.progress
    )
    data_sh = NamedSharding(mesh, PartitionSpec("data"))
    params, opt_state = state
    t = epoch * steps
    aug_rng = np.random.default_rng([int(config.seed), epoch, 1])
    for xb, yb in batches(x, y, config.batch_size, seed=config.seed, epoch=epoch):
        if augment is not None:
            xb = augment(xb, aug_rng)
        xb, yb = jax.device_put(xb, data_sh), jax.device_put(yb, data_sh)
        params, opt_state, metrics = step_fn(params, opt_state, xb, yb, key, t)
        meter.pending.append(metrics)
        t += 1
        if len(meter.pending) >= config.log_every:
            meter.flush(t)
    meter.flush(t)
    meter.close()
    return (params, opt_state), {"epoch": epoch + 1, **meter.summary()}


def fit(
    loss_fn: LossFn,
    params: PyTree,
    tx: optax.GradientTransformation,
    data: tuple[np.ndarray, np.ndarray],
    config: TrainConfig,
    *,
    eval_fn: Callable[[PyTree], dict[str, float]] | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    run_config: dict | None = None,
    mesh: Mesh | None = None,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> FitResult:
    """Train ``params`` on ``data`` with ``tx`` for ``config.epochs`` epochs.

    Every epoch the training data are shuffled from ``(seed, epoch)``.  After each epoch, when
    ``checkpoint`` is given, params, optimizer state and history are written there atomically;
    with ``resume=True`` an existing checkpoint is loaded and training continues after its last
    complete epoch, giving the same result as an uninterrupted run.

    Args:
      loss_fn: ``(params, x, y, key) -> loss`` or ``(loss, aux)`` (e.g.
        :func:`classifier_loss`); ``key`` is the step's key (dropout).
      params: initial params (not donated: the caller's arrays stay valid).
      tx: optimizer (e.g. ``masked(make_optimizer(...), masks)``).
      data: ``(x, y)`` training inputs and labels (NumPy).
      config: epochs, batch size, seed and progress display (:class:`TrainConfig`).
      eval_fn: ``params -> {name: value}`` run after each epoch (e.g. ``lambda p:
        evaluate(model, p, x_test, y_test)``); recorded in the history as ``test_<name>``.
      checkpoint: checkpoint file for this training phase.
      resume: continue from ``checkpoint`` if it exists.
      run_config: JSON-serialisable settings stored in the checkpoint; resuming a checkpoint
        written with other settings is refused.
      mesh: device mesh (default: all local devices).
      augment: ``(x_batch, rng) -> x_batch`` applied to every training batch (e.g.
        :func:`prunejax.apps.mnist.random_shift`); its generator is seeded from
        ``(seed, epoch)``.

    Returns:
      :class:`FitResult`.

    Raises:
      ValueError: bad ``epochs``/``batch_size``.
      CheckpointError: the checkpoint to resume from is damaged (its SHA-256 covers arrays and
        metadata), from another run/model, or inconsistent; or ``checkpoint`` is not a file.
      FloatingPointError: the loss became NaN or inf; the message names the step.
    """
    mesh = data_mesh() if mesh is None else mesh
    _check_config(config, len(data[0]), mesh)
    repl = NamedSharding(mesh, PartitionSpec())
    params = jax.tree_util.tree_map(jnp.asarray, params)
    state = {"params": params, "opt_state": tx.init(params)}
    history: list[dict[str, float]] = []
    start_epoch = 0
    cfg = {"seed": int(config.seed), "batch_size": int(config.batch_size), **(run_config or {})}
    cfg = json.loads(json.dumps(cfg))
    shapes = {k: list(v[0]) for k, v in leaf_shapes(jax.device_get(params)).items()}
    meta_base = {"model": _model_name(loss_fn), "shapes": shapes, "config": cfg}
    if checkpoint is not None and Path(checkpoint).exists() and not Path(checkpoint).is_file():
        raise CheckpointError(f"checkpoint {checkpoint} exists and is not a regular file")
    if checkpoint is not None and resume and Path(checkpoint).exists():
        state, history, start_epoch = _resume(checkpoint, state, meta_base, config.epochs)
    step_fn = make_train_step(loss_fn, tx, mesh)
    carry = (_host_copy(state["params"], repl), _host_copy(state["opt_state"], repl))
    key = jax.device_put(jax.random.key(config.seed), repl)
    for epoch in range(start_epoch, config.epochs):
        carry, record = _train_epoch(step_fn, carry, data, config, epoch, key, mesh, augment)
        if eval_fn is not None:
            record.update({f"test_{k}": v for k, v in eval_fn(carry[0]).items()})
        history.append(record)
        if checkpoint is not None:
            save_checkpoint(
                checkpoint,
                {"params": carry[0], "opt_state": carry[1]},
                {**meta_base, "epoch": epoch + 1, "history": history},
            )
    return FitResult(jax.device_get(carry[0]), jax.device_get(carry[1]), history)


# ----------------------------------------------------------------------------- whole-epoch scan


@partial(
    jax.jit,
    static_argnames=("loss_fn", "make_tx", "augment"),
    donate_argnames=("params", "opt_state"),
)
def scan_epoch(
    params: PyTree,
    opt_state: Any,
    aux: Any,
    x: jax.Array,
    y: jax.Array,
    order: jax.Array,
    key: jax.Array,
    *,
    loss_fn: LossFn,
    make_tx: Callable[[Any], optax.GradientTransformation],
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[PyTree, Any, jax.Array]:
    """One epoch of :func:`train_step` as a single jitted ``lax.scan``.

    The optimizer is built inside ``jit`` as ``make_tx(aux)``, so arrays it depends on (masks,
    per-leaf targets) are traced and one compilation serves every value of them.

    Args:
      params, opt_state: the state (donated).
      aux: arrays handed to ``make_tx`` (or ``None``).
      x, y: the whole training set, on the device.
      order: ``(steps, batch_size)`` example indices of the epoch's batches
        (:func:`prunejax.apps.mnist.batch_indices`).
      key: the epoch's key; step ``i`` uses ``split(key, steps)[i]`` for ``augment`` and its
        ``fold_in(., 1)`` for ``loss_fn``.
      loss_fn: static, hashable ``(params, x, y, key) -> loss`` or ``(loss, aux)``.
      make_tx: static, hashable ``aux -> GradientTransformation`` (equal factories share a
        compilation: use a module-level function or a frozen dataclass).
      augment: static, hashable ``(key, x_batch) -> x_batch`` (e.g. a fixed
        ``functools.partial(shift_images, max_shift=1)``), or ``None``.

    Returns:
      ``(params, opt_state, mean loss of the epoch)``.
    """
    tx = make_tx(aux)

    def body(carry: tuple, step: tuple) -> tuple[tuple, jax.Array]:
        p, s = carry
        ids, k = step
        xb = x[ids] if augment is None else augment(k, x[ids])
        p, s, loss, _ = train_step(loss_fn, tx, p, s, xb, y[ids], jax.random.fold_in(k, 1))
        return (p, s), loss

    keys = jax.random.split(key, order.shape[0])
    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), (order, keys))
    return params, opt_state, jnp.mean(losses)


def fit_scan(
    loss_fn: LossFn,
    make_tx: Callable[[Any], optax.GradientTransformation],
    params: PyTree,
    data: tuple[jax.Array, jax.Array],
    config: TrainConfig,
    *,
    aux: Any = None,
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[PyTree, Any]:
    """Train whole epochs, each one jitted ``lax.scan`` (:func:`scan_epoch`) over device data.

    The batch order of epoch ``e`` is :func:`fit`'s (:func:`prunejax.apps.mnist.batch_indices`
    from ``(seed, e)``) and its key ``fold_in(PRNGKey(seed), e)``.  The loss is fetched once per
    epoch; ``config.progress`` and ``config.log_every`` are not used.

    Args:
      loss_fn: static, hashable ``(params, x, y, key) -> loss`` or ``(loss, aux)``.
      make_tx: static, hashable ``aux -> GradientTransformation`` (see :func:`scan_epoch`).
      params: initial params (copied, not donated).
      data: ``(x, y)``, best already on the device (``jax.device_put``).
      config: epochs, batch size, seed, and ``desc`` for error messages.
      aux: the arrays ``make_tx`` takes (masks, targets), or ``None``.
      augment: static, hashable ``(key, x_batch) -> x_batch`` applied inside ``jit``.

    Returns:
      ``(params, opt_state)``.

    Raises:
      FloatingPointError: an epoch's mean loss is NaN or inf.
    """
    x, y = data
    n = len(x)
    check_int(config.epochs, name="epochs", minimum=0)
    check_int(config.batch_size, name="batch_size", minimum=1)
    params = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), params)
    opt_state = make_tx(aux).init(params)
    for e in range(config.epochs):
        key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), e)
        order = jnp.asarray(batch_indices(n, config.batch_size, config.seed, e))
        params, opt_state, loss = scan_epoch(
            params, opt_state, aux, x, y, order, key,
            loss_fn=loss_fn, make_tx=make_tx, augment=augment,
        )  # fmt: skip
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"{config.desc}: loss {float(loss)} in epoch {e + 1}")
    return params, opt_state
