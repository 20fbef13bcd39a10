"""Keras 3 adapter: prune a Keras model, fine-tune it with masks held, compact it, save it.

A Keras model's ``get_weights()`` list ``[W1, b1, W2, b2, ...]`` is already a prunejax params
pytree, so every mask builder accepts it.  This module makes the Keras side first-class:

* :func:`magnitude_masks` / :func:`unit_masks`: masks for a model (lists of boolean arrays, one per
  ``model.weights`` entry).  :func:`unit_masks` prunes the hidden ``Dense`` layers only by default
  (the output layer's units are the model's outputs) and pairs each bias with its own kernel by
  layer, not by list position.
* :func:`apply_masks`: write the masked weights into the model.
* :func:`hold_masks`: keep pruned weights exactly zero through ``model.fit``.  It attaches a
  :class:`MaskConstraint` to each pruned variable; Keras applies variable constraints after every
  optimizer step, so whatever Adam's moments, momentum or weight decay propose, a pruned weight is
  zero again before the next step reads it.  The returned :class:`MaskHold` is also a callback
  that re-applies the masks when training ends (an optimizer with ``use_ema=True`` overwrites the
  weights with their moving averages after the last step) and a context manager that releases
  the constraints on exit.  The constraints live on the variables only, not in the layer configs,
  so a saved ``.keras`` file needs nothing from prunejax to load.
* :func:`compact_model`: a NEW, narrower ``keras.Sequential`` (or Functional model, for a
  Functional input) with the dead hidden units removed (``prunejax.compact.compact`` layer by
  layer, bias folding included), same layer configs and activations, predictions equal to the
  masked model's.
* :func:`save_model`: an atomic ``.keras`` file for inference (architecture and weights, no
  optimizer state), which loads without prunejax.

Models :func:`compact_model` accepts: a ``keras.Sequential``, or a Functional model
(``keras.Model(inputs, outputs)``) that is one chain of layers from its single input to its single
output (no layer consumes two tensors, no output feeds two layers, no layer is called twice), whose
only weighted layers are ``Dense``.  Layers, in call order:

* ``Dense``: hidden ones are narrowed; the last ``Dense`` keeps its units.  Its activation must be
  elementwise (``relu``, ``tanh``, ``gelu``, ``sigmoid``, ... — not ``softmax``) unless it is the
  last ``Dense``.
* anywhere: ``InputLayer``, ``Dropout``, ``GaussianDropout``, ``GaussianNoise`` (identities at
  inference, unit-wise in training);
* between ``Dense`` layers: ``Activation`` with an elementwise activation, ``ReLU``,
  ``LeakyReLU``, ``ELU`` (folded into that layer's activation for bias folding);
* before the first ``Dense``: ``Flatten``, ``Reshape``, ``Rescaling`` (they touch only the inputs,
  which are never removed);
* after the last ``Dense``: any layer without weights (``Softmax``, ``Activation("softmax")``, ...):
  the outputs are never removed.

Anything else (``BatchNormalization``, ``Conv2D``, ``LayerNormalization``, ``Embedding``, a LoRA or
quantized ``Dense``, ``Flatten`` between ``Dense`` layers, ``Softmax`` between hidden layers, a
``keras.ops`` call between ``Dense`` layers of a Functional graph (use
``keras.layers.Activation``), a branch or merge (``Add``, ``Concatenate``, a ``Dense`` output read
by two layers), a subclassed model) raises ``ValueError``/``TypeError`` naming the layer:
compacting through such a layer would silently build a wrong model.

Requires Keras 3 (``pip install prunejax[keras]``); works with any Keras backend.  Measuring
models side by side (accuracy, file bytes, jitted latency) is the business of
``examples/keras_report.py``, which ``examples/keras_mnist.py`` uses.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from prunejax import masks as masks_lib
from prunejax._util import Where, atomic_path
from prunejax.compact import Compacted, compact

__all__ = [
    "ALLOWED_LAYERS",
    "MaskConstraint",
    "MaskHold",
    "apply_masks",
    "compact_model",
    "compact_weights",
    "dense_layers",
    "hidden_dense_where",
    "hold_masks",
    "magnitude_masks",
    "release_masks",
    "save_model",
    "unit_masks",
]

Masks = list[np.ndarray]

# ----------------------------------------------------------------------------- layer rules

_PASSTHROUGH = ("InputLayer", "Dropout", "GaussianDropout", "GaussianNoise")
_ACTIVATION_LAYERS = ("Activation", "ReLU", "LeakyReLU", "ELU")
_INPUT_SIDE = ("Flatten", "Reshape", "Rescaling")
#: Layer class names :func:`compact_model` accepts, by where they may sit.
ALLOWED_LAYERS: dict[str, tuple[str, ...]] = {
    "compacted": ("Dense",),
    "anywhere": _PASSTHROUGH,
    "between Dense layers": _ACTIVATION_LAYERS,
    "before the first Dense": _INPUT_SIDE,
    "after the last Dense": ("any layer without weights",),
}
_ELEMENTWISE = frozenset(
    """linear relu relu6 leaky_relu elu selu celu gelu silu swish hard_silu hard_swish mish
    sigmoid hard_sigmoid log_sigmoid tanh hard_tanh tanh_shrink soft_shrink hard_shrink softplus
    softsign sparse_plus squareplus exponential""".split()
)


def _activation_name(fn: Any) -> str | None:
    """The Keras name of a built-in activation function, or None for a custom callable."""
    name = getattr(fn, "__name__", None)
    if name is None:
        return None
    try:
        builtin = keras.activations.get(name)
    except (ValueError, TypeError):
        return None
    return name if builtin is fn else None


def _check_elementwise(fn: Any, where: str) -> None:
    name = _activation_name(fn)
    if name not in _ELEMENTWISE:
        shown = name or getattr(fn, "__name__", type(fn).__name__)
        raise ValueError(
            f"{where} uses activation {shown!r}, which is not a known elementwise activation; "
            "compaction removes hidden units one by one, so it needs an elementwise activation "
            f"between Dense layers (known: {', '.join(sorted(_ELEMENTWISE))})"
        )


def _cls(layer: Any) -> str:
    """The layer's Keras class name; a subclass (which may override ``call``) gets its own name."""
    cls = type(layer)
    if getattr(keras.layers, cls.__name__, None) is cls:
        return cls.__name__
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class _Plan:
    """A validated MLP: its layers in call order (with the keyword arguments each is called with
    in a Functional graph), its Dense layers and each hidden layer's activation chain."""

    dense: list[Any]
    activations: list[Callable[[Any], Any]]  # one per hidden Dense layer
    layers: list[Any]
    call_kwargs: list[dict[str, Any]]


def _require_keras_model(model: Any) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}")
    if not model.built or not model.weights:
        raise ValueError(
            f"model {model.name!r} has no weights yet; build it (keras.Input(...) as its first "
            "layer, or model.build(input_shape)) before pruning"
        )


def _is_functional(model: Any) -> bool:
    """A model built by ``keras.Model(inputs, outputs)`` (not a subclass, whose ``call`` may do
    anything)."""
    cls = type(model)
    return cls.__name__ == "Functional" and cls.__module__.startswith("keras.")


def _node_name(node: Any) -> str:
    op = node.operation
    return f"{'layer' if isinstance(op, keras.layers.Layer) else 'op'} {op.name!r} ({_cls(op)})"


def _functional_chain(model: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    """The layers of a Functional model that is one chain from its input to its output, in call
    order, with the non-tensor keyword arguments of each call.

    Raises:
      ValueError: several inputs or outputs, a layer called twice or on several tensors, or a
        tensor consumed by several layers (the message names them).
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(
            f"compact_model handles chains from one input to one output; model {model.name!r} "
            f"has {len(model.inputs)} inputs and {len(model.outputs)} outputs"
        )
    nodes = [n for depth in sorted(model._nodes_by_depth, reverse=True)
             for n in model._nodes_by_depth[depth]]  # fmt: skip
    consumers: dict[int, list[Any]] = {}
    for node in nodes:
        for t in node.input_tensors:
            consumers.setdefault(id(t), []).append(node)
    for node in nodes:
        for t in node.outputs:
            users = consumers.get(id(t), [])
            if len(users) > 1:
                raise ValueError(
                    f"the output of {_node_name(node)} is consumed by {len(users)} layers "
                    f"({', '.join(_node_name(u) for u in users)}); compact_model handles chains "
                    "of layers, where each output feeds one layer"
                )
    for node in nodes:
        if len(node.input_tensors) > 1:
            raise ValueError(
                f"{_node_name(node)} takes {len(node.input_tensors)} tensors; compact_model "
                "handles chains of layers, where removing a Dense unit changes one layer after it"
            )
    ops = [n.operation for n in nodes]
    for op in ops:
        if ops.count(op) > 1:
            raise ValueError(
                f"layer {op.name!r} is called {ops.count(op)} times in model {model.name!r}; "
                "compact_model handles chains in which each layer is called once"
            )
    chain = [n for n in nodes if _cls(n.operation) != "InputLayer"]
    return [n.operation for n in chain], [dict(n.arguments.kwargs) for n in chain]


def _model_layers(model: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    """The layers of a Sequential, or the chain of a Functional model, in call order."""
    if isinstance(model, keras.Sequential):
        return list(model.layers), [{} for _ in model.layers]
    if _is_functional(model):
        return _functional_chain(model)
    raise TypeError(
        f"compact_model needs a keras.Sequential or a Functional model (keras.Model(inputs, "
        f"outputs)), got {type(model).__name__} {model.name!r}, whose call it cannot see; "
        "rebuild the MLP as a Sequential or a Functional chain of Dense layers"
    )


def _plan(model: Any) -> _Plan:
    """Validate ``model`` for compaction; see the module docstring for the rules."""
    _require_keras_model(model)
    layers, call_kwargs = _model_layers(model)
    dense_pos = [i for i, layer in enumerate(layers) if isinstance(layer, keras.layers.Dense)]
    if len(dense_pos) < 1:
        raise ValueError(f"model {model.name!r} has no Dense layer: nothing to compact")
    first, last = dense_pos[0], dense_pos[-1]
    for i, layer in enumerate(layers):
        cls = _cls(layer)
        what = f"layer {layer.name!r} ({cls}, position {i})"
        if isinstance(layer, keras.layers.Dense):
            if type(layer) is not keras.layers.Dense:
                raise ValueError(
                    f"{what} is a subclass of Dense; only keras.layers.Dense itself can be "
                    "rebuilt from its config with fewer units"
                )
            expected = 2 if layer.use_bias else 1
            if len(layer.weights) != expected:
                raise ValueError(
                    f"{what} holds {len(layer.weights)} weight(s) "
                    f"({', '.join(w.path for w in layer.weights)}); only plain Dense layers "
                    "(kernel and optional bias; no LoRA, no quantization) can be compacted"
                )
            if i != last:
                _check_elementwise(layer.activation, what)
            continue
        if getattr(layer, "weights", None):
            raise ValueError(
                f"{what} holds weights ({', '.join(w.path for w in layer.weights)}); compaction "
                "handles MLPs whose only weighted layers are Dense, because removing a unit "
                f"would have to change this layer too. Allowed layers: {ALLOWED_LAYERS}"
            )
        if cls in _PASSTHROUGH or i > last:
            continue
        if cls in _INPUT_SIDE and i < first:
            continue
        if cls in _ACTIVATION_LAYERS and first < i < last:
            if cls == "Activation":
                _check_elementwise(layer.activation, what)
            continue
        place = "before the first Dense" if i < first else "between Dense layers"
        raise ValueError(
            f"{what} is not allowed {place} for compaction: only {_PASSTHROUGH} anywhere, "
            f"{_ACTIVATION_LAYERS} (elementwise) between Dense layers, {_INPUT_SIDE} before the "
            "first Dense and weightless layers after the last Dense keep a unit-wise correspondence"
        )
    dense = [layers[i] for i in dense_pos]
    activations = []
    for a, b in zip(dense_pos[:-1], dense_pos[1:], strict=True):
        chain = [layers[a].activation] + [
            layer for layer in layers[a + 1 : b] if _cls(layer) in _ACTIVATION_LAYERS
        ]
        activations.append(_compose(chain))
    return _Plan(dense, activations, layers, call_kwargs)


def _compose(chain: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def activation(x: Any) -> Any:
        for fn in chain:
            x = fn(x)
        return keras.ops.convert_to_numpy(x)

    return activation


# ----------------------------------------------------------------------------- weights & masks


def _weight_index(model: Any) -> dict[int, int]:
    """``id(variable) -> position in model.weights / model.get_weights()``."""
    return {id(v): i for i, v in enumerate(model.weights)}


def dense_layers(model: Any) -> list[tuple[Any, int, int | None]]:
    """The ``Dense`` layers of a model with the positions of their weights in ``get_weights()``.

    Args:
      model: a built ``keras.Model``.

    Returns:
      ``(layer, kernel_index, bias_index_or_None)`` per ``Dense`` layer, in ``model.layers``
      order (nested models are searched depth-first).
    """
    _require_keras_model(model)
    index = _weight_index(model)
    out = []

    def walk(layers: Iterable[Any]) -> None:
        for layer in layers:
            if isinstance(layer, keras.layers.Dense) and layer.built:
                b = index[id(layer.bias)] if layer.use_bias else None
                out.append((layer, index[id(layer.kernel)], b))
            elif hasattr(layer, "layers"):
                walk(layer.layers)

    walk(model.layers)
    return out


def hidden_dense_where(model: Any) -> Where:
    """A ``where(path, leaf)`` predicate selecting the kernels of all ``Dense`` layers but the last.

    For ``model.get_weights()`` lists, leaf paths are the list positions (``"0"``, ``"2"``, ...).

    Args:
      model: a built ``keras.Model``.

    Returns:
      The predicate, for any prunejax mask builder.
    """
    hidden = {str(k) for _, k, _ in dense_layers(model)[:-1]}

    def where(path: str, leaf: Any) -> bool:
        del leaf
        return path in hidden

    return where


def magnitude_masks(
    model: Any, sparsity: Any, *, scope: str = "layer", where: Where | None = None
) -> Masks:
    """Magnitude masks (Han et al. 2015) for a Keras model's weights.

    Args:
      model: a built ``keras.Model``.
      sparsity: fraction pruned per selected weight (or globally), see
        :func:`prunejax.masks.magnitude_masks`.
      scope: ``"layer"`` or ``"global"``.
      where: ``(path, leaf) -> bool`` over ``get_weights()`` positions (default: every weight with
        ``ndim >= 2``, i.e. all kernels, the output layer's included).

    Returns:
      One boolean array per ``model.weights`` entry (True = kept).
    """
    _require_keras_model(model)
    return list(masks_lib.magnitude_masks(model.get_weights(), sparsity, scope=scope, where=where))


def _kernel_bias_pairs(model: Any) -> dict[int, int]:
    """``kernel position -> bias position`` in ``get_weights()`` for every layer with a kernel
    and a 1-D bias of its output width (``Dense``, ``Conv1D``/``2D``/``3D``, ...)."""
    index = _weight_index(model)
    pairs = {}

    def walk(layers: Iterable[Any]) -> None:
        for layer in layers:
            kernel, bias = getattr(layer, "kernel", None), getattr(layer, "bias", None)
            if (
                id(kernel) in index
                and id(bias) in index
                and tuple(bias.shape) == tuple(kernel.shape[-1:])
            ):
                pairs[index[id(kernel)]] = index[id(bias)]
            elif hasattr(layer, "layers"):
                walk(layer.layers)

    walk(model.layers)
    return pairs


def unit_masks(
    model: Any,
    sparsity: Any,
    *,
    ord: int | float = 2,
    where: Where | None = None,
    prune_output: bool = False,
) -> Masks:
    """Unit (neuron) masks (Molchanov et al. 2017; Li et al. 2017) for a Keras model.

    Prunes the ``round(sparsity * units)`` units of smallest ``ord``-norm of each selected
    kernel (``Dense`` columns; ``Conv`` filters, if ``where`` selects them) and the layer's own
    bias entries for them (paired by layer, so a ``BatchNormalization`` vector next to a
    bias-free kernel is never mistaken for its bias).

    Args:
      model: a built ``keras.Model``.
      sparsity: fraction of units pruned per selected kernel, or a per-position mapping.
      ord: norm order of the unit ranking.
      where: ``(path, leaf) -> bool`` over ``get_weights()`` positions (default:
        :func:`hidden_dense_where`, all ``Dense`` kernels but the output layer's; with
        ``prune_output=True``, all ``Dense`` kernels).  Given, it decides alone.
      prune_output: by default the last ``Dense`` layer keeps its units (the model's outputs).

    Returns:
      One boolean array per ``model.weights`` entry (True = kept).

    Raises:
      ValueError: ``where`` selects a 1-D weight, or a bad sparsity.
    """
    if where is None:
        if prune_output:
            every = {str(k) for _, k, _ in dense_layers(model)}
            where = lambda path, leaf: path in every  # noqa: E731
        else:
            where = hidden_dense_where(model)
    weights = model.get_weights()
    # where (which knows the layers) decides; the core's output-layer default would guess the
    # last layer from the flat list
    masks = list(masks_lib.unit_masks(weights, sparsity, ord=ord, where=where, prune_output=True))
    # Re-pair biases by layer (the list heuristic pairs a kernel with the next 1-D weight).
    for i, w in enumerate(weights):
        if w.ndim < 2:
            masks[i] = np.ones(w.shape, bool)
    for k, b in _kernel_bias_pairs(model).items():
        m = np.asarray(masks[k])
        masks[b] = m.all(axis=tuple(range(m.ndim - 1)))
    return [np.asarray(m) for m in masks]


def _check_masks(model: Any, masks: Sequence[Any]) -> list[np.ndarray]:
    _require_keras_model(model)
    if isinstance(masks, Mapping) or not isinstance(masks, Sequence):
        raise TypeError(
            f"masks must be a list with one boolean array per model.weights entry, got "
            f"{type(masks).__name__}"
        )
    weights = model.weights
    if len(masks) != len(weights):
        raise ValueError(
            f"masks has {len(masks)} entries but model {model.name!r} has {len(weights)} weights"
        )
    out = []
    for i, (m, v) in enumerate(zip(masks, weights, strict=True)):
        m = np.asarray(m)
        if m.dtype != np.bool_:
            raise TypeError(f"masks[{i}] (for {v.path!r}) has dtype {m.dtype}, expected bool")
        if m.shape != tuple(v.shape):
            raise ValueError(
                f"masks[{i}] has shape {m.shape} but weight {i} ({v.path!r}) has {tuple(v.shape)}"
            )
        out.append(m)
    return out


def apply_masks(model: Any, masks: Sequence[Any]) -> Any:
    """Zero the pruned weights of ``model`` in place.

    Args:
      model: a built ``keras.Model``.
      masks: one boolean array per ``model.weights`` entry (True = kept).

    Returns:
      ``model`` (for chaining).
    """
    masks = _check_masks(model, masks)
    model.set_weights(masks_lib.apply_masks(model.get_weights(), masks))
    return model


# ----------------------------------------------------------------------------- holding masks


@keras.saving.register_keras_serializable(package="prunejax")
class MaskConstraint(keras.constraints.Constraint):
    """A Keras constraint that zeroes pruned entries: ``where(mask, inner(w), 0)``.

    Keras applies a variable's constraint after every optimizer step, so a held weight is exactly
    zero whenever the next step (or inference) reads it, whatever the optimizer's state.

    Args:
      mask: boolean array of the variable's shape (True = kept).
      inner: an existing constraint to apply first (e.g. ``MaxNorm``), or None.
    """

    def __init__(self, mask: Any, inner: Any = None) -> None:
        self.mask = np.asarray(mask, dtype=bool)
        self.inner = inner

    def __call__(self, w: Any) -> Any:
        if self.inner is not None:
            w = self.inner(w)
        w = keras.ops.convert_to_tensor(w)
        return keras.ops.where(self.mask, w, keras.ops.zeros_like(w))

    def get_config(self) -> dict[str, Any]:
        return {
            "mask": self.mask.tolist(),
            "inner": None if self.inner is None else keras.constraints.serialize(self.inner),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MaskConstraint:
        inner = config.get("inner")
        return cls(
            np.asarray(config["mask"], bool),
            None if inner is None else keras.constraints.deserialize(inner),
        )


class MaskHold(keras.callbacks.Callback):
    """Masks held on a model's variables (returned by :func:`hold_masks`).

    Use it as a context manager (releases on exit) and, for optimizers with ``use_ema=True``,
    pass it to ``fit(callbacks=[...])`` too: it re-applies the masks when training ends.
    :func:`hold_masks` validates the masks, applies them and calls :meth:`attach`; a hold made
    directly starts released.

    Args:
      model: a built ``keras.Model``.
      masks: one boolean array per ``model.weights`` entry (True = kept), already validated.
    """

    def __init__(self, model: Any, masks: list[np.ndarray]) -> None:
        super().__init__()
        self._held = model
        self.masks = masks
        self._previous: dict[int, Any] = {}
        self.active = False

    def attach(self) -> None:
        """Put a :class:`MaskConstraint` on every variable with a pruned entry.

        Composes with a constraint already there (a :class:`MaskConstraint` found there is
        replaced, its inner constraint kept) and drops the compiled train step so the next ``fit``
        traces one that applies the constraints.  Does nothing while the hold is active.

        Raises:
          ValueError: a mask prunes a non-trainable weight (constraints do not apply to it).
        """
        if self.active:
            return
        for i, (v, m) in enumerate(zip(self._held.weights, self.masks, strict=True)):
            if m.all():
                continue
            if not v.trainable:
                raise ValueError(
                    f"masks[{i}] prunes the non-trainable weight {v.path!r}; optimizer "
                    "constraints do not apply to it, so its zeros could not be held"
                )
            previous = v.constraint
            self._previous[i] = previous
            inner = previous.inner if isinstance(previous, MaskConstraint) else previous
            v.constraint = MaskConstraint(m, inner)
        self.active = True
        _reset_compiled(self._held)

    def release(self) -> None:
        """Remove the constraints (restoring any earlier ones); the weights keep their zeros."""
        if not self.active:
            return
        weights = self._held.weights
        for i, previous in self._previous.items():
            weights[i].constraint = previous
        self._previous.clear()
        self.active = False
        _reset_compiled(self._held)

    def reapply(self) -> None:
        """Write the masked weights into the model again."""
        apply_masks(self._held, self.masks)

    def on_train_end(self, logs: Any = None) -> None:
        if self.active:
            self.reapply()

    def __enter__(self) -> MaskHold:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _reset_compiled(model: Any) -> None:
    """Drop compiled train steps: constraints are read when a step is traced."""
    if hasattr(model, "train_function"):
        model.train_function = None


def hold_masks(model: Any, masks: Sequence[Any]) -> MaskHold:
    """Apply ``masks`` to ``model`` now and keep the pruned weights exactly zero while training.

    Attaches a :class:`MaskConstraint` to every trainable variable with a pruned entry (composing
    with a constraint already there) and drops the model's compiled train step so the next
    ``fit`` traces one that applies the constraints.  With the masks held, each optimizer step is
    followed by ``w = where(mask, w, 0)``, so Adam's moments (or momentum, or decoupled weight
    decay) can move a pruned weight for no longer than inside the step itself: after every step,
    and after ``fit``, it is exactly 0.

    Args:
      model: a built ``keras.Model``.
      masks: one boolean array per ``model.weights`` entry (True = kept), e.g. from
        :func:`magnitude_masks` or :func:`unit_masks`.

    Returns:
      A :class:`MaskHold`: ``with hold_masks(model, masks) as hold: model.fit(...,
      callbacks=[hold])``; or call ``hold.release()`` / :func:`release_masks` later.

    Raises:
      ValueError: the masks do not match ``model.weights``, or prune a non-trainable weight.
      TypeError: a mask is not boolean.
    """
    masks = _check_masks(model, masks)
    hold = MaskHold(model, masks)
    hold.reapply()
    hold.attach()
    return hold


def release_masks(model: Any) -> None:
    """Remove every :class:`MaskConstraint` from ``model``'s variables (restoring inner ones)."""
    _require_keras_model(model)
    changed = False
    for v in model.weights:
        if isinstance(v.constraint, MaskConstraint):
            v.constraint = v.constraint.inner
            changed = True
    if changed:
        _reset_compiled(model)


# ----------------------------------------------------------------------------- compaction


def compact_weights(model: Any, masks: Sequence[Any] | None = None) -> Compacted:
    """Compacted ``get_weights()`` of a Sequential or Functional MLP (see :func:`compact_model`).

    Runs :func:`prunejax.compact.compact` on each pair of consecutive ``Dense`` layers with that
    hidden layer's own activation (so layers may use different elementwise activations), until no
    hidden unit is dead.

    Args:
      model: a built ``keras.Sequential`` or Functional chain following the layer rules of this
        module.
      masks: optional masks (one per ``model.weights`` entry) applied first.

    Returns:
      ``Compacted(params, kept)``: ``params`` lists the new weights of the ``Dense`` layers in
      order (``[W1, b1, W2, ...]``, biases only where the layer has one); ``kept[i]`` holds the
      original indices of the units of ``Dense`` layer ``i`` that survive.
    """
    plan = _plan(model)
    weights = model.get_weights()
    if masks is not None:
        weights = masks_lib.apply_masks(weights, _check_masks(model, masks))
    index = _weight_index(model)
    kernels = [np.asarray(weights[index[id(d.kernel)]]) for d in plan.dense]
    biases = [np.asarray(weights[index[id(d.bias)]]) if d.use_bias else None for d in plan.dense]
    kept = [np.arange(k.shape[1], dtype=np.int64) for k in kernels]
    changed = True
    while changed:
        changed = False
        for i, activation in enumerate(plan.activations):
            pair = {
                f"layer{j}": {"kernel": kernels[i + j]}
                | ({} if biases[i + j] is None else {"bias": biases[i + j]})
                for j in (0, 1)
            }
            try:
                small, local = compact(pair, activation=activation)
            except ValueError as e:  # name the Keras layers ("layer0"/"layer1" in the message)
                raise ValueError(
                    f"compacting Dense layer {plan.dense[i].name!r} (layer0) into "
                    f"{plan.dense[i + 1].name!r} (layer1): {e}"
                ) from e
            n_before = kernels[i].shape[1]
            kernels[i], kernels[i + 1] = small["layer0"]["kernel"], small["layer1"]["kernel"]
            for j in (0, 1):
                if biases[i + j] is not None:
                    biases[i + j] = small[f"layer{j}"]["bias"]
            kept[i] = kept[i][local[0]]
            changed |= kernels[i].shape[1] != n_before
    params: list[np.ndarray] = []
    for k, b in zip(kernels, biases, strict=True):
        params.append(k)
        if b is not None:
            params.append(b)
    return Compacted(params, kept)


def compact_model(model: Any, masks: Sequence[Any] | None = None) -> Any:
    """A NEW, narrower model with the dead hidden units physically removed.

    Every layer is rebuilt from its config (``Dense`` with fewer ``units``, everything else as
    is), so activations, initializers, regularizers, dtype policies and names carry over; the
    ``Dense`` layers get the compacted weights.  A ``keras.Sequential`` gives a
    ``keras.Sequential``; a Functional model (``keras.Model(inputs, outputs)``) that is one chain
    of layers from its input to its output gives a Functional model of the same chain, each layer
    called with the same non-tensor keyword arguments (``training=False``, ...).  The new model's
    outputs equal the masked model's (fp32 rounding of folded biases aside).  It is not compiled.

    Args:
      model: a built ``keras.Sequential`` or Functional MLP; allowed layers: see the module
        docstring.
      masks: optional masks (one per ``model.weights`` entry) applied first; without them, the
        zeros already in the weights decide which units are dead.

    Returns:
      The compacted model.

    Raises:
      TypeError: ``model`` is neither a ``keras.Sequential`` nor a Functional model (a
        subclassed model's ``call`` is not visible).
      ValueError: a layer that compaction cannot handle, a branch (a layer's output consumed by
        two layers, a layer taking two tensors, a layer called twice), several inputs or
        outputs (the message names the layer), or masks that do not match the model.
    """
    small, kept = compact_weights(model, masks)
    plan = _plan(model)
    units = {id(d): len(k) for d, k in zip(plan.dense, kept, strict=True)}
    inp = model.inputs[0] if getattr(model, "inputs", None) else None
    if inp is None:
        raise ValueError(f"model {model.name!r} has no known input shape; build it first")
    first = keras.Input(shape=tuple(inp.shape[1:]), dtype=inp.dtype)
    new_layers: list[Any] = []
    for layer in plan.layers:
        config = layer.get_config()
        if id(layer) in units:
            config["units"] = units[id(layer)]
        new_layers.append(type(layer).from_config(config))
    if isinstance(model, keras.Sequential):
        out = keras.Sequential([first, *new_layers], name=f"{model.name}_compact")
    else:
        x = first
        for layer, kwargs in zip(new_layers, plan.call_kwargs, strict=True):
            x = layer(x, **kwargs)
        out = keras.Model(first, x, name=f"{model.name}_compact")
    pos = 0
    for old, layer in zip(plan.layers, new_layers, strict=True):
        if id(old) in units:
            n = 2 if layer.use_bias else 1
            layer.set_weights(small[pos : pos + n])
            pos += n
    return out


# ----------------------------------------------------------------------------- saving


def save_model(model: Any, path: str | os.PathLike) -> int:
    """Save ``model`` as a ``.keras`` file for inference, atomically; return its size in bytes.

    The file holds the architecture and weights but no optimizer state (a compiled model's
    ``model.save`` would add Adam's two moments per weight, tripling the file), so files of
    trained and freshly built models compare fairly.

    Args:
      model: a built ``keras.Model``.
      path: destination ending in ``.keras``.

    Returns:
      The file size in bytes.
    """
    _require_keras_model(model)
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"path must end with .keras, got {str(path)!r}")
    clone = model
    if getattr(model, "optimizer", None) is not None:
        # keras.models.clone_model would copy the compile state; from_config does not
        clone = type(model).from_config(model.get_config())
        clone.set_weights(model.get_weights())
    with atomic_path(path, suffix=".keras") as tmp:  # Keras insists on the extension
        clone.save(str(tmp))
    return path.stat().st_size
