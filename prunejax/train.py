"""Training with masks: a jitted data-parallel train step, evaluation, checkpoints, and the
iterative prune-retrain driver (Han et al. 2015) and gradual-pruning driver (Zhu & Gupta 2017).

Determinism: the batch order of epoch ``e`` depends only on ``(seed, e)`` and the dropout key of
step ``t`` is ``fold_in(key(seed), t)``, so a run resumed from a checkpoint replays exactly the
steps an uninterrupted run would have done.

Data parallelism: the train step runs over a 1-D ``jax.sharding.Mesh`` of devices (axis
``"data"``): every batch is sharded over it, params and optimizer state are replicated, and XLA
inserts the gradient all-reduce; there is no hand-written communication.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prunejax._util import PyTree, path_str
from prunejax.data import batches, num_batches
from prunejax.masks import apply_masks, combine, magnitude_masks
from prunejax.schedules import polynomial_sparsity
from prunejax.transforms import current_masks, masked, pruning

__all__ = [
    "CheckpointError",
    "FitResult",
    "RoundResult",
    "data_mesh",
    "evaluate",
    "fit",
    "gradual_pruning",
    "iterative_pruning",
    "kernel_density",
    "load_checkpoint",
    "make_optimizer",
    "make_train_step",
    "restore_checkpoint",
    "save_checkpoint",
]

_FORMAT = "prunejax-checkpoint"
_VERSION = 1


# ----------------------------------------------------------------------------- optimizer


def make_optimizer(
    learning_rate: float,
    total_steps: int,
    *,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """Adam(W) with a decaying learning rate.

    Args:
      learning_rate: peak learning rate (``> 0``).
      total_steps: steps the schedule decays over (``>= 1``).
      schedule: ``"cosine"`` (to 0 at ``total_steps``), ``"exponential"`` (to 1% of the peak)
        or ``"constant"``.
      weight_decay: decoupled weight decay (AdamW, Loshchilov & Hutter 2019); 0 gives Adam.

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: ``learning_rate <= 0`` (or NaN), ``total_steps < 1``, an unknown schedule,
        ``weight_decay < 0``.
    """
    lr = _positive(learning_rate, "learning_rate")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int | np.integer):
        raise TypeError(f"total_steps must be an int, got {type(total_steps).__name__}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    wd = float(weight_decay)
    if not (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if schedule == "cosine":
        sched: Any = optax.cosine_decay_schedule(lr, int(total_steps))
    elif schedule == "exponential":
        sched = optax.exponential_decay(lr, int(total_steps), 0.01)
    elif schedule == "constant":
        sched = lr
    else:
        raise ValueError(
            f"unknown learning-rate schedule {schedule!r}; "
            "expected 'cosine', 'exponential' or 'constant'"
        )
    if wd > 0:
        return optax.adamw(sched, weight_decay=wd)
    return optax.adam(sched)


def _positive(value: Any, name: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return f


# ----------------------------------------------------------------------------- steps


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh (axis ``"data"``) over ``devices`` (default: all local devices)."""
    devs = list(jax.local_devices() if devices is None else devices)
    if not devs:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.array(devs), ("data",))


def kernel_density(params: PyTree) -> jax.Array:
    """Fraction of nonzero entries over all leaves with ``ndim >= 2`` (the kernels)."""
    leaves = [x for x in jax.tree_util.tree_leaves(params) if jnp.ndim(x) >= 2]
    if not leaves:
        return jnp.ones((), jnp.float32)
    nz = sum(jnp.count_nonzero(x) for x in leaves)
    return (nz / sum(x.size for x in leaves)).astype(jnp.float32)


def _loss_fn(model: Any, params: PyTree, x: jax.Array, y: jax.Array, key: jax.Array) -> Any:
    logits = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return loss, acc


def make_train_step(
    model: Any, tx: optax.GradientTransformation, mesh: Mesh | None = None
) -> Callable[..., Any]:
    """The jitted step ``(params, opt_state, x, y, key, step) -> (params, opt_state, metrics)``.

    ``metrics`` is a float32 vector ``[loss, accuracy, kernel density]`` of the batch (loss and
    accuracy before the update, density after).  With a ``mesh``, ``x``/``y`` are sharded over
    its ``"data"`` axis and everything else is replicated (see :func:`shard_batch`).

    Args:
      model: a Flax module called as ``model.apply({"params": p}, x, train=True, rngs=...)``.
      tx: the optimizer.
      mesh: a 1-D device mesh from :func:`data_mesh` (default: one over all local devices).

    Returns:
      The jitted step function.
    """
    mesh = data_mesh() if mesh is None else mesh
    repl = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec("data"))

    def step(params, opt_state, x, y, key, t):
        key = jax.random.fold_in(key, t)
        (loss, acc), grads = jax.value_and_grad(
            lambda p: _loss_fn(model, p, x, y, key), has_aux=True
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = jnp.stack([loss, acc, kernel_density(params)]).astype(jnp.float32)
        return params, opt_state, metrics

    return jax.jit(
        step,
        in_shardings=(repl, repl, data, data, repl, repl),
        out_shardings=repl,
        donate_argnums=(0, 1),
    )


def evaluate(
    model: Any, params: PyTree, x: np.ndarray, y: np.ndarray, *, batch_size: int = 10_000
) -> dict[str, float]:
    """Mean cross-entropy loss, accuracy and error of ``model`` on ``(x, y)``.

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


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt, or was written for a different model/run."""


def _atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | os.PathLike, tree: PyTree, meta: dict | None = None) -> None:
    """Write ``tree`` (any pytree: params, masks, optimizer state) and JSON ``meta`` atomically.

    The file is flax msgpack (``flax.serialization``) of ``{"format", "version", "meta",
    "sha256", "state"}``, written to a temporary file in the same directory and moved into place
    with ``os.replace``: an interrupted write never leaves a partial file behind.

    Args:
      path: destination file.
      tree: the pytree to save (NumPy/JAX arrays; NamedTuple optimizer states are fine).
      meta: JSON-serialisable metadata (model widths, epoch, config).
    """
    state = flax.serialization.to_state_dict(jax.device_get(tree))
    state_bytes = flax.serialization.msgpack_serialize(state)
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "meta": json.dumps(meta or {}, sort_keys=True),
        "sha256": hashlib.sha256(state_bytes).hexdigest(),
        "state": state_bytes,
    }
    _atomic_write(Path(path), flax.serialization.msgpack_serialize(payload))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a checkpoint without a template.

    Returns:
      ``(state, meta)``: the raw state dict (nested dicts of NumPy arrays) and the metadata.

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: the file is truncated, corrupt or not a prunejax checkpoint.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        payload = flax.serialization.msgpack_restore(raw)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({len(raw)} bytes): {e}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a prunejax checkpoint")
    if payload.get("version") != _VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('version')!r}, "
            f"this prunejax reads version {_VERSION}"
        )
    state_bytes = payload["state"]
    if hashlib.sha256(state_bytes).hexdigest() != payload.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    try:
        state = flax.serialization.msgpack_restore(state_bytes)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {e}") from None
    return state, json.loads(payload["meta"])


def _flat_shapes(state: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    return {path_str(kp): (tuple(np.shape(v)), str(np.result_type(v))) for kp, v in flat}


def restore_checkpoint(path: str | os.PathLike, template: PyTree) -> tuple[PyTree, dict]:
    """Read a checkpoint into the structure of ``template``, checking every leaf's shape.

    Args:
      path: the checkpoint file.
      template: a pytree with the expected structure, shapes and dtypes (e.g. freshly
        initialised params and optimizer state).

    Returns:
      ``(tree, meta)``.

    Raises:
      CheckpointError: truncated/corrupt file, or a leaf missing, extra or of another shape
        (a checkpoint written by a different model), naming the leaf.
    """
    state, meta = load_checkpoint(path)
    want = _flat_shapes(flax.serialization.to_state_dict(jax.device_get(template)))
    have = _flat_shapes(state)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match this model: "
            f"missing leaves {missing[:5]}, unexpected leaves {extra[:5]}"
        )
    for p, (shape, dtype) in want.items():
        hshape, hdtype = have[p]
        if hshape != shape:
            raise CheckpointError(
                f"checkpoint {path} was written by a different model: leaf {p!r} has shape "
                f"{hshape}, this model expects {shape}"
            )
        if hdtype != dtype:
            raise CheckpointError(
                f"checkpoint {path}: leaf {p!r} has dtype {hdtype}, expected {dtype}"
            )
    tree = flax.serialization.from_state_dict(template, state)
    tree = jax.tree_util.tree_map(jnp.asarray, tree)
    return tree, meta


# ----------------------------------------------------------------------------- fit


class _EpochMeter:
    """Collects per-step metrics on the device, fetches them in groups, checks for NaN."""

    def __init__(self, bar: Any, desc: str, epoch: int, first_step: int) -> None:
        self.bar, self.desc, self.epoch, self.first_step = bar, desc, epoch, first_step
        self.pending: list[jax.Array] = []
        self.sums = np.zeros(2)
        self.seen = 0
        self.density = float("nan")

    def flush(self, upto: int) -> None:
        if not self.pending:
            return
        m = np.asarray(jax.device_get(jnp.stack(self.pending)), np.float64)
        first = upto - len(self.pending)
        self.pending = []
        bad = np.flatnonzero(~np.isfinite(m[:, 0]))
        if bad.size:
            s = first + int(bad[0])
            raise FloatingPointError(
                f"{self.desc}: loss became {m[bad[0], 0]} at step {s} "
                f"(epoch {self.epoch + 1}, batch {s - self.first_step + 1}); training stopped"
            )
        self.sums += m[:, :2].sum(0)
        self.seen += len(m)
        self.density = float(m[-1, 2])
        self.bar.update(len(m))
        self.bar.set_postfix(
            loss=f"{self.sums[0] / self.seen:.4f}",
            acc=f"{self.sums[1] / self.seen:.4f}",
            sparsity=f"{1 - self.density:.3f}",
        )

    def summary(self) -> dict[str, float]:
        n = max(self.seen, 1)
        return {
            "loss": float(self.sums[0] / n),
            "accuracy": float(self.sums[1] / n),
            "density": self.density,
        }


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      params: trained params (NumPy arrays on the host).
      opt_state: final optimizer state.
      history: one dict per epoch: ``epoch``, ``loss``, ``accuracy`` (training, mean over the
        epoch), ``density`` (of kernels, at the end of the epoch) and, with ``eval_data``,
        ``test_loss``/``test_accuracy``/``test_error``.
    """

    params: PyTree
    opt_state: Any
    history: list[dict[str, float]] = field(default_factory=list)


def _model_meta(model: Any, params: PyTree) -> dict:
    flat = _flat_shapes(jax.device_get(params))
    return {"model": type(model).__name__, "shapes": {k: list(v[0]) for k, v in flat.items()}}


def fit(
    model: Any,
    params: PyTree,
    x: np.ndarray,
    y: np.ndarray,
    *,
    tx: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    eval_data: tuple[np.ndarray, np.ndarray] | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    run_config: dict | None = None,
    progress: bool = True,
    desc: str = "train",
    mesh: Mesh | None = None,
    log_every: int = 50,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> FitResult:
    """Train ``model`` from ``params`` with ``tx`` for ``epochs`` epochs.

    Every epoch the training data are shuffled from ``(seed, epoch)``; a tqdm bar shows loss,
    accuracy and the current kernel sparsity.  After each epoch, when ``checkpoint`` is given,
    params, optimizer state and history are written there atomically; with ``resume=True`` an
    existing checkpoint is loaded and training continues after its last complete epoch, giving
    the same result as an uninterrupted run.

    Args:
      model: a Flax module (e.g. :class:`prunejax.models.MLP`).
      params: initial params.
      x, y: training inputs and integer labels (NumPy).
      tx: optimizer (e.g. ``masked(make_optimizer(...), masks)``).
      epochs: number of epochs (``>= 0``).
      batch_size: examples per step (``<= len(x)``, a multiple of the number of mesh devices).
      seed: seed of the shuffling and the dropout keys.
      eval_data: ``(x_test, y_test)`` evaluated after each epoch.
      checkpoint: checkpoint file for this training phase.
      resume: continue from ``checkpoint`` if it exists.
      run_config: JSON-serialisable settings stored in the checkpoint; resuming a checkpoint
        written with other settings is refused.
      progress: show the tqdm bar.
      desc: label of the bar.
      mesh: device mesh (default: all local devices).
      log_every: steps between progress updates and NaN checks.
      augment: ``(x_batch, rng) -> x_batch`` applied to every training batch (e.g.
        :func:`prunejax.data.random_shift`); its generator is seeded from ``(seed, epoch)``.

    Returns:
      :class:`FitResult`.

    Raises:
      ValueError: bad ``epochs``/``batch_size``.
      CheckpointError: the checkpoint to resume from is unusable or from another run/model.
      FloatingPointError: the loss became NaN or inf; the message names the step.
    """
    from tqdm.auto import tqdm

    if isinstance(epochs, bool) or not isinstance(epochs, int | np.integer) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size > len(x):
        raise ValueError(f"batch_size ({batch_size}) is larger than the split ({len(x)} examples)")
    mesh = data_mesh() if mesh is None else mesh
    ndev = mesh.devices.size
    if batch_size % ndev:
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of the number of devices ({ndev})"
        )
    repl = NamedSharding(mesh, PartitionSpec())
    data_sh = NamedSharding(mesh, PartitionSpec("data"))

    params = jax.tree_util.tree_map(jnp.asarray, params)
    opt_state = tx.init(params)
    history: list[dict[str, float]] = []
    start_epoch = 0
    config = {"seed": int(seed), "batch_size": int(batch_size)}
    config.update(run_config or {})
    config = json.loads(json.dumps(config))
    meta_base = {**_model_meta(model, params), "config": config}
    if checkpoint is not None and resume and Path(checkpoint).exists():
        tree, meta = restore_checkpoint(checkpoint, {"params": params, "opt_state": opt_state})
        if meta.get("config") != config:
            raise CheckpointError(
                f"checkpoint {checkpoint} was written with other settings "
                f"({meta.get('config')}) than this run ({config}); "
                "start afresh (no resume) or use another output directory"
            )
        params, opt_state = tree["params"], tree["opt_state"]
        history = list(meta.get("history", []))
        start_epoch = int(meta["epoch"])
        if start_epoch > epochs:
            raise CheckpointError(
                f"checkpoint {checkpoint} is at epoch {start_epoch}, beyond epochs={epochs}"
            )

    steps_per_epoch = num_batches(len(x), batch_size)
    step_fn = make_train_step(model, tx, mesh)
    # host copies: the step donates its params/state buffers, the caller's arrays must survive
    params = jax.device_put(jax.tree_util.tree_map(np.array, jax.device_get(params)), repl)
    opt_state = jax.device_put(jax.tree_util.tree_map(np.array, jax.device_get(opt_state)), repl)
    key = jax.device_put(jax.random.key(seed), repl)

    for epoch in range(start_epoch, epochs):
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"{desc} {epoch + 1}/{epochs}",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        meter = _EpochMeter(bar, desc, epoch, epoch * steps_per_epoch)
        t = epoch * steps_per_epoch
        aug_rng = np.random.default_rng([int(seed), epoch, 1])
        for xb, yb in batches(x, y, batch_size, seed=seed, epoch=epoch):
            if augment is not None:
                xb = augment(xb, aug_rng)
            xb = jax.device_put(xb, data_sh)
            yb = jax.device_put(yb, data_sh)
            params, opt_state, metrics = step_fn(params, opt_state, xb, yb, key, t)
            meter.pending.append(metrics)
            t += 1
            if len(meter.pending) >= log_every:
                meter.flush(t)
        meter.flush(t)
        bar.close()
        record = {"epoch": epoch + 1, **meter.summary()}
        if eval_data is not None:
            ev = evaluate(model, params, *eval_data)
            record.update(
                test_loss=ev["loss"], test_accuracy=ev["accuracy"], test_error=ev["error"]
            )
        history.append(record)
        if checkpoint is not None:
            save_checkpoint(
                checkpoint,
                {"params": params, "opt_state": opt_state},
                {**meta_base, "epoch": epoch + 1, "history": history},
            )
    return FitResult(jax.device_get(params), jax.device_get(opt_state), history)


# ----------------------------------------------------------------------------- drivers


@dataclass
class RoundResult:
    """One pruning round: the target, the masks, the retrained params and their test metrics."""

    round: int
    sparsity: Any
    masks: PyTree
    params: PyTree
    density: float
    test_error: float | None
    history: list[dict[str, float]]


MaskFn = Callable[[PyTree, Any], PyTree]


def _default_mask_fn(params: PyTree, sparsity: Any) -> PyTree:
    return magnitude_masks(params, sparsity)


def iterative_pruning(
    model: Any,
    params: PyTree,
    x: np.ndarray,
    y: np.ndarray,
    *,
    sparsities: Sequence[Any],
    optimizer: Callable[[int], optax.GradientTransformation],
    epochs_per_round: int,
    batch_size: int,
    mask_fn: MaskFn = _default_mask_fn,
    seed: int = 0,
    eval_data: tuple[np.ndarray, np.ndarray] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    run_config: dict | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
    retrain_model: Callable[[float], Any] | None = None,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> list[RoundResult]:
    """Iterative prune-retrain (Han et al. 2015; lottery-ticket rounds, Frankle & Carbin 2019).

    Round ``r`` builds ``mask_fn(params, sparsities[r])``, intersects it with the previous masks
    (a pruned weight never comes back), zeroes the pruned weights and retrains for
    ``epochs_per_round`` epochs with ``masked(optimizer(steps), masks)``.

    Args:
      model, params, x, y: as in :func:`fit`.
      sparsities: one target per round, a number or a per-leaf map (e.g. from
        :func:`prunejax.schedules.iterative_sparsity`).
      optimizer: ``total_steps -> GradientTransformation`` for one round's retraining (Han
        retrains at a lower learning rate than the dense training).
      epochs_per_round: retraining epochs per round.
      batch_size, seed, eval_data, progress, mesh: as in :func:`fit`.
      mask_fn: ``(params, sparsity) -> masks``; default per-layer :func:`magnitude_masks`.
      checkpoint_dir: where each round's checkpoint ``round{r}.ckpt`` goes.
      resume: resume rounds from their checkpoints.
      run_config: settings stored in the checkpoints (see :func:`fit`).
      on_round: called with each :class:`RoundResult` as soon as the round is done.
      retrain_model: ``kept_fraction -> module`` giving the module to retrain a round with
        (same params layout), e.g. Han et al.'s smaller dropout for a sparser network,
        ``D_r = D_o * sqrt(kept_fraction)``; default ``model``.
      augment: batch augmentation, see :func:`fit`.

    Returns:
      One :class:`RoundResult` per round.
    """
    if not sparsities:
        raise ValueError("sparsities is empty: give at least one round")
    steps = num_batches(len(x), batch_size) * int(epochs_per_round)
    masks = None
    results = []
    for r, s in enumerate(sparsities, start=1):
        new = mask_fn(params, s)
        masks = new if masks is None else combine(masks, new)
        masks = jax.tree_util.tree_map(np.asarray, masks)
        params = apply_masks(params, masks)
        tx = masked(optimizer(max(steps, 1)), masks)
        kept = float(kernel_density(params))
        round_model = model if retrain_model is None else retrain_model(kept)
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / f"round{r}.ckpt"
        res = fit(
            round_model,
            params,
            x,
            y,
            tx=tx,
            epochs=epochs_per_round,
            batch_size=batch_size,
            seed=seed + r,
            eval_data=None,
            checkpoint=ckpt,
            resume=resume,
            run_config={**(run_config or {}), "round": r, "sparsity": _jsonable(s)},
            progress=progress,
            desc=f"round {r}/{len(sparsities)}",
            mesh=mesh,
            augment=augment,
        )
        params = res.params
        err = None if eval_data is None else evaluate(model, params, *eval_data)["error"]
        out = RoundResult(
            round=r,
            sparsity=s,
            masks=masks,
            params=params,
            density=float(kernel_density(params)),
            test_error=err,
            history=res.history,
        )
        results.append(out)
        if on_round is not None:
            on_round(out)
    return results


def gradual_pruning(
    model: Any,
    params: PyTree,
    x: np.ndarray,
    y: np.ndarray,
    *,
    sparsity: Any,
    optimizer: Callable[[int], optax.GradientTransformation],
    epochs: int,
    batch_size: int,
    prune_fraction: float = 0.75,
    update_every: int = 100,
    power: float = 3.0,
    scope_fn: Callable[[PyTree, Any], PyTree] | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    run_config: dict | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> tuple[PyTree, PyTree, FitResult]:
    """Gradual pruning during training (Zhu & Gupta 2017) with :func:`prunejax.optim.pruning`.

    The masks are rebuilt every ``update_every`` steps over the first ``prune_fraction`` of the
    training, following ``polynomial_sparsity`` from 0 to the target; the remaining steps train
    with the final masks.

    Args:
      model, params, x, y, optimizer, batch_size, seed, checkpoint, resume, run_config,
        progress, mesh: as in :func:`fit` / :func:`iterative_pruning`.
      sparsity: final sparsity, a number or a per-leaf map ``{"Dense_0/kernel": 0.92, ...}``;
        every leaf follows the same polynomial curve scaled to its own target.
      epochs: training epochs in all.
      prune_fraction: fraction of the steps over which sparsity rises (in ``(0, 1]``).
      update_every: steps between mask updates.
      power: exponent of the polynomial schedule.
      scope_fn: ``(params, sparsity) -> masks``; default per-layer :func:`magnitude_masks`.
      augment: batch augmentation, see :func:`fit`.

    Returns:
      ``(params, masks, fit_result)``.
    """
    if not 0.0 < float(prune_fraction) <= 1.0:
        raise ValueError(f"prune_fraction must be in (0, 1], got {prune_fraction!r}")
    builder = _default_mask_fn if scope_fn is None else scope_fn
    total = num_batches(len(x), batch_size) * int(epochs)
    end = max(1, int(round(total * float(prune_fraction))) - 1)
    progress_of = polynomial_sparsity(0.0, 1.0, begin_step=0, end_step=end, power=power)

    def mask_fn(p: PyTree, f: jax.Array) -> PyTree:
        return builder(p, _scale(sparsity, f))

    tx = pruning(
        optimizer(max(total, 1)),
        mask_fn,
        progress_of,
        begin_step=0,
        end_step=end,
        update_every=update_every,
    )
    res = fit(
        model,
        params,
        x,
        y,
        tx=tx,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        checkpoint=checkpoint,
        resume=resume,
        run_config={
            **(run_config or {}),
            "gradual_sparsity": _jsonable(sparsity),
            "update_every": update_every,
            "prune_fraction": prune_fraction,
        },
        progress=progress,
        desc="gradual pruning",
        mesh=mesh,
        augment=augment,
    )
    masks = jax.tree_util.tree_map(np.asarray, current_masks(res.opt_state))
    return res.params, masks, res


def _scale(sparsity: Any, f: Any) -> Any:
    if isinstance(sparsity, dict):
        return {k: _scale(v, f) for k, v in sparsity.items()}
    if isinstance(sparsity, list | tuple):
        return type(sparsity)(None if v is None else _scale(v, f) for v in sparsity)
    return f * sparsity


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if v is None:
        return None
    return float(v)
