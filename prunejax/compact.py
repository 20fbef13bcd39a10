"""Physical removal of dead units from a pruned MLP, with bias folding.

A hidden unit of a pruned multilayer perceptron is *dead* when it cannot influence the output
through its weights:

* **dead on output**: its outgoing row of the next kernel is all zero.  Whatever it computes is
  multiplied by zero, so it is removed outright.
* **dead on input**: its incoming column of its own kernel is all zero.  It then emits the
  constant ``activation(bias)`` (``activation(0)`` when the layer has no bias) for every input.
  That constant times the unit's outgoing row is added to the next layer's bias, after which the
  unit is removed.

Removing a unit can kill another (a unit whose only live consumers were removed becomes dead on
output; a unit whose only live inputs were removed becomes dead on input), so compaction runs to
its fixed point.  Dead-on-output removals only ever create further dead-on-output units (they
cascade towards the input) and dead-on-input removals only ever create further dead-on-input units
(they cascade towards the output), so one backward sweep followed by one forward sweep reaches
the fixed point: the result is the same as removing dead units one at a time in any order.

The input features and the output units of the network are never removed: the compacted network
takes the same inputs and returns the same outputs as the masked dense one.  This is the
"unit/neuron pruning" of Hu et al. 2016 ("Network Trimming: A Data-Driven Neuron Pruning
Approach") and of the structured-pruning literature made physical: the smaller dense matrices run
with ordinary dense kernels.  At batch 1 on CPU, ``prunejax.sparse.sparsify(compacted,
"auto", batch_size=b)`` runs them faster still (the ``"dense_t"`` row-dot layout; see
``benchmarks/results/RESULTS.md``, rows ``compact`` and ``compact.auto``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prunejax._util import (
    DenseLayer,
    PyTree,
    check_same_structure,
    dense_layers,
    flatten,
    is_jax,
    is_matrix_object,
    is_traced,
    unwrap,
)

__all__ = ["Compacted", "compact", "compaction_plan"]


class Compacted(NamedTuple):
    """The result of ``compact``.

    Attributes:
      params: parameters of the same kind and tree structure as the input (a Flax dict stays a
        Flax dict, a Keras list stays a list), with smaller kernel and bias shapes.
      kept: one sorted ``np.ndarray`` of ``int64`` per dense layer, in forward order: the indices,
        in the ORIGINAL network, of the output units of that layer that survive.  The last entry
        is always ``arange(n_outputs)``: output units are never removed.
    """

    params: PyTree
    kept: list[np.ndarray]


class _Mlp(NamedTuple):
    paths: list[str]
    leaves: list[Any]
    treedef: Any
    layers: list[DenseLayer]


def _mlp(params: PyTree, masks: PyTree | None, *, what: str = "compact") -> _Mlp:
    """Validate that ``params`` is a plain MLP chain; return its leaves (masks applied)."""
    if masks is not None:
        paths, leaves, mleaves, treedef = check_same_structure(params, masks)
    else:
        paths, leaves, treedef = flatten(params)
        mleaves = [None] * len(leaves)
    for p, leaf in zip(paths, leaves, strict=True):
        if is_traced(leaf):
            raise TypeError(
                f"{what}: leaf {p!r} is traced; compaction changes shapes from the values of "
                "the weights, so it cannot run under jax.jit/vmap; call it on concrete arrays"
            )
        if is_matrix_object(leaf):
            raise TypeError(
                f"{what}: leaf {p!r} is a sparse kernel object ({type(leaf).__name__}); "
                "compaction works on dense arrays (call .todense() first)"
            )
    layers = dense_layers(params)
    if not layers:
        raise ValueError(f"{what}: params hold no 2-D kernel, so they are not an MLP")
    for layer in layers:
        if layer.kind == "unnamed":
            p = paths[layer.kernel]
            raise ValueError(
                f"{what}: params are not an MLP chain: 2-D leaf {p!r} (shape "
                f"{tuple(np.shape(leaves[layer.kernel]))}) is not a dense-layer kernel: it is "
                "neither named like one (kernel, weight, w, W, w1, ...) nor an element of a "
                "[W, b, ...] list, so it may be an embedding table or "
                "another matrix whose rows compaction must not delete. Compact the dense layers "
                "on their own (a sub-tree holding only them), or rename the kernel"
            )
    owned = {layer.kernel for layer in layers} | {
        layer.bias for layer in layers if layer.bias is not None
    }
    for i, p in enumerate(paths):
        if i not in owned:
            raise ValueError(
                f"{what}: leaf {p!r} (shape {tuple(np.shape(leaves[i]))}) is neither the kernel "
                "nor the bias of a dense layer; compaction handles plain MLPs "
                "(a chain of dense layers with one elementwise activation between them)"
            )
    for a, b in zip(layers[:-1], layers[1:], strict=True):
        out_a = np.shape(leaves[a.kernel])[1]
        in_b = np.shape(leaves[b.kernel])[0]
        if out_a != in_b:
            raise ValueError(
                f"{what}: params are not an MLP chain: layer {a.name!r} has {out_a} outputs "
                f"(kernel {paths[a.kernel]!r}, shape {tuple(np.shape(leaves[a.kernel]))}) but the "
                f"next layer {b.name!r} takes {in_b} inputs (kernel {paths[b.kernel]!r}, shape "
                f"{tuple(np.shape(leaves[b.kernel]))})"
            )
    for layer in layers:
        if layer.bias is not None:
            nb, nout = np.shape(leaves[layer.bias])[0], np.shape(leaves[layer.kernel])[1]
            if nb != nout:
                raise ValueError(
                    f"{what}: bias {paths[layer.bias]!r} has {nb} entries but kernel "
                    f"{paths[layer.kernel]!r} has {nout} outputs"
                )
    np_leaves = []
    for p, leaf, m in zip(paths, leaves, mleaves, strict=True):
        arr = np.asarray(leaf)
        if arr.dtype.kind not in "fiu" and arr.dtype != jnp.bfloat16:
            raise TypeError(
                f"{what}: leaf {p!r} has dtype {arr.dtype}, expected a real number type"
            )
        finite = np.isfinite(arr.astype(np.float64))
        if not finite.all():
            bad = int(arr.size - finite.sum())
            raise ValueError(
                f"{what}: leaf {p!r} has {bad} non-finite value(s) (NaN or inf); "
                "dead units cannot be told from live ones"
            )
        if m is not None:
            arr = np.where(np.asarray(m), arr, np.zeros((), arr.dtype))
        np_leaves.append(arr)
    return _Mlp(paths, np_leaves, treedef, layers)


def _plan(kernels: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The dead-on-output (backward) sweep over a chain of kernels.

    Returns:
      ``(alive, nz)``: ``alive[i]`` is the bool vector of output units of layer ``i`` that are
      not dead on output (all True for the last layer); ``nz[i]`` is kernel ``i``'s nonzero
      pattern.
    """
    nz = [k != 0 for k in kernels]
    n_hidden = len(kernels) - 1
    alive = [np.ones(k.shape[1], bool) for k in kernels]
    # backward sweep: dead on output (outgoing row zero over the next layer's live columns)
    for b in range(n_hidden - 1, -1, -1):
        nxt = nz[b + 1][:, alive[b + 1]] if b + 1 < n_hidden else nz[b + 1]
        alive[b] = nxt.any(axis=1)
    return alive, nz


def _container(params: PyTree, masks: PyTree | None, layout: str | None) -> tuple | None:
    """``(Unwrapped, masks tree)`` when ``params`` is a container to unwrap (an ``nnx.State``,
    an Equinox module, ``(out, in)`` kernels), ``None`` for a plain ``(in, out)`` tree."""
    u = unwrap(params, layout=layout)
    if u.kind == "tree" and not u.out_in:
        return None
    return u, None if masks is None else unwrap(masks, layout=layout).tree


def compaction_plan(
    params: PyTree, *, masks: PyTree | None = None, layout: str | None = None
) -> list[np.ndarray]:
    """The units ``compact`` keeps, without computing the compacted weights.

    Which units die depends only on where the kernels are zero, never on the activation (the
    activation decides the values folded into the next biases), so this needs no ``activation``.
    It does not check whether folding is possible (see ``compact``).

    Args:
      params: an MLP params pytree, ``nnx.State`` or Equinox module (see ``compact``).
      masks: optional bool pytree of ``params``' structure (True = kept), applied first.
      layout: the kernels' layout, as in ``compact``.

    Returns:
      One sorted ``int64`` index array per dense layer, as ``Compacted.kept``.
    """
    if (inner := _container(params, masks, layout)) is not None:
        return compaction_plan(inner[0].tree, masks=inner[1])
    mlp = _mlp(params, masks, what="compaction_plan")
    kernels = [mlp.leaves[layer.kernel] for layer in mlp.layers]
    alive, nz = _plan(kernels)
    # forward sweep: dead on input (incoming column zero over the previous layer's live rows)
    live_in = np.ones(kernels[0].shape[0], bool)
    for b in range(len(kernels) - 1):
        alive[b] = alive[b] & nz[b][live_in].any(axis=0)
        live_in = alive[b]
    return [np.flatnonzero(a).astype(np.int64) for a in alive]


def compact(
    params: PyTree,
    *,
    activation: Callable[[Any], Any] = jax.nn.relu,
    masks: PyTree | None = None,
    layout: str | None = None,
) -> Compacted:
    """Physically remove the dead hidden units of a pruned MLP.

    The network is ``h = activation(h @ W_i + b_i)`` between layers and ``h @ W_L + b_L`` at the
    end (``prunejax.models.mlp_apply``).  A hidden unit whose outgoing weights are all zero is
    removed; a hidden unit whose incoming weights are all zero emits ``activation(b)`` whatever the
    input, so ``activation(b) * W_next[unit, :]`` is first added to the next layer's bias.  This
    repeats until nothing more can be removed.  The compacted network's outputs equal the masked
    dense network's for every input (up to float rounding of the folded biases).

    Folding is impossible, and ``ValueError`` is raised, when a dead-on-input unit emits a nonzero
    constant (``activation(b) != 0``, e.g. ``softplus``/``sigmoid``, or a bias with ``relu``) into
    live outgoing weights and the next layer has no bias to absorb it.  Then the unit is not dead:
    it feeds a constant.  With ``activation(0) == 0`` (relu, tanh, gelu) and no biases, nothing
    ever needs folding.

    Args:
      params: an MLP: Flax-style ``{"Dense_0": {"kernel", "bias"}, ...}``, a Keras-style list
        ``[W1, b1, W2, b2, ...]`` or any pytree ``prunejax._util.dense_layers`` understands,
        with dense ``(in, out)`` kernels, biases optional per layer, or such an MLP as an
        ``nnx.State`` or Equinox module (``prunejax._util.unwrap``; returned as one, Equinox
        ``Linear`` widths updated).  Every leaf must belong to a dense layer and consecutive
        layers must chain (``out_i == in_{i+1}``).  Kernels are recognised by name
        (``kernel``/``weight``/``w``/``W``/``w1``/..., see ``DenseLayer.kind``) or by
        position in a list/tuple; any other 2-D leaf (a dict entry such as ``"embed"``) is
        refused, since an embedding table that happens to chain with a dense layer would
        otherwise lose rows.  Pruned weights are exact zeros (or pass ``masks``).
      activation: the elementwise nonlinearity between layers (the same one the model uses).
        It must be a JAX-traceable function; it is evaluated on the biases of dead-on-input units.
      masks: optional bool pytree of ``params``' structure (True = kept), applied first.
      layout: ``None`` detects Equinox ``Linear`` weights as ``(out, in)``; ``"out_in"``: every
        2-D leaf is (PyTorch-style); ``"in_out"``: none is.

    Returns:
      ``Compacted(params, kept)`` (a ``NamedTuple``, so ``small, kept = compact(...)`` works):
      ``params`` of the same tree structure and array kind (NumPy in gives NumPy out, JAX in
      gives JAX out; dtypes preserved) with smaller shapes, and ``kept``, one sorted ``int64``
      array per layer of the original output-unit indices that survive.

    Raises:
      ValueError: params are not an MLP chain (a leaf outside any dense layer, a 2-D leaf not
        recognised as a kernel, mismatched shapes between consecutive layers, a bias of the
        wrong length), a weight is NaN/inf, or a nonzero constant cannot be folded.
      TypeError: a leaf is traced (compaction is shape-changing, so it cannot be jitted), a
        sparse kernel object, or not a real-valued array; ``activation`` is not callable.
    """
    if not callable(activation):
        raise TypeError(f"activation must be callable, got {type(activation).__name__}")
    if (inner := _container(params, masks, layout)) is not None:
        small = compact(inner[0].tree, activation=activation, masks=inner[1])
        return Compacted(inner[0].rewrap(small.params), small.kept)
    mlp = _mlp(params, masks)
    layers = mlp.layers
    kernels = [mlp.leaves[layer.kernel] for layer in layers]
    biases64 = [
        None if layer.bias is None else mlp.leaves[layer.bias].astype(np.float64)
        for layer in layers
    ]
    bias_dtypes = [None if layer.bias is None else mlp.leaves[layer.bias].dtype for layer in layers]
    alive, _ = _plan(kernels)

    # Current (partially compacted) kernels: rows = live inputs, columns = live outputs.
    n = len(kernels)
    live_rows = [np.arange(kernels[0].shape[0])] + [np.flatnonzero(a) for a in alive[:-1]]
    live_cols = [np.flatnonzero(a) for a in alive]
    cur = [kernels[i][np.ix_(live_rows[i], live_cols[i])] for i in range(n)]
    bias_cur = [None if b is None else b[live_cols[i]] for i, b in enumerate(biases64)]

    # forward sweep: dead on input, with folding into the next bias (uses the current biases,
    # which already hold the constants folded in from the previous boundary)
    for b in range(n - 1):
        dtype = bias_dtypes[b] if bias_dtypes[b] is not None else kernels[b].dtype
        _remove_dead_inputs(b, cur, bias_cur, live_cols, dtype, activation, layers)
    return _rebuild(params, mlp, cur, bias_cur, bias_dtypes, live_cols)


def _dead_unit_constants(
    pre: np.ndarray, dtype: Any, activation: Callable[[Any], Any], layer_name: str
) -> np.ndarray:
    """``activation(pre)`` in float64: what dead-on-input units with biases ``pre`` emit."""
    const = np.asarray(activation(jnp.asarray(pre.astype(dtype))), np.float64)
    if const.shape != pre.shape:
        raise ValueError(
            f"activation must be elementwise: it mapped shape {pre.shape} to {const.shape}"
        )
    if not np.isfinite(const).all():
        raise ValueError(
            f"activation of the biases of dead-on-input units of layer {layer_name!r} "
            "is not finite; the constant cannot be folded"
        )
    return const


def _remove_dead_inputs(
    b: int,
    cur: list[np.ndarray],
    bias_cur: list[np.ndarray | None],
    live_cols: list[np.ndarray],
    dtype: Any,
    activation: Callable[[Any], Any],
    layers: list[DenseLayer],
) -> None:
    """Remove the dead-on-input units of layer ``b``, folding their constant outputs into the
    bias of layer ``b + 1``; updates ``cur``, ``bias_cur`` and ``live_cols`` in place."""
    dead = ~(cur[b] != 0).any(axis=0)
    if not dead.any():
        return
    pre = np.zeros(int(dead.sum()), np.float64) if bias_cur[b] is None else bias_cur[b][dead]
    const = _dead_unit_constants(pre, dtype, activation, layers[b].name)
    contrib = const @ cur[b + 1][dead].astype(np.float64)
    if bias_cur[b + 1] is not None:
        bias_cur[b + 1] = bias_cur[b + 1] + contrib
    elif np.any(contrib != 0):
        orig = live_cols[b][dead]
        bad = orig[(const != 0) & (cur[b + 1][dead] != 0).any(axis=1)]
        raise ValueError(
            f"compact: unit(s) {bad[:8].tolist()}{' ...' if bad.size > 8 else ''} of layer "
            f"{layers[b].name!r} have no incoming weights but emit the nonzero constant "
            f"activation(bias) (e.g. {float(const[const != 0][0]):.6g}) into live weights of "
            f"layer {layers[b + 1].name!r}, which has no bias to fold it into; such a unit "
            "is not dead. Give the next layer a bias (zeros) or keep the unit"
        )
    keep = ~dead
    cur[b] = cur[b][:, keep]
    if bias_cur[b] is not None:
        bias_cur[b] = bias_cur[b][keep]
    cur[b + 1] = cur[b + 1][keep]
    live_cols[b] = live_cols[b][keep]


def _rebuild(
    params: PyTree,
    mlp: _Mlp,
    cur: list[np.ndarray],
    bias_cur: list[np.ndarray | None],
    bias_dtypes: list[Any],
    live_cols: list[np.ndarray],
) -> Compacted:
    """The compacted params, in ``params``' tree structure and array kinds, and the kept units."""
    new_leaves = list(mlp.leaves)
    for i, layer in enumerate(mlp.layers):
        new_leaves[layer.kernel] = cur[i]
        if layer.bias is not None:
            new_leaves[layer.bias] = bias_cur[i].astype(bias_dtypes[i])
    orig_leaves = jax.tree_util.tree_leaves(params, is_leaf=is_matrix_object)
    out = [
        jnp.asarray(new) if is_jax(old) else np.asarray(new)
        for new, old in zip(new_leaves, orig_leaves, strict=True)
    ]
    kept = [c.astype(np.int64) for c in live_cols]
    return Compacted(jax.tree_util.tree_unflatten(mlp.treedef, out), kept)
