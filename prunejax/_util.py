"""Plumbing shared by every stage: leaf paths, leaf selection, validation, layer pairing,
atomic file writes and the cache directory.

This is the one private module that every other module may import (it imports no other prunejax
module).  Its names are public *within* the package; users should not need them.

Every public function of prunejax accepts ANY pytree of arrays (a Flax ``params`` dict, a plain
dict, a Keras ``get_weights()`` list, tuples, nested mixes).  Leaves are named by their *path*, a
``/``-joined string of the keys that lead to them: ``"Dense_0/kernel"`` in a Flax tree, ``"2"``
for the third array of a Keras list.  Error messages always name the path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
Where = Callable[[str, Any], bool]

__all__ = [
    "PyTree",
    "Where",
    "DenseLayer",
    "flatten",
    "is_matrix_object",
    "ndim",
    "path_str",
    "dtype_of",
    "is_jax",
    "is_traced",
    "default_where",
    "select",
    "check_finite",
    "check_fraction",
    "check_number",
    "per_leaf_values",
    "check_same_structure",
    "dense_layers",
    "unit_axis",
    "is_bias_shape",
    "split_layer_key",
    "sibling_path",
    "find_instances",
    "find_state",
    "BIAS_NAMES",
    "KERNEL_NAMES",
    "kernel_name_suffix",
    "bias_names_for",
    "last_key",
    "parent_path",
    "check_block",
    "check_int",
    "is_int",
    "atomic_path",
    "remove_stale_temps",
    "read_regular_file",
    "loads_json_bounded",
    "json_depth",
    "json_shape",
    "atomic_write_bytes",
    "atomic_write_text",
    "cache_dir",
    "LAYOUTS",
    "Unwrapped",
    "check_layout",
    "swap_kernel",
    "unwrap",
    "rewrap_record",
]


def path_str(keypath: tuple) -> str:
    """Join a key path with ``/``: ``"Dense_0/kernel"``; the empty path is ``"<root>"``."""
    if not keypath:
        return "<root>"
    return jax.tree_util.keystr(keypath, simple=True, separator="/")


def is_matrix_object(x: Any) -> bool:
    """True for kernel objects that act as one leaf: ``jax.experimental.sparse`` matrices and
    prunejax sparse kernels (instances of a class with a ``__prunejax_kernel__`` attribute; the
    class is asked, not the instance, so that wrappers forwarding attribute access, such as Flax
    NNX ``Variable``s, are not mistaken for the kernel they hold)."""
    from jax.experimental import sparse as jsparse

    return isinstance(x, jsparse.JAXSparse) or hasattr(type(x), "__prunejax_kernel__")


def ndim(x: Any) -> int:
    """``ndim`` that also works for sparse kernel objects."""
    return len(x.shape) if hasattr(x, "shape") else np.ndim(x)


def flatten(tree: PyTree, *, what: str = "params") -> tuple[list[str], list[Any], Any]:
    """Flatten ``tree`` into ``(paths, leaves, treedef)``; sparse kernel objects stay one leaf.

    Raises:
      ValueError: if the tree has no array leaves.
      TypeError: if a leaf is not an array (or a Python/NumPy scalar).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_matrix_object)
    if not flat:
        raise ValueError(f"{what} is an empty pytree: there is nothing to prune")
    paths = [path_str(kp) for kp, _ in flat]
    leaves = [leaf for _, leaf in flat]
    for p, leaf in zip(paths, leaves, strict=True):
        if not (
            isinstance(leaf, np.ndarray | np.generic | jax.Array)
            or is_traced(leaf)
            or is_matrix_object(leaf)
        ):
            raise TypeError(
                f"{what} leaf {p!r} is a {type(leaf).__name__}, not an array; "
                "convert it with np.asarray or jnp.asarray first"
            )
    return paths, leaves, treedef


def dtype_of(x: Any) -> np.dtype:
    """The dtype of an array, tracer or scalar (without NumPy's deprecated array coercion)."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.result_type(x)


def is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def is_jax(x: Any) -> bool:
    """True for JAX arrays and tracers (JAX in gives JAX out), False for NumPy."""
    return isinstance(x, jax.Array) or is_traced(x)


def default_where(path: str, leaf: Any) -> bool:
    """The default leaf selection: kernels (``ndim >= 2``) are pruned, 1-D leaves are not."""
    del path
    return ndim(leaf) >= 2


def select(paths: list[str], leaves: list[Any], where: Where | None) -> list[bool]:
    """Evaluate the ``where(path, leaf) -> bool`` predicate on every leaf."""
    where = default_where if where is None else where
    out = []
    for p, leaf in zip(paths, leaves, strict=True):
        sel = where(p, leaf)
        if not isinstance(sel, bool | np.bool_):
            raise TypeError(f"where({p!r}, leaf) returned {type(sel).__name__}, expected a bool")
        out.append(bool(sel))
    return out


def check_finite(path: str, leaf: Any) -> None:
    """Raise ``ValueError`` if a concrete leaf holds NaN or inf (tracers cannot be checked)."""
    if is_traced(leaf):
        return
    arr = np.asarray(leaf)
    if arr.dtype.kind in "fc" or arr.dtype == jnp.bfloat16:
        finite = np.isfinite(arr.astype(np.float32) if arr.dtype == jnp.bfloat16 else arr)
        if not finite.all():
            bad = int(arr.size - finite.sum())
            raise ValueError(
                f"leaf {path!r} has {bad} non-finite value(s) (NaN or inf); "
                "pruning by magnitude is undefined for them"
            )


def _reject_non_numeric(value: Any, name: str, where: str) -> None:
    """``TypeError`` for strings, bytes, booleans and complex numbers, which ``float()`` would
    quietly accept (or truncate with only a warning)."""
    if isinstance(value, str | bytes | bool | np.bool_ | complex | np.complexfloating) or (
        isinstance(value, np.ndarray | jax.Array) and np.dtype(value.dtype).kind in "bSUOc"
    ):
        raise TypeError(
            f"{name}{where} must be a real number, got {type(value).__name__} {value!r}"
        )


def check_number(value: Any, *, name: str) -> float:
    """A concrete real number as ``float``; strings, bytes, bools and complex are refused.

    Raises:
      TypeError: ``value`` is not a real number (``"0.5"``, ``True``, ``None``, ``1j``).
      ValueError: ``value`` is an array with more than one element (as in ``check_fraction``).
    """
    if isinstance(value, jax.Array | np.ndarray) and np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    _reject_non_numeric(value, name, "")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None


def check_fraction(value: Any, *, name: str, path: str | None = None) -> Any:
    """Check that a concrete fraction lies in ``[0, 1]``; traced values pass through unchecked.

    Every argument that is a fraction (``sparsity``, ``drop_fraction``, schedule end points, at
    layer and global scope alike) goes through here, so they all refuse the same inputs.

    Raises:
      TypeError: a string (``"0.5"``), bytes, a bool, a complex number or another non-number.
      ValueError: a non-scalar array, NaN, or a value outside ``[0, 1]``.
    """
    where = f" for leaf {path!r}" if path is not None else ""
    if is_traced(value):
        if not jnp.issubdtype(value.dtype, jnp.floating) and not jnp.issubdtype(
            value.dtype, jnp.integer
        ):
            raise TypeError(f"{name}{where} must be a real number, got dtype {value.dtype}")
        return value
    if isinstance(value, jax.Array | np.ndarray) and np.ndim(value) != 0:
        raise ValueError(f"{name}{where} must be a scalar, got shape {np.shape(value)}")
    _reject_non_numeric(value, name, where)
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}{where} must be a number, got {type(value).__name__}") from None
    if math.isnan(f) or not 0.0 <= f <= 1.0:
        raise ValueError(f"{name}{where} must be in [0, 1], got {value!r}")
    return value


def _is_scalar(x: Any) -> bool:
    return (
        isinstance(x, int | float | np.generic)
        or is_traced(x)
        or (isinstance(x, jax.Array | np.ndarray) and np.ndim(x) == 0)
    ) and not isinstance(x, bool | np.bool_ | str | bytes)


def per_leaf_values(
    value: Any,
    paths: list[str],
    selected: list[bool],
    *,
    name: str,
    check: Callable[[Any, str], Any],
) -> list[Any]:
    """Resolve a scalar-or-per-leaf argument (``sparsity``, ``quality``) to one value per leaf.

    ``value`` may be
      * a scalar (Python, NumPy or JAX, possibly traced): the same value for every selected leaf;
      * a mapping or pytree of scalars keyed by path: ``{"Dense_0/kernel": 0.9}``,
        ``{"Dense_0": 0.9}`` (applies to every selected leaf under ``Dense_0``),
        ``{"Dense_0": {"kernel": 0.9}}``, or ``[0.92, None, 0.91, None]`` for a Keras list.
        Selected leaves the map does not name get ``None`` (left unpruned).

    Returns:
      A list with one entry per leaf: the checked value, or ``None`` where nothing is pruned.

    Raises:
      ValueError: the map names a leaf that does not exist or is not selected; a value is bad.
    """
    if _is_scalar(value):
        return [check(value, p) if s else None for p, s in zip(paths, selected, strict=True)]
    if not isinstance(value, Mapping | list | tuple):
        raise TypeError(
            f"{name} must be a number or a mapping/pytree of per-leaf numbers, "
            f"got {type(value).__name__}"
        )
    flat, _ = jax.tree_util.tree_flatten_with_path(value)
    if not flat:
        raise ValueError(f"{name} map is empty: name at least one leaf")
    out: list[Any] = [None] * len(paths)
    for kp, v in flat:
        key = path_str(kp)
        hits = [i for i, p in enumerate(paths) if p == key or p.startswith(key + "/")]
        if not hits:
            raise ValueError(
                f"{name} map names {key!r}, which is not a leaf of params "
                f"(leaves: {', '.join(paths[:8])}{', ...' if len(paths) > 8 else ''})"
            )
        hits_sel = [i for i in hits if selected[i]]
        if not hits_sel:
            raise ValueError(
                f"{name} map names {key!r}, but no leaf there is selected for pruning "
                "(by default only leaves with ndim >= 2 are; pass where= to change that)"
            )
        if not _is_scalar(v):
            raise TypeError(f"{name} for {key!r} must be a number, got {type(v).__name__}")
        for i in hits_sel:
            if out[i] is not None:
                raise ValueError(f"{name} map gives leaf {paths[i]!r} more than one value")
            out[i] = check(v, paths[i])
    return out


def check_same_structure(
    params: PyTree, other: PyTree, *, what: str = "masks", check_bool: bool = True
) -> tuple[list[str], list[Any], list[Any], Any]:
    """Check that ``other`` (a mask tree) matches ``params`` leaf for leaf.

    Returns:
      ``(paths, params_leaves, other_leaves, treedef)``.

    Raises:
      ValueError: the tree structures or a leaf's shape differ (the message names the leaf).
      TypeError: ``check_bool`` and a mask leaf is not boolean.
    """
    paths, leaves, treedef = flatten(params)
    flat_o, treedef_o = jax.tree_util.tree_flatten_with_path(other)
    if treedef_o != treedef:
        opaths = {path_str(kp) for kp, _ in flat_o}
        missing = [p for p in paths if p not in opaths]
        extra = sorted(opaths - set(paths))
        detail = []
        if missing:
            detail.append(f"missing {missing[:5]}")
        if extra:
            detail.append(f"unexpected {extra[:5]}")
        raise ValueError(
            f"{what} tree does not match the params tree"
            + (f": {'; '.join(detail)}" if detail else f" ({treedef_o} vs {treedef})")
        )
    other_leaves = [leaf for _, leaf in flat_o]
    for p, a, b in zip(paths, leaves, other_leaves, strict=True):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"{what} leaf {p!r} has shape {np.shape(b)} but the params leaf has {np.shape(a)}"
            )
        if check_bool and dtype_of(b) != np.bool_:
            raise TypeError(f"{what} leaf {p!r} has dtype {dtype_of(b)}, expected bool")
    return paths, leaves, other_leaves, treedef


# ----------------------------------------------------------------------------- layer pairing

KERNEL_NAMES = ("kernel", "weight", "w")
BIAS_NAMES = ("bias", "b")
# Further kernel names, paired by name with the bias of the same suffix: ``W``/``b``,
# ``w1``/``b1``, ``W_2``/``b_2``, ``kernel3``/``bias3``, ``weight_0``/``bias_0``.
_NUMBERED_KERNEL = re.compile(r"^(?:kernel|weight|w|W)((?:_?\d+)?)$")


def kernel_name_suffix(key: str) -> str | None:
    """The suffix of a kernel name (``""`` for ``kernel``/``W``, ``"1"`` for ``w1``, ``"_2"`` for
    ``W_2``), or ``None`` when ``key`` does not name a kernel."""
    m = _NUMBERED_KERNEL.match(key)
    return None if m is None else m.group(1)


def bias_names_for(key: str) -> tuple[str, ...]:
    """The sibling names a kernel called ``key`` pairs with, in order of preference."""
    suffix = kernel_name_suffix(key)
    if suffix is None:
        return ()
    return tuple(f"{b}{suffix}" for b in BIAS_NAMES)


@dataclass(frozen=True)
class DenseLayer:
    """One dense layer found in a params pytree: leaf indices (into ``flatten``'s order).

    Attributes:
      name: the layer's name (the kernel's parent path for named kernels, else its path).
      kernel: index of the kernel leaf (``(in, out)``, or ``(out, in)`` under
        ``layout="out_in"``; a conv kernel with ``conv=True``).
      bias: index of the paired bias leaf (1-D, or ``(out, 1, ..., 1)`` under ``"out_in"``),
        or ``None``.
      kind: how the kernel was recognised: ``"named"`` (its key is a kernel name, see
        :func:`kernel_name_suffix`), ``"sequence"`` (an element of a list/tuple, the Keras
        ``get_weights()`` layout) or ``"unnamed"`` (any other 2-D leaf, e.g. a dict entry
        ``"embed"``: it may be an embedding table or any matrix, not a layer).
    """

    name: str
    kernel: int
    bias: int | None
    kind: str = "named"


def find_instances(tree: Any, cls: type) -> list[Any]:
    """Every ``cls`` node of ``tree`` (an optax state, possibly chained or nested).

    Args:
      tree: any pytree.
      cls: a ``NamedTuple`` state class (the walk is ``optax.tree_utils``'s, which finds
        ``NamedTuple`` nodes by class name; this keeps the instances of ``cls``).

    Returns:
      The nodes, outermost first.
    """
    found = optax.tree_utils.tree_get_all_with_path(
        tree, cls.__name__, lambda _, node: isinstance(node, cls)
    )
    return [node for _, node in found]


def find_state(opt_state: Any, cls: type, *, what: str, build: str) -> Any:
    """The one ``cls`` state inside ``opt_state`` (e.g. within ``optax.chain``).

    Args:
      opt_state: an optax state.
      cls: the state class to look for.
      what: its name in error messages (``"pruning"``).
      build: the call that makes it, for the error message (``"pruning()"``).

    Returns:
      The state.

    Raises:
      ValueError: ``opt_state`` holds no ``cls`` state, or more than one.
    """
    found = find_instances(opt_state, cls)
    if not found:
        raise ValueError(f"opt_state holds no {what} state: build the optimizer with {build}")
    if len(found) > 1:
        raise ValueError(
            f"opt_state holds more than one {what} state ({len(found)}), expected exactly one"
        )
    return found[0]


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def parent_path(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def last_key(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _in_sequence(keypath: tuple) -> bool:
    return bool(keypath) and isinstance(keypath[-1], jax.tree_util.SequenceKey)


def unit_axis(layout: str) -> int:
    """The axis of a kernel that holds its output units: ``-1`` for ``"in_out"`` (Flax, Keras:
    ``(in, out)``, conv ``(h, w, in, out)``), ``0`` for ``"out_in"`` (Equinox, PyTorch:
    ``(out, in)``, conv ``(out, in, h, w)``).

    Raises:
      ValueError: ``layout`` is neither.
    """
    if layout not in ("in_out", "out_in"):
        raise ValueError(f"layout must be 'in_out' or 'out_in', got {layout!r}")
    return -1 if layout == "in_out" else 0


def is_bias_shape(shape: tuple, kernel_shape: tuple, layout: str) -> bool:
    """True if ``shape`` is a bias of the units of a kernel of ``kernel_shape``: ``(out,)``, or
    for a conv kernel under ``"out_in"`` also ``(out, 1, ..., 1)`` with one 1 per spatial axis
    (Equinox ``Conv`` biases)."""
    shape, kernel_shape = tuple(shape), tuple(kernel_shape)
    width = kernel_shape[unit_axis(layout)]
    if shape == (width,):
        return True
    return (
        layout == "out_in"
        and len(shape) == len(kernel_shape) - 1 >= 2
        and shape[0] == width
        and set(shape[1:]) == {1}
    )


def _next_leaf_bias(
    i: int, paths: list[str], leaves: list[Any], layout: str = "in_out"
) -> int | None:
    """The sequence convention: the next leaf, if a bias of the kernel's width, same parent."""
    j = i + 1
    if (
        j < len(leaves)
        and parent_path(paths[j]) == parent_path(paths[i])
        and hasattr(leaves[j], "shape")
        and is_bias_shape(leaves[j].shape, leaves[i].shape, layout)
    ):
        return j
    return None


def split_layer_key(path: str) -> tuple[str, str]:
    """``(layer, name)`` of a leaf path: ``"Dense_0/kernel"`` -> ``("Dense_0", "kernel")``; a
    PyTorch-style dotted key ``"fc1.weight"`` (or ``"net/0.weight"``) -> ``("fc1", "weight")``.
    """
    par, last = parent_path(path), last_key(path)
    if "." in last:
        stem, last = last.rsplit(".", 1)
        return (f"{par}/{stem}" if par else stem), last
    return par, last


def sibling_path(path: str, name: str) -> str:
    """The path of the leaf called ``name`` in the same layer as ``path`` (see
    :func:`split_layer_key`): ``("Dense_0/kernel", "bias")`` -> ``"Dense_0/bias"``,
    ``("fc1.weight", "bias")`` -> ``"fc1.bias"``."""
    last = last_key(path)
    if "." in last:
        return path.rsplit(".", 1)[0] + "." + name
    par = parent_path(path)
    return f"{par}/{name}" if par else name


def _variable_suffix(keypath: tuple) -> str:
    """``"/value"`` for a leaf held by a Flax NNX ``Variable`` (an ``nnx.State`` leaf's path
    ends in its ``value`` attribute: ``fc1/kernel/value``), else ``""``."""
    last = keypath[-1] if keypath else None
    return "/value" if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "value" else ""


def _is_kernel(leaf: Any, conv: bool) -> bool:
    return ndim(leaf) == 2 or (conv and ndim(leaf) >= 3)


def dense_layers(
    params: PyTree, *, what: str = "params", layout: str = "in_out", conv: bool = False
) -> list[DenseLayer]:
    """Find the dense layers of an MLP pytree, in forward order, with their paired biases.

    Conventions recognised (kernels are ``(in, out)``, as in Flax and Keras, unless ``layout``
    says ``(out, in)``):
      * sibling leaves ``kernel``/``bias`` in a dict (Flax ``{"Dense_0": {"kernel", "bias"}}``;
        also ``weight``/``bias`` and ``w``/``b``, PyTorch-style dotted keys
        ``{"fc1.weight", "fc1.bias"}`` and NNX ``fc1/kernel/value``/``fc1/bias/value``);
        layers are ordered by the *natural* order of their paths (``Dense_10`` after
        ``Dense_9``);
      * sibling leaves named with a matching suffix: ``W``/``b``, ``w1``/``b1``, ``W_2``/``b_2``,
        ``kernel3``/``bias3`` (a flat ``{"w1", "b1", "w2", "b2"}`` dict); if no bias of that
        name exists, the sequence convention below applies;
      * a flat sequence ``[W1, b1, W2, b2, ...]`` (Keras ``get_weights()``), where a kernel is
        paired with the next leaf if that one is a bias of the kernel's width (1-D of length
        ``W.shape[1]``); sequences of ``(W, b)`` tuples pair the same way.  Other kernels (kind
        ``"unnamed"``) pair by the same rule, but they may not be layers at all: see
        ``DenseLayer.kind``.

    The order is the paths' natural order, which is the forward order for Flax's ``Dense_0``,
    ``Dense_1``, ..., Equinox's ``layers/0``, ``layers/1``, ... and Keras lists, but not for
    every naming (``features`` after ``classifier``): check it where it matters.

    Args:
      params: the parameter pytree.
      what: the tree's name in error messages.
      layout: ``"in_out"`` (default; Flax, Keras: units are the last axis) or ``"out_in"``
        (Equinox ``Linear.weight``, PyTorch state dicts: units are the first axis, and a bias
        may also be ``(out, 1, ..., 1)`` as in Equinox ``Conv``).
      conv: also count leaves of ``ndim >= 3`` (conv kernels) as kernels.

    Returns:
      One ``DenseLayer`` per kernel (2-D leaf, or ``ndim >= 2`` with ``conv``), in forward order.
    """
    unit_axis(layout)
    paths, leaves, _ = flatten(params, what=what)
    keypaths = [
        kp for kp, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_matrix_object)[0]
    ]
    by_path = {p: i for i, p in enumerate(paths)}
    used_bias: set[int] = set()
    named = []
    for i in (i for i, leaf in enumerate(leaves) if _is_kernel(leaf, conv)):
        p, sfx = paths[i], _variable_suffix(keypaths[i])
        base, kp = (p[: -len(sfx)], keypaths[i][:-1]) if sfx else (p, keypaths[i])
        layer, last = split_layer_key(base)
        bias = None
        if last in KERNEL_NAMES or (kernel_name_suffix(last) is not None and not _in_sequence(kp)):
            for bname in bias_names_for(last):
                j = by_path.get(sibling_path(base, bname) + sfx)
                if j is not None and (
                    ndim(leaves[j]) == 1 or is_bias_shape(leaves[j].shape, leaves[i].shape, layout)
                ):
                    bias = j
                    break
            if bias is None and last not in KERNEL_NAMES:
                bias = _next_leaf_bias(i, paths, leaves, layout)
            named.append((layer or base, i, bias, "named"))
            continue
        kind = "sequence" if _in_sequence(keypaths[i]) else "unnamed"
        named.append((p, i, _next_leaf_bias(i, paths, leaves, layout), kind))
    # natural order of the layer names; sequence layers keep flatten order (already natural)
    named.sort(key=lambda t: _natural_key(t[0]))
    layers: list[DenseLayer] = []
    for name, i, b, kind in named:
        if b is not None:
            if b in used_bias:
                b = None
            else:
                used_bias.add(b)
        layers.append(DenseLayer(name=name, kernel=i, bias=b, kind=kind))
    return layers


# ----------------------------------------------------------------------------- validation


def is_int(value: Any) -> bool:
    """True for Python and NumPy integers, False for ``bool`` (which Python counts as an int)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def check_int(value: Any, *, name: str, minimum: int | None = None) -> int:
    """Check that ``value`` is an integer (not a bool), at least ``minimum``; return it as int.

    Raises:
      TypeError: ``value`` is not an integer.
      ValueError: ``value`` is below ``minimum``.
    """
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_block(block: Any) -> tuple[int, int]:
    """``block`` as ``(bh, bw)``, a pair of positive ints (block masks and block kernels).

    Raises:
      ValueError: ``block`` is not a pair of positive ints.
    """
    if (
        not isinstance(block, tuple | list)
        or len(block) != 2
        or not all(is_int(b) for b in block)
        or min(block) < 1
    ):
        raise ValueError(f"block must be a pair of positive ints (bh, bw), got {block!r}")
    return int(block[0]), int(block[1])


# ----------------------------------------------------------------------------- files


_TMP_TAG = ".pjtmp"


# PIDs mean something only on the host that wrote them (a directory may be shared by hosts or
# containers): the tag carries a short hash of the host name, and only this host's are judged.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_pattern(path: Path, suffix: str) -> re.Pattern:
    """The names of ``atomic_path``'s temporary files for ``path`` (group 1: the writer's host
    tag, group 2: its PID)."""
    return re.compile(
        rf"\.{re.escape(path.name)}{re.escape(_TMP_TAG)}([0-9a-f]{{8}})-(\d+)\."
        rf"[A-Za-z0-9_]+{re.escape(suffix)}"
    )


def _umask() -> int:
    """The process's umask, read without changing it where ``/proc`` allows (``os.umask`` sets
    it, briefly, for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # alive under another user, or not a PID: leave it
    return True


def remove_stale_temps(path: str | os.PathLike, *, suffix: str = ".tmp") -> list[Path]:
    """Remove the temporary files a killed ``atomic_path`` writer left beside ``path``.

    A temporary file is named ``.<name>.pjtmp<host>-<pid>.<random><suffix>``; it is removed only
    if it is a regular file (not a link), was written on this host (``<host>``: a hash of the host
    name) and no process with that PID is alive here.  Files of live writers, of other hosts
    sharing the directory, and names that do not match, are left alone.

    Args:
      path: the destination whose stale temporary files are removed.
      suffix: the temporary files' suffix (as given to ``atomic_path``).

    Returns:
      The removed paths.
    """
    path = Path(path)
    pattern = _tmp_pattern(path, suffix)
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or m.group(1) != _HOST or _pid_alive(int(m.group(2))):
            continue
        tmp = path.parent / name
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(tmp).st_mode):
                os.unlink(tmp)
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Write a file atomically: yield a temporary path beside ``path``, then rename it into place.

    The caller writes the whole file to the yielded path.  On success the file is flushed to
    disk (``fsync``), given the permissions of the file it replaces (a new file:
    ``0o666 & ~umask``, as a plain ``open`` would; ``mkstemp`` makes files private) and renamed
    over ``path`` with ``os.replace``, so readers see
    either the old file or the complete new one, never a partial write.  On any exception the
    temporary file is removed and the exception propagates.  The temporary name carries the
    writer's host and PID (``.<name>.pjtmp<host>-<pid>.<random><suffix>``): temporary files left
    by a writer on this host that was killed (its PID no longer alive) are removed at the next
    write to the same ``path``
    (:func:`remove_stale_temps`).

    Args:
      path: the destination.  Its directory is created if missing.
      suffix: the temporary file's suffix (some writers insist on an extension, e.g. ``.keras``).

    Yields:
      The temporary path to write to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path, suffix=suffix)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}{_TMP_TAG}{_HOST}-{os.getpid()}.", suffix=suffix
    )
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def cache_dir(*, create: bool = False) -> Path:
    """prunejax's cache directory: ``$PRUNEJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/prunejax``,
    else ``~/.cache/prunejax``.

    Args:
      create: make the directory (and its parents) if it does not exist.

    Returns:
      The directory's path.
    """
    env = os.environ.get("PRUNEJAX_CACHE_DIR")
    if env:
        d = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        d = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "prunejax"
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


# ----------------------------------------------------------------------------- reading files


def read_regular_file(
    path: str | os.PathLike, *, error: type[Exception] = ValueError, what: str = "file"
) -> bytes:
    """The bytes of a regular file, refusing anything else at once (never blocking).

    The file is opened with ``O_NONBLOCK`` and checked with ``fstat`` before anything is read, so
    a FIFO, a directory, a socket or a device raises instead of blocking or streaming forever.

    Args:
      path: the file.
      error: the exception type raised for a path that is not a regular file.
      what: what the file is (for messages).

    Returns:
      Its bytes (exactly the size ``fstat`` reported when it was opened).

    Raises:
      FileNotFoundError, PermissionError: as ``open``.
      error: the path is not a regular file, or it shrank while being read.
    """
    where = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(where, flags)
    except IsADirectoryError:
        raise error(f"{where!r} is a directory, not a {what}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{where!r} is a directory, not a {what}")
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{where!r} is not a regular file (a {what} must be one)")
        size = st.st_size
        chunks, got = [], 0
        while got < size:
            chunk = os.read(fd, min(size - got, 1 << 24))
            if not chunk:
                raise error(f"{where!r} shrank while it was being read")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _json_chunk(a: np.ndarray, state: tuple[int, bool, int]) -> tuple[int, int, tuple]:
    """Depth, token count and carried state of one chunk of JSON text (see ``json_shape``)."""
    run, inside, depth = state
    pos = np.arange(a.size, dtype=np.int64)
    backslash = a == ord("\\")
    last_other = np.maximum.accumulate(np.where(backslash, -1, pos))
    run_before = np.empty(a.size, np.int64)  # backslashes immediately before each byte
    run_before[0] = run
    run_before[1:] = np.where(last_other[:-1] >= 0, pos[:-1] - last_other[:-1], run + pos[1:])
    quote = (a == ord('"')) & (run_before % 2 == 0)
    quotes = np.cumsum(quote) + int(inside)
    outside = (quotes % 2 == 0) & ~quote
    opens = outside & ((a == ord("[")) | (a == ord("{")))
    closes = outside & ((a == ord("]")) | (a == ord("}")))
    levels = np.cumsum(opens.astype(np.int64) - closes) + depth
    tokens = int(np.count_nonzero(opens | (outside & ((a == ord(",")) | (a == ord(":"))))))
    run = run + a.size if last_other[-1] < 0 else a.size - 1 - int(last_other[-1])
    return int(levels.max()), tokens, (run, bool(quotes[-1] % 2), int(levels[-1]))


def json_shape(raw: bytes, *, chunk: int = 1 << 18) -> tuple[int, int]:
    """The nesting depth and token count of JSON text, outside strings, in O(n) time and O(chunk)
    memory (vectorised over chunks), without parsing it.

    Args:
      raw: JSON text (UTF-8 bytes).
      chunk: bytes examined at a time.

    Returns:
      ``(depth, tokens)``: the largest number of open brackets at any point (0 for a scalar) and
      the number of ``[``, ``{``, ``,`` and ``:`` outside strings (each value the parser would
      build costs at most one).
    """
    data = np.frombuffer(bytes(raw), np.uint8)
    state: tuple = (0, False, 0)
    depth = tokens = 0
    for start in range(0, data.size, chunk):
        d, t, state = _json_chunk(data[start : start + chunk], state)
        depth, tokens = max(depth, d), tokens + t
    return depth, tokens


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, outside strings (``json_shape``).

    Args:
      raw: JSON text (UTF-8 bytes).

    Returns:
      The largest number of open brackets at any point (0 for a scalar).
    """
    return json_shape(raw)[0]


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def loads_json_bounded(
    raw: bytes, *, max_bytes: int, max_depth: int, max_tokens: int = 1_000_000
) -> Any:
    """Parse untrusted JSON with bounded size, nesting depth and value count, rejecting duplicate
    keys.

    Depth and token count are measured on the raw bytes (strings skipped) BEFORE the parser runs,
    so deeply nested input raises ``ValueError`` rather than ``RecursionError``, and the Python
    objects the parser builds stay bounded (about 64 bytes per token at most, besides the text).
    ``NaN``/``Infinity`` are refused.

    Args:
      raw: UTF-8 JSON text.
      max_bytes: the largest accepted size.
      max_depth: the deepest accepted nesting of arrays and objects.
      max_tokens: the most brackets, commas and colons (outside strings) accepted.

    Returns:
      The parsed value.

    Raises:
      ValueError: too large, too deep, invalid UTF-8 or JSON, a duplicate key, or a non-finite
        number (the message says which).
    """
    if len(raw) > max_bytes:
        raise ValueError(f"JSON of {len(raw):,} bytes exceeds the limit of {max_bytes:,}")
    depth, tokens = json_shape(raw)
    if depth > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    if tokens > max_tokens:
        raise ValueError(f"JSON of more than {max_tokens:,} values")

    def bad_constant(name: str) -> None:
        raise ValueError(f"non-finite number {name}")

    try:
        text = bytes(raw).decode("utf-8")
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=bad_constant)
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e})") from None
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise ValueError("JSON nested too deeply") from None


# ----------------------------------------------------------------------------- containers

#: The kernel layouts: ``"in_out"`` (Flax, Keras, prunejax: ``y = x @ W``) and ``"out_in"``
#: (Equinox ``Linear``, PyTorch: ``y = W @ x``).
LAYOUTS = ("in_out", "out_in")


@dataclass(frozen=True)
class Unwrapped:
    """A model container seen as a plain tree (see :func:`unwrap`).

    Attributes:
      kind: ``"tree"`` (dicts, lists, tuples, Flax ``FrozenDict``: nothing to unwrap, though
        ``layout="out_in"`` transposes its kernels), ``"nnx.State"`` or ``"equinox"``.
      tree: the arrays as a plain nested dict (or the input itself for ``"tree"``), with every
        ``(out, in)`` kernel transposed to ``(in, out)``.
      out_in: the paths (in ``tree``) of the kernels that were transposed.
      record: a JSON description of the container for files (``None`` for a ``"tree"`` with
        nothing transposed): ``{"kind": "nnx.State", "variables": {path: Variable type}}``,
        ``{"kind": "equinox", "class": name, "out_in": [paths]}`` or
        ``{"kind": "tree", "out_in": [paths]}``.
      rewrap: ``rewrap(tree, transpose=True)`` builds the container back from a tree of the same
        keys (leaf shapes may differ: compacted); ``transpose=False`` when the ``out_in`` leaves
        are already in the container's orientation.
    """

    kind: str
    tree: Any
    out_in: frozenset[str]
    record: dict | None
    rewrap: Callable[..., Any]


def check_layout(layout: Any) -> str | None:
    """``layout`` checked: ``None`` (detect), ``"in_out"`` or ``"out_in"``.

    Raises:
      ValueError: any other value.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be None, 'in_out' or 'out_in', got {layout!r}")
    return layout


def swap_kernel(path: str, leaf: Any) -> Any:
    """The transpose of a 2-D kernel: arrays by ``swapaxes``, kernel objects by their ``.T``.

    Raises:
      TypeError: a kernel object without ``.T``, or a leaf that is not 2-D.
    """
    if ndim(leaf) != 2:
        raise TypeError(f"leaf {path!r} of shape {np.shape(leaf)} is not a 2-D kernel")
    if is_matrix_object(leaf):
        if not hasattr(leaf, "T"):
            raise TypeError(
                f"leaf {path!r} is a {type(leaf).__name__} in an (out, in) position, which cannot "
                "be transposed; build it with prunejax.sparsify on the container"
            )
        return leaf.T
    return leaf.T if isinstance(leaf, np.ndarray) else jnp.swapaxes(leaf, 0, 1)


def _keyname(k: Any) -> Any:
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.SequenceKey):
        return k.idx
    if isinstance(k, jax.tree_util.DictKey):
        return k.key
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return k.key
    raise TypeError(f"unsupported key {k!r}")  # pragma: no cover


def _nested(keypaths: list[tuple], leaves: list[Any]) -> dict:
    """A nested dict holding ``leaves`` at the key names of ``keypaths``."""
    root: dict = {}
    for kp, leaf in zip(keypaths, leaves, strict=True):
        node = root
        for k in kp[:-1]:
            node = node.setdefault(_keyname(k), {})
        node[_keyname(kp[-1])] = leaf
    return root


def _lookup(tree: Any, keypath: tuple, what: str) -> Any:
    node = tree
    for k in keypath:
        name = _keyname(k)
        if not isinstance(node, Mapping) or name not in node:
            raise ValueError(f"{what}: the tree has no leaf at {path_str(keypath)!r}")
        node = node[name]
    return node


def _transposer(out_in: frozenset[str]) -> Callable[[Any, bool], Any]:
    """Swap the kernels at the ``out_in`` paths of a tree (when ``on``)."""

    def swap(tree: Any, on: bool) -> Any:
        if not on or not out_in:
            return tree
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_matrix_object)
        leaves = [
            swap_kernel(path_str(kp), leaf) if path_str(kp) in out_in else leaf for kp, leaf in flat
        ]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return swap


def _unwrap_nnx(state: Any) -> Unwrapped:
    from flax import nnx

    def is_var(x: Any) -> bool:
        return isinstance(x, nnx.Variable)

    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)[0]
    kinds = {path_str(kp): type(v).__name__ for kp, v in flat if is_var(v)}
    tree = _nested(
        [kp for kp, v in flat if is_var(v)], [v.get_value() for _, v in flat if is_var(v)]
    )

    def rewrap(new: Any, transpose: bool = True) -> Any:
        del transpose
        out = jax.tree_util.tree_map(lambda x: x, state, is_leaf=is_var)
        nnx.replace_by_pure_dict(out, new)
        return out

    record = {"kind": "nnx.State", "variables": kinds}
    return Unwrapped("nnx.State", tree, frozenset(), record, rewrap)


def _equinox_linear_weights(module: Any) -> frozenset[str]:
    """The paths of the ``(out, in)`` weights of the ``equinox.nn.Linear`` layers of a module."""
    import equinox as eqx

    def is_linear(x: Any) -> bool:
        return isinstance(x, eqx.nn.Linear)

    flat = jax.tree_util.tree_flatten_with_path(module, is_leaf=is_linear)[0]
    out = set()
    for kp, node in flat:
        if is_linear(node) and ndim(node.weight) == 2:
            out.add(path_str(kp + (jax.tree_util.GetAttrKey("weight"),)))
    return frozenset(out)


def _fix_linear_features(module: Any) -> Any:
    """Set ``in_features``/``out_features`` of every ``equinox.nn.Linear`` of a freshly built
    module to its (possibly compacted) weight's shape."""
    import equinox as eqx

    def fix(x: Any) -> Any:
        if isinstance(x, eqx.nn.Linear) and ndim(x.weight) == 2 and hasattr(x.weight, "shape"):
            out_f, in_f = x.weight.shape
            if x.in_features != "scalar":
                object.__setattr__(x, "in_features", int(in_f))
            if x.out_features != "scalar":
                object.__setattr__(x, "out_features", int(out_f))
        return x

    return jax.tree_util.tree_map(
        fix, module, is_leaf=lambda x: isinstance(x, eqx.nn.Linear) or is_matrix_object(x)
    )


def _unwrap_equinox(module: Any, layout: str | None) -> Unwrapped:
    import equinox as eqx

    def is_param(x: Any) -> bool:
        return eqx.is_array(x) or is_matrix_object(x)

    arrays, static = eqx.partition(module, is_param, is_leaf=is_matrix_object)
    flat, treedef = jax.tree_util.tree_flatten_with_path(arrays, is_leaf=is_matrix_object)
    keypaths = [kp for kp, _ in flat]
    paths = [path_str(kp) for kp in keypaths]
    if layout is None:
        out_in = _equinox_linear_weights(module)
    else:
        out_in = frozenset(
            p
            for p, (_, leaf) in zip(paths, flat, strict=True)
            if layout == "out_in" and ndim(leaf) == 2
        )
    swap = _transposer(out_in)
    tree = swap(_nested(keypaths, [leaf for _, leaf in flat]), True)

    def rewrap(new: Any, transpose: bool = True) -> Any:
        new = swap(new, transpose)
        leaves = [_lookup(new, kp, "rebuilding the equinox module") for kp in keypaths]
        built = jax.tree_util.tree_unflatten(treedef, leaves)
        return _fix_linear_features(eqx.combine(built, static, is_leaf=is_matrix_object))

    record = {"kind": "equinox", "class": type(module).__name__, "out_in": sorted(out_in)}
    return Unwrapped("equinox", tree, out_in, record, rewrap)


def _plain_out_in(tree: Any, layout: str | None) -> frozenset[str]:
    if layout != "out_in":
        return frozenset()
    paths, leaves, _ = flatten(tree)
    return frozenset(p for p, leaf in zip(paths, leaves, strict=True) if ndim(leaf) == 2)


def unwrap(obj: Any, *, layout: str | None = None) -> Unwrapped:
    """See a model container as a plain tree of ``(in, out)`` kernels, and build it back.

    Containers: a Flax NNX ``nnx.State`` (its ``Variable`` wrappers dropped: the leaf at
    ``fc1/kernel/value`` is ``tree["fc1"]["kernel"]``), an Equinox module (its arrays, as by
    ``eqx.partition(module, eqx.is_array)``, in a nested dict keyed by attribute names and
    sequence indices: ``layers/0/weight``; functions and other static fields are kept for the
    rebuild) and any other pytree (dicts, Flax ``FrozenDict``s, lists, tuples: passed through).

    Args:
      obj: the container.
      layout: the kernels' layout.  ``None`` (default) detects it: the weights of
        ``equinox.nn.Linear`` layers are ``(out, in)``, every other kernel ``(in, out)``.
        ``"out_in"``: every 2-D leaf is ``(out, in)`` (PyTorch-style state dicts);
        ``"in_out"``: none is.

    Returns:
      An :class:`Unwrapped` whose ``tree`` has every ``(out, in)`` kernel transposed to
      ``(in, out)`` and whose ``rewrap`` builds a container of ``obj``'s type back.

    Raises:
      ValueError: a bad ``layout``, or ``"out_in"`` for an ``nnx.State``.
    """
    layout = check_layout(layout)
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(obj, nnx.State):
        if layout == "out_in":
            raise ValueError(
                "layout='out_in' is not supported for an nnx.State (its kernels are read as "
                "(in, out)); transpose (out, in) Params into an (in, out) plain tree first"
            )
        return _unwrap_nnx(obj)
    eqx = sys.modules.get("equinox")
    if eqx is not None and isinstance(obj, eqx.Module):
        return _unwrap_equinox(obj, layout)
    out_in = _plain_out_in(obj, layout)
    swap = _transposer(out_in)

    def rewrap(new: Any, transpose: bool = True) -> Any:
        return swap(new, transpose)

    record = {"kind": "tree", "out_in": sorted(out_in)} if out_in else None
    return Unwrapped("tree", swap(obj, True), out_in, record, rewrap)


def rewrap_record(record: Any, tree: Any) -> Any:
    """The container a file's ``record`` (``Unwrapped.record``) describes, built around ``tree``
    without a template: an ``nnx.State`` with the recorded ``Variable`` types; for an Equinox
    module (whose class and functions a file does not hold) and a plain tree, the plain tree
    with the ``(out, in)`` kernels transposed back; ``tree`` itself for ``None``.

    Raises:
      ValueError: a malformed record or an unknown ``Variable`` type name.
    """
    if record is None:
        return tree
    if not isinstance(record, dict) or record.get("kind") not in ("nnx.State", "equinox", "tree"):
        raise ValueError(f"unknown container record {record!r}")
    if record["kind"] in ("equinox", "tree"):
        out_in = record.get("out_in")
        if not isinstance(out_in, list) or not all(isinstance(p, str) for p in out_in):
            raise ValueError(f"malformed {record['kind']} container record")
        return _transposer(frozenset(out_in))(tree, True)
    from flax import nnx

    kinds = record.get("variables")
    if not isinstance(kinds, dict):
        raise ValueError("malformed nnx.State container record")
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_matrix_object)
    leaves = []
    for kp, leaf in flat:
        name = kinds.get(path_str(kp))
        cls = getattr(nnx, name, None) if isinstance(name, str) else None
        if not (isinstance(cls, type) and issubclass(cls, nnx.Variable)):
            raise ValueError(f"leaf {path_str(kp)!r}: unknown nnx Variable type {name!r}")
        leaves.append(cls(leaf))
    return nnx.State(jax.tree_util.tree_unflatten(treedef, leaves))
