"""Pure mask builders on any parameter pytree.

Every builder takes ANY pytree of arrays (a Flax ``params`` dict, a plain dict, a Keras
``get_weights()`` list, tuples, nested mixes) and returns a pytree of the same structure whose
leaves are boolean arrays (``True`` = kept).  NumPy in gives NumPy out; JAX in gives JAX out, and
the JAX path works under ``jax.jit`` and ``jax.vmap``.

Semantics shared by all builders:

* Which leaves are pruned: by default every leaf with ``ndim >= 2`` (kernels); other leaves get
  all-True masks.  A ``where(path, leaf) -> bool`` predicate overrides the default; keep an
  ``ndim`` test in it so that biases stay out, e.g.
  ``where=lambda path, leaf: path.startswith("Dense_0/") and leaf.ndim >= 2`` (a bare
  ``path.startswith("Dense_0")`` selects ``Dense_0/bias`` too, and ``"Dense_1"`` matches
  ``Dense_10``).
* Counting: a leaf of ``n`` selected entries pruned at sparsity ``s`` has exactly ``round(s * n)``
  False entries, ``round`` being half-to-even as in NumPy.  Ties in the score are broken by flat
  index: the lower index is pruned first.  Concrete ``s`` is multiplied in float64; a *traced*
  ``s`` (under ``jit``/``vmap``) is float32, so exact ``.5`` boundaries may round differently than
  in an eager call with the float64 value; pass ``s`` as a static argument for exact semantics.
* ``sparsity`` may be a number or a per-leaf mapping/pytree of numbers, see
  :func:`prunejax._util.per_leaf_values` (``{"Dense_2/kernel": 0.74}``, ``[0.92, None, ...]``).
  Selected leaves the mapping does not name are left unpruned.
* Scores are exact: magnitudes are compared in the leaf's own float type (half types widened to
  float32), integer leaves by their exact unsigned magnitude (no float rounding, so ``2**53 + 1``
  ranks above ``2**53`` and ``2**24 + 1`` above ``2**24``), bools as 0/1.  Global scope over
  float and integer leaves together ranks exactly too.  Norms (unit, block) and thresholds are
  float computations: float64 for integer leaves (float32 under JAX without x64).  When the
  ranking runs in JAX without x64 (a JAX leaf or a traced argument), NumPy int64/uint64 leaves
  whose values do not fit 32 bits raise ``ValueError`` instead of wrapping.
* Bad input raises ``ValueError``/``TypeError`` naming the leaf path: sparsity outside ``[0, 1]``
  or NaN, a string, bytes or bool where a number is expected (``"0.5"`` and ``True`` are
  refused at layer and global scope alike), non-finite weights (checked on concrete inputs;
  traced values cannot be inspected), complex or non-numeric selected leaves (``TypeError``:
  magnitude is ambiguous for complex weights, prune ``np.abs(w)`` instead), a per-leaf map
  naming a missing leaf, structured pruning of a leaf of the wrong rank.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prunejax._util import (
    PyTree,
    Where,
    bias_names_for,
    check_block,
    check_finite,
    check_fraction,
    check_int,
    check_number,
    check_same_structure,
    dense_layers,
    dtype_of,
    flatten,
    is_bias_shape,
    is_jax,
    is_traced,
    parent_path,
    path_str,
    per_leaf_values,
    select,
    sibling_path,
    split_layer_key,
    unit_axis,
)
from prunejax.selection import (
    keep_lowest,
    keep_lowest_k,
    num_pruned,
    order_key,
    repeat_axis,
    split_axis,
)

__all__ = [
    "magnitude_masks",
    "unit_masks",
    "threshold_masks",
    "nm_masks",
    "block_masks",
    "random_masks",
    "apply_masks",
    "combine",
    "sparsity_report",
    "SparsityReport",
]


# ----------------------------------------------------------------------------- ranking core


def _is_real(dt: Any) -> bool:
    return bool(jnp.issubdtype(dt, jnp.floating) or jnp.issubdtype(dt, jnp.integer)) or (
        np.dtype(dt) == np.bool_
    )


def _norm_dtype(x: Any, use_jax: bool) -> Any:
    """The float type norms and thresholds are computed in: float32 for half types; float64
    for integers and bools (float32 under JAX without x64, which has no float64); else the
    leaf's own float type."""
    dt = np.dtype(dtype_of(x))
    if jnp.issubdtype(dt, jnp.floating) and dt.itemsize >= 4:
        return dt
    if jnp.issubdtype(dt, jnp.floating):
        return np.float32
    return np.float64 if not use_jax or jax.config.jax_enable_x64 else np.float32


def _num_pruned(sparsity: Any, n: int, use_jax: bool) -> Any:
    """``round(s * n)`` half-to-even: an int for concrete ``s``; for a traced ``s`` the float32
    product as an int32 ``(hi, lo)`` count pair (:func:`prunejax.selection.num_pruned`)."""
    if is_traced(sparsity) or (use_jax and isinstance(sparsity, jax.Array)):
        if not is_traced(sparsity):
            return int(np.round(np.float64(sparsity) * n))
        return num_pruned(sparsity, n)
    return int(np.round(np.float64(sparsity) * n))


def _abs_scores(leaf: Any, use_jax: bool) -> Any:
    """Exact magnitudes in the leaf's shape: ``|w|`` in the leaf's own float type (half types
    widened to float32, which holds them exactly); for integers the unsigned magnitude of the
    same width (``|int8(-128)| = uint8(128)``), compared exactly whatever its size (no float
    rounding, so ``2**53 + 1`` ranks above ``2**53``); bools as 0/1."""
    xp = jnp if use_jax else np
    w = xp.asarray(leaf)
    dt = np.dtype(w.dtype)
    if dt == np.bool_:
        return w.astype(np.uint8)
    if jnp.issubdtype(dt, jnp.unsignedinteger):
        return w
    if jnp.issubdtype(dt, jnp.integer):
        udt = np.dtype(f"uint{8 * dt.itemsize}")
        # -(x + 1) never overflows; adding 1 in the unsigned type gives |x| exactly
        neg = (-(w + 1)).astype(udt) + udt.type(1)
        return xp.where(w < 0, neg, w.astype(udt))
    return xp.abs(w.astype(np.float32 if dt.itemsize < 4 else dt))


def _ones_like(leaf: Any, use_jax: bool) -> Any:
    if is_jax(leaf) and not is_traced(leaf):  # made in place, shard by shard
        return jnp.ones(np.shape(leaf), bool, device=leaf.sharding)
    if is_jax(leaf):
        return place_like(jnp.ones(np.shape(leaf), bool), leaf)
    shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
    return jnp.ones(shape, bool) if use_jax else np.ones(shape, bool)


def place_like(mask: Any, leaf: Any, *, tie: bool = True) -> Any:
    """``mask`` with ``leaf``'s sharding, without gathering either to one device or the host.

    Masks computed elementwise from a leaf already share its sharding; those computed from a
    reduction of it (unit or block norms), from nothing but its shape (random, all-True) or by a
    selection that reshapes need this.  Concrete arrays are moved device to device
    (``jax.device_put``) when their shardings differ.  Under ``jit`` with an explicit mesh the
    leaf's type names its sharding and the mask is resharded to it; with automatic (GSPMD/Shardy)
    sharding the mask is tied to the leaf by a select that reads it, so that the propagation
    gives the mask the leaf's sharding.  NumPy leaves and masks are returned unchanged.

    Args:
      mask: an array of ``leaf``'s shape (typically boolean).
      leaf: the parameter it belongs to.
      tie: under ``jit`` with automatic sharding, tie the mask to the leaf (False when the
        caller combines them elementwise anyway, which gives the same propagation).

    Returns:
      ``mask``, placed like ``leaf``.
    """
    if not is_jax(mask) or not is_jax(leaf) or np.shape(mask) != np.shape(leaf):
        return mask
    if not is_traced(leaf) and not is_traced(mask):
        if mask.sharding.is_equivalent_to(leaf.sharding, mask.ndim):
            return mask
        return jax.device_put(mask, leaf.sharding)
    sharding = getattr(jax.typeof(leaf), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    types = getattr(mesh, "axis_types", ())
    if any(t == jax.sharding.AxisType.Explicit for t in types):
        if jax.typeof(mask).sharding.spec != sharding.spec:
            mask = jax.sharding.reshard(mask, sharding)
        return mask
    return jnp.where(jnp.asarray(leaf) != 0, mask, mask) if tie else mask


def _use_jax(leaves: Sequence[Any], *extra: Any) -> bool:
    return any(is_jax(x) for x in leaves) or any(is_traced(e) for e in extra)


def _check_sparsity(value: Any, path: str) -> Any:
    return check_fraction(value, name="sparsity", path=path)


def _check_jax_range(
    paths: list[str], leaves: list[Any], selected: list[bool], use_jax: bool
) -> None:
    """Refuse NumPy 64-bit integer leaves whose values JAX (without x64) would wrap to 32 bits.

    With JAX leaves elsewhere in the tree or a traced argument the ranking runs in JAX, which
    without ``jax_enable_x64`` stores int64 as int32 and uint64 as uint32; values beyond those
    ranges would silently change the order, so they raise instead.
    """
    if not use_jax or jax.config.jax_enable_x64:
        return
    for p, leaf, s in zip(paths, leaves, selected, strict=True):
        if not s or is_jax(leaf):
            continue
        dt = np.dtype(dtype_of(leaf))
        if dt.kind in "iu" and dt.itemsize == 8 and np.size(leaf):
            info = np.iinfo(np.int32 if dt.kind == "i" else np.uint32)
            arr = np.asarray(leaf)
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(
                    f"leaf {p!r} ({dt}) holds values beyond {np.dtype(info.dtype)}, which JAX "
                    "without x64 cannot represent, and this call ranks in JAX (a JAX leaf or a "
                    "traced argument); pass all-NumPy params with a concrete sparsity, or enable "
                    "jax_enable_x64"
                )


def _validated(params: PyTree, where: Where | None) -> tuple[list[str], list[Any], Any, list[bool]]:
    """Flatten, select, and check every selected leaf: a real dtype, finite values."""
    paths, leaves, treedef = flatten(params)
    selected = select(paths, leaves, where)
    for p, leaf, s in zip(paths, leaves, selected, strict=True):
        if not s:
            continue
        dt = dtype_of(leaf)
        if not _is_real(dt):
            hint = (
                "; rank complex weights by np.abs(w) (or prune the real and imaginary parts "
                "as separate leaves) and pass that instead"
                if np.dtype(dt).kind == "c"
                else ""
            )
            raise TypeError(
                f"leaf {p!r} has dtype {dt}: magnitude pruning needs real numbers "
                f"(float, int or bool){hint}"
            )
        check_finite(p, leaf)
    return paths, leaves, treedef, selected


def _per_leaf_masks(
    treedef: Any, leaves: list[Any], values: list[Any], use_jax: bool, build: Any
) -> PyTree:
    """Masks ``build(index, leaf, value)`` where a leaf has a value, all-True elsewhere."""
    out = [
        _ones_like(leaf, use_jax) if v is None else place_like(build(i, leaf, v), leaf)
        for i, (leaf, v) in enumerate(zip(leaves, values, strict=True))
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def _sparsity_leaves(sparsity: Any) -> list[Any]:
    if isinstance(sparsity, Mapping | list | tuple):
        return jax.tree_util.tree_leaves(sparsity)
    return [sparsity]


def _int_residual(mag: Any, fdt: Any, use_jax: bool) -> Any:
    """``mag - fdt(mag)`` exactly, as a signed int: what rounding an unsigned magnitude to the
    float type ``fdt`` lost (modular arithmetic; the true value is far inside the range)."""
    xp = jnp if use_jax else np
    udt = np.uint64 if not use_jax or jax.config.jax_enable_x64 else np.uint32
    bits = 8 * np.dtype(udt).itemsize
    m = mag.astype(udt)
    f = m.astype(fdt)
    back = xp.where(f >= 2.0**bits, xp.zeros((), fdt), f).astype(udt)
    diff = m - back
    sdt = np.dtype(f"int{bits}")
    return jax.lax.bitcast_convert_type(diff, sdt) if use_jax else diff.view(sdt)


def _magnitude_dtype(dt: Any, use_jax: bool) -> np.dtype:
    """The dtype :func:`_abs_scores` gives a leaf of dtype ``dt``."""
    dt = np.dtype(jax.dtypes.canonicalize_dtype(dt) if use_jax else dt)
    if dt == np.bool_:
        return np.dtype(np.uint8)
    if dt.kind in "iu":
        return np.dtype(f"uint{8 * dt.itemsize}")
    return np.dtype(np.float32) if dt.itemsize < 4 else dt


@dataclass(frozen=True)
class _MagnitudeKey:
    """Selection key of a leaf: its exact magnitude in ``common`` (hashable, for ``jit``)."""

    common: str

    def __call__(self, leaf: Any) -> tuple[Any]:
        use_jax = is_jax(leaf)
        return (order_key(_abs_scores(leaf, use_jax).astype(self.common)),)


@dataclass(frozen=True)
class _MixedKey:
    """Two-level key of float and integer leaves ranked together: the magnitude rounded to the
    float type ``fdt``, then the integer remainder that rounding lost (0 for float leaves)."""

    fdt: str
    rdt: str

    def __call__(self, leaf: Any) -> tuple[Any, Any]:
        use_jax = is_jax(leaf)
        xp = jnp if use_jax else np
        mag = _abs_scores(leaf, use_jax)
        if np.dtype(mag.dtype).kind == "u":
            res = _int_residual(mag, np.dtype(self.fdt), use_jax).astype(self.rdt)
        else:
            res = xp.zeros(mag.shape, self.rdt)
        return order_key(mag.astype(self.fdt)), order_key(res)


def _global_keep(leaves: list[Any], sparsity: Any, use_jax: bool) -> list[Any]:
    """One exact ranking over the magnitudes of several leaves; one mask per leaf.

    Leaves of one kind (all floating, or all integer) are compared in their common type, which
    holds every value exactly.  Floating and integer leaves together are ranked by two keys: the
    magnitude rounded to a float type (float64; float32 under JAX without x64) and the integer
    remainder that rounding lost, so the order is exact for integers of any size as well.  The
    selection (:func:`prunejax.selection.keep_lowest`) computes the magnitudes inside its passes:
    no concatenation, no sort, each mask with its leaf's sharding.
    """
    dts = [_magnitude_dtype(dtype_of(x), use_jax) for x in leaves]
    n = sum(int(np.prod(np.shape(x), dtype=np.int64)) for x in leaves)
    k = _num_pruned(sparsity, n, use_jax)
    if len({d.kind for d in dts}) == 1:
        key: Any = _MagnitudeKey(np.result_type(*dts).name)
    else:
        fdt = np.float64 if not use_jax or jax.config.jax_enable_x64 else np.float32
        fdt = np.result_type(fdt, *[d for d in dts if d.kind == "f"])
        key = _MixedKey(np.dtype(fdt).name, "int32" if use_jax else "int64")
    return keep_lowest(leaves, k, keys=(key,) * len(leaves), use_jax=use_jax)


# ----------------------------------------------------------------------------- builders


def magnitude_masks(
    params: PyTree,
    sparsity: Any,
    *,
    scope: str = "layer",
    where: Where | None = None,
) -> PyTree:
    """Prune the weights with the smallest magnitude.

    Han, Pool, Tran & Dally (2015), "Learning both Weights and Connections for Efficient Neural
    Networks": zero the fraction ``sparsity`` of weights with the smallest ``|w|``.

    Args:
      params: any pytree of arrays.
      sparsity: fraction in ``[0, 1]`` of selected entries to prune; a number (static or traced
        under ``jit``/``vmap``) or, with ``scope="layer"``, a per-leaf mapping/pytree.
      scope: ``"layer"`` prunes ``round(s * n)`` entries of each selected leaf; ``"global"``
        prunes ``round(s * N)`` entries of all selected leaves together (one threshold), with
        ties broken by position in the flattened concatenation of the leaves.
      where: ``(path, leaf) -> bool`` selecting leaves to prune (default: ``ndim >= 2``).

    Returns:
      A pytree of boolean masks with the structure of ``params`` (True = kept).
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    paths, leaves, treedef, selected = _validated(params, where)
    use_jax = _use_jax(leaves, *_sparsity_leaves(sparsity))
    _check_jax_range(paths, leaves, selected, use_jax)
    if scope == "layer":
        values = per_leaf_values(sparsity, paths, selected, name="sparsity", check=_check_sparsity)

        def build(i: int, leaf: Any, s: Any) -> Any:
            return _global_keep([leaf], s, use_jax)[0]

        return _per_leaf_masks(treedef, leaves, values, use_jax, build)

    # global scope: one ranking over the concatenation of the selected leaves
    if isinstance(sparsity, Mapping | list | tuple):
        raise TypeError("scope='global' takes one sparsity number, not a per-leaf mapping")
    check_fraction(sparsity, name="sparsity")
    chosen = [i for i, s in enumerate(selected) if s]
    if not chosen:
        raise ValueError("no leaf is selected for pruning (check where=)")
    keep = _global_keep([leaves[i] for i in chosen], sparsity, use_jax)
    out = [_ones_like(leaf, use_jax) for leaf in leaves]
    for i, m in zip(chosen, keep, strict=True):
        out[i] = m
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_sibling_bias(
    paths: list[str], leaves: list[Any], i: int, width: int, layout: str
) -> None:
    """Refuse a kernel whose sibling named as its bias is no bias of its units (a Flax attention
    kernel ``(in, heads, head_dim)`` with its ``(heads, head_dim)`` bias, a wrong ``layout=``)."""
    for name in bias_names_for(split_layer_key(paths[i])[1]):
        sibling = sibling_path(paths[i], name)
        if sibling in paths:
            j = paths.index(sibling)
            raise ValueError(
                f"unit_masks: bias {paths[j]!r} of kernel {paths[i]!r} has shape "
                f"{np.shape(leaves[j])}, but the kernel has {width} output units along axis "
                f"{unit_axis(layout)} (layout={layout!r}); pass the layout the kernel uses, or "
                "exclude the kernel with where="
            )


def _warn_unpaired(
    paths: list[str],
    leaves: list[Any],
    values: list[Any],
    paired: set[int],
    widths: dict[int, tuple[int, bool]],
) -> None:
    """Warn about unpaired 1-D leaves of a pruned kernel's width: beside it (probably its bias
    under a naming ``dense_layers`` does not know) or elsewhere (a norm's scale/bias/statistics
    that may follow those units, which the pytree alone cannot tell)."""
    for i, (width, has_bias) in widths.items():
        lone = [
            j
            for j, leaf in enumerate(leaves)
            if j not in paired and values[j] is None and np.shape(leaf) == (width,)
        ]
        near = [paths[j] for j in lone if parent_path(paths[j]) == parent_path(paths[i])]
        if near and not has_bias:
            warnings.warn(
                f"unit_masks: kernel {paths[i]!r} has no paired bias, but the 1-D leaf "
                f"{near[0]!r} beside it has its width ({width}) and keeps all its entries; if it "
                "is the bias, name the pair kernel/bias (or w/b, W/b, w1/b1) or prune it with "
                "the kernel's unit mask",
                UserWarning,
                stacklevel=4,
            )
            continue
        far = [paths[j] for j in lone]
        if far:
            warnings.warn(
                f"unit_masks: the 1-D leaves {far[:4]} have the width ({width}) of the pruned "
                f"kernel {paths[i]!r} and keep all their entries; if one follows its units (a "
                "norm's scale/bias, BatchNorm mean/var), a pruned unit is not dead until it is "
                "masked too: set its mask from the kernel's unit mask, or compact through the "
                "computation graph (prunejax.graph), which follows it",
                UserWarning,
                stacklevel=4,
            )


def _unit_biases(
    paths: list[str], leaves: list[Any], values: list[Any], layers: list[Any], layout: str
) -> dict[int, int | None]:
    """The bias paired with every pruned kernel (``dense_layers``), checked for width.

    Raises for a paired bias, or a sibling named as the bias, that is no bias of the kernel's
    units; warns about unpaired 1-D leaves of a pruned kernel's width (``_warn_unpaired``).
    """
    bias_of = {layer.kernel: layer.bias for layer in layers}
    paired = {layer.bias for layer in layers if layer.bias is not None}
    widths: dict[int, tuple[int, bool]] = {}
    for i, v in enumerate(values):
        if v is None:
            continue
        width = np.shape(leaves[i])[unit_axis(layout)]
        b = bias_of.get(i)
        if b is not None and not is_bias_shape(np.shape(leaves[b]), np.shape(leaves[i]), layout):
            raise ValueError(
                f"unit_masks: bias {paths[b]!r} of kernel {paths[i]!r} has shape "
                f"{np.shape(leaves[b])}, but the kernel has {width} output units"
            )
        if b is None:
            _check_sibling_bias(paths, leaves, i, width, layout)
        widths[i] = (width, b is not None)
    _warn_unpaired(paths, leaves, values, paired, widths)
    return bias_of


_HEAD_NAMES = frozenset({"head", "lm_head", "classifier", "logits"})


def _name_parts(name: str) -> list[str]:
    """The keys of a layer name, split at ``/`` and PyTorch's ``.``."""
    return re.split(r"[/.]", name)


def _one_family(names: list[str]) -> bool:
    """Whether ``names`` are one numbered family under one parent (``Dense_0``, ``Dense_1``;
    ``fc1``, ``fc2``; ``layers/0``, ``layers/1``): their order is then the forward order."""
    found = [re.fullmatch(r"(.*?)(\d+)", n) for n in names]
    if not found or not all(found):
        return False
    prefixes = {m.group(1) for m in found if m}
    numbers = [int(m.group(2)) for m in found if m]
    return len(prefixes) == 1 and len(set(numbers)) == len(numbers)


def _guess_output(layers: list[Any]) -> tuple[Any, bool]:
    """The output layer in ``layers`` (natural order) and whether the order is unambiguous.

    The last layer named as a head (a key ``head``, ``lm_head``, ``classifier``, ``logits``) if
    any, else the last layer.  Unambiguous: a Keras-style sequence, one numbered family, or one
    head after one numbered family."""
    heads = [x for x in layers if _HEAD_NAMES & set(_name_parts(x.name))]
    out = heads[-1] if heads else layers[-1]
    if len(layers) == 1 or all(x.kind == "sequence" for x in layers):
        return out, True
    rest = [x.name for x in layers if x is not out]
    if _one_family([x.name for x in layers]):
        return out, out is layers[-1]
    return out, len(heads) == 1 and _one_family(rest)


def _named_output(paths: list[str], layers: list[Any], output: str) -> Any:
    """The layer whose kernel path or layer name is ``output``; raise if there is none."""
    for layer in layers:
        if output in (paths[layer.kernel], layer.name):
            return layer
    names = [paths[x.kernel] for x in layers]
    raise ValueError(f"unit_masks: output={output!r} names no kernel; the kernels are {names}")


def _keep_output(
    paths: list[str], values: list[Any], layers: list[Any], sparsity: Any, output: str | None
) -> list[Any]:
    """``values`` without the output layer's: ``output`` (a kernel path or layer name) or a
    guess (see ``_guess_output``; a named or sequence layer before an ``"unnamed"`` matrix),
    warning naming the guess where the forward order is ambiguous, and where keeping it leaves
    nothing pruned or drops a value the per-leaf ``sparsity`` gave it by name."""
    known = [layer for layer in layers if layer.kind != "unnamed"] or layers
    if output is not None:
        layer, sure = _named_output(paths, layers, output), True
    elif not known:
        return values
    else:
        layer, sure = _guess_output(known)
    out = layer.kernel
    if values[out] is None:
        return values
    values = list(values)
    values[out] = None
    if not sure:
        warnings.warn(
            f"unit_masks: took kernel {paths[out]!r} for the network's output layer and kept "
            "its units, but the forward order of the layers is not clear from their names; "
            "name the output kernel with output= (or pass prune_output=True)",
            UserWarning,
            stacklevel=3,
        )
    elif all(v is None for v in values) or isinstance(sparsity, Mapping | list | tuple):
        warnings.warn(
            f"unit_masks: kernel {paths[out]!r} is the network's output layer (the last in "
            "forward order), whose units are kept by default; pass prune_output=True to prune "
            "it",
            UserWarning,
            stacklevel=3,
        )
    return values


def _check_unit_rank(paths: list[str], leaves: list[Any], selected: list[bool]) -> None:
    """Raise naming the first selected leaf that is not a kernel (``ndim < 2``)."""
    for p, leaf, s in zip(paths, leaves, selected, strict=True):
        if s and np.ndim(leaf) < 2:
            raise ValueError(
                f"unit_masks needs kernels (ndim >= 2), but leaf {p!r} has shape "
                f"{np.shape(leaf)}; exclude it with where="
            )


def _unit_mask(leaf: Any, s: Any, ord: Any, axis: int, use_jax: bool) -> tuple[Any, Any]:
    """The mask of one kernel and its unit mask: units along ``axis`` ranked by the ``ord``-norm
    over all other axes."""
    xp = jnp if use_jax else np
    w = xp.moveaxis(xp.asarray(leaf).astype(_norm_dtype(leaf, use_jax)), axis, 0)
    rest = int(np.prod(w.shape[1:], dtype=np.int64))
    norms = xp.linalg.norm(w.reshape(w.shape[0], rest), ord=ord, axis=1)
    k = _num_pruned(s, norms.shape[0], use_jax)
    units = keep_lowest_k(norms, k, use_jax)
    shape = [1] * np.ndim(leaf)
    shape[axis] = -1
    return xp.broadcast_to(units.reshape(shape), np.shape(leaf)), units


def _equinox_layer(params: PyTree) -> str | None:
    """The path of the first Equinox ``Linear``/``Conv``/``ConvTranspose`` in ``params`` (their
    weights are ``(out, in)``), or ``None`` (also when Equinox is not imported)."""
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return None
    kinds = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, kinds))[0]
    return next((path_str(kp) for kp, x in flat if isinstance(x, kinds)), None)


def _unit_layout(params: PyTree, layout: str | None) -> str:
    """``layout``, or for ``None`` the one the tree's modules use: ``"out_in"`` for Equinox
    layers, else ``"in_out"``; an explicit ``"in_out"`` for Equinox layers is refused."""
    eqx_layer = _equinox_layer(params)
    if layout is None:
        return "in_out" if eqx_layer is None else "out_in"
    if layout == "in_out" and eqx_layer is not None:
        raise ValueError(
            f"unit_masks: {eqx_layer!r} is an Equinox layer, whose weight is (out, in), but "
            "layout='in_out' was given; pass layout='out_in' (or None to detect it)"
        )
    return layout


def _check_unit_args(ord: Any, layout: str, prune_output: Any, output: Any) -> int:
    """Check ``unit_masks``' options; return the units' axis."""
    if output is not None and not isinstance(output, str):
        raise TypeError(f"output must be a kernel path or layer name (str), got {output!r}")
    o = check_number(ord, name="ord")
    if not o > 0:
        raise ValueError(f"ord must be a positive number (1, 2, np.inf, ...), got {ord!r}")
    if not isinstance(prune_output, bool | np.bool_):
        raise TypeError(f"prune_output must be a bool, got {type(prune_output).__name__}")
    return unit_axis(layout)


def unit_masks(
    params: PyTree,
    sparsity: Any,
    *,
    ord: int | float = 2,
    where: Where | None = None,
    layout: str | None = None,
    prune_output: bool = False,
    output: str | None = None,
) -> PyTree:
    """Prune whole output units (neurons, conv filters) with the smallest norm, with their biases.

    Unit (neuron) pruning as in Molchanov et al. (2017), "Pruning Convolutional Neural Networks
    for Resource Efficient Inference" and Li et al. (2017), "Pruning Filters for Efficient
    ConvNets": rank the output units of each kernel by the ``ord``-norm of their weights over
    all other axes and prune ``round(s * units)`` of them, ties by unit index.  Units are the
    last axis under ``layout="in_out"`` (Flax/Keras ``(in, out)``; conv ``(h, w, in, out)``, a
    filter being one output channel), the first under ``"out_in"`` (Equinox, PyTorch
    ``(out, in)``; conv ``(out, in, h, w)``).  The bias entry of a pruned unit is pruned too,
    paired by :func:`prunejax._util.dense_layers`: ``kernel``/``bias`` siblings (also
    ``weight``/``bias``, ``w``/``b``, ``W``/``b``, ``w1``/``b1``, PyTorch ``fc1.weight``/
    ``fc1.bias``), the ``[W, b, ...]`` Keras list, Equinox ``Conv`` biases ``(out, 1, 1)``.

    The output layer (``output=``, else the last kernel in ``dense_layers``' natural order or
    the last named ``head``/``lm_head``/``classifier``/``logits``) keeps its units (classes)
    unless ``prune_output=True``.  Unless names give the forward order (a Keras/Equinox
    sequence, one family ``Dense_<n>``/``fc<n>``/``layers/<n>``, maybe then one head; not
    PyTorch ``features.*``/``classifier.*``), a ``UserWarning`` names the kernel guessed.

    Norm parameters that follow a unit (LayerNorm/BatchNorm ``scale``/``bias``, BatchNorm
    ``mean``/``var``) are not paired: the pytree alone does not say which layer they follow.  An
    unpaired 1-D leaf of a pruned kernel's width raises a ``UserWarning`` naming it; until it is
    masked too, a pruned unit is not dead.  The graph-based compaction of ``prunejax.graph``
    follows them through the computation.  Norms of integer kernels are float64 (float32 under
    JAX without x64).  Select layers with an ``ndim`` test, so biases stay out:
    ``where=lambda path, leaf: path.startswith("Dense_0/") and leaf.ndim >= 2``.

    Args:
      params: any pytree of arrays; every selected leaf must have ``ndim >= 2``.
      sparsity: fraction of units to prune per selected kernel; number or per-leaf mapping.
      ord: the norm order, a positive number (``2`` = L2, ``1`` = L1, ``np.inf`` = max).
      where: ``(path, leaf) -> bool`` selecting kernels (default: ``ndim >= 2``; a paired bias
        of ``ndim >= 2``, as Equinox's ``(out, 1, 1)``, follows its kernel).
      layout: ``"in_out"``, ``"out_in"``, or ``None``: ``"out_in"`` for a tree holding Equinox
        ``Linear``/``Conv`` modules (``eqx.partition(model, eqx.is_array)[0]``), else ``"in_out"``.
      prune_output: also prune the output layer's units.
      output: the output layer's kernel path or layer name (``"classifier.3"``); see above.

    Returns:
      A pytree of boolean masks (True = kept): whole units of kernels, matching bias entries.

    Raises:
      ValueError: a selected leaf is 1-D, a bias (or a sibling named as one) does not fit the
        kernel's units, a bad ``layout`` (``"in_out"`` for Equinox layers), ``ord <= 0`` or NaN,
        a bad sparsity, or an ``output`` naming no kernel.
      TypeError: a complex or non-numeric leaf; a bad ``ord``, ``prune_output`` or ``output``.
    """
    layout = _unit_layout(params, layout)
    axis = _check_unit_args(ord, layout, prune_output, output)
    paths, leaves, treedef, selected = _validated(params, where)
    _check_unit_rank(paths, leaves, selected)
    layers = dense_layers(params, layout=layout, conv=True)
    biases = {layer.bias for layer in layers if layer.bias is not None}
    selected = [s and i not in biases for i, s in enumerate(selected)]
    use_jax = _use_jax(leaves, *_sparsity_leaves(sparsity))
    _check_jax_range(paths, leaves, selected, use_jax)
    values = per_leaf_values(sparsity, paths, selected, name="sparsity", check=_check_sparsity)
    if not prune_output:
        values = _keep_output(paths, values, layers, sparsity, output)
    bias_of = _unit_biases(paths, leaves, values, layers, layout)
    out = [_ones_like(leaf, use_jax) for leaf in leaves]
    for i, (leaf, s) in enumerate(zip(leaves, values, strict=True)):
        if s is None:
            continue
        out[i], units = _unit_mask(leaf, s, ord, axis, use_jax)
        b = bias_of.get(i)
        if b is not None and not selected[b]:
            out[b] = units.reshape(np.shape(leaves[b]))
    out = [place_like(m, leaf) for m, leaf in zip(out, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def threshold_masks(
    params: PyTree,
    quality: Any,
    *,
    where: Where | None = None,
) -> PyTree:
    """Prune ``|w| < quality * std(w)`` per leaf.

    The threshold rule of Han, Pool, Tran & Dally (2015), "Learning both Weights and Connections
    for Efficient Neural Networks": each layer's threshold is a quality parameter times the
    standard deviation of that layer's weights.  Unlike :func:`magnitude_masks` the number of
    pruned weights is whatever the threshold gives.

    Args:
      params: any pytree of arrays.
      quality: non-negative finite number, or a per-leaf mapping/pytree of them.
      where: ``(path, leaf) -> bool`` selecting leaves (default: ``ndim >= 2``).

    Returns:
      A pytree of boolean masks (True = kept).
    """

    def check_quality(q: Any, path: str) -> Any:
        if is_traced(q):
            return q
        f = check_number(q, name=f"quality for leaf {path!r}")
        if not np.isfinite(f) or f < 0:
            raise ValueError(f"quality for leaf {path!r} must be finite and >= 0, got {q!r}")
        return f  # a concrete JAX scalar would turn NumPy results into JAX arrays

    paths, leaves, treedef, selected = _validated(params, where)
    use_jax = _use_jax(leaves, *_sparsity_leaves(quality))
    _check_jax_range(paths, leaves, selected, use_jax)
    xp = jnp if use_jax else np
    values = per_leaf_values(quality, paths, selected, name="quality", check=check_quality)

    def build(i: int, leaf: Any, q: Any) -> Any:
        w = xp.asarray(leaf).astype(_norm_dtype(leaf, use_jax))
        return xp.abs(w) >= q * xp.std(w)

    return _per_leaf_masks(treedef, leaves, values, use_jax, build)


def _group_ranks(groups: Any, m: int, use_jax: bool) -> Any:
    """The rank of every entry within its group (last axis), ties by index: a stable argsort's
    ranks, counted pairwise for small groups (elementwise, so sharding-preserving)."""
    if not use_jax or m > 32:
        xp = jnp if use_jax else np
        order = (
            jnp.argsort(groups, axis=-1, stable=True)
            if use_jax
            else np.argsort(groups, axis=-1, kind="stable")
        )
        return xp.argsort(order, axis=-1)
    pos = jax.lax.broadcasted_iota(jnp.int32, groups.shape, groups.ndim - 1)
    ranks = jnp.zeros(groups.shape, jnp.int32)
    for j in range(m):
        other = groups[..., j : j + 1]
        ranks = ranks + ((other < groups) | ((other == groups) & (j < pos))).astype(jnp.int32)
    return ranks


def nm_masks(
    params: PyTree,
    n: int,
    m: int,
    *,
    axis: int = 0,
    where: Where | None = None,
) -> PyTree:
    """N:M structured sparsity: keep the ``n`` largest-magnitude entries of every ``m``.

    Mishra et al. (2021), "Accelerating Sparse Deep Neural Networks" (2:4 sparsity on NVIDIA
    Ampere/Hopper sparse tensor cores); Zhou et al. (2021), "Learning N:M Fine-grained Structured
    Sparse Neural Networks From Scratch".  Groups are ``m`` consecutive entries along ``axis``
    (default 0, the input axis of an ``(in, out)`` kernel, which is the reduction axis of
    ``x @ W``); within a group ties are broken by index, lower index pruned first.

    Args:
      params: any pytree of arrays.
      n: entries kept per group, ``0 <= n <= m``.
      m: group size, ``m >= 1``; ``leaf.shape[axis]`` must be divisible by ``m``.
      axis: the grouping axis of each selected leaf.
      where: ``(path, leaf) -> bool`` selecting leaves (default: ``ndim >= 2``).

    Returns:
      A pytree of boolean masks (True = kept), exactly ``n`` True per group.
    """
    check_int(n, name="n")
    check_int(m, name="m", minimum=1)
    check_int(axis, name="axis")
    if not 0 <= n <= m:
        raise ValueError(f"n must be in [0, m] = [0, {m}], got n={n}")
    paths, leaves, treedef, selected = _validated(params, where)
    use_jax = _use_jax(leaves)
    _check_jax_range(paths, leaves, selected, use_jax)
    xp = jnp if use_jax else np
    out = []
    for p, leaf, s in zip(paths, leaves, selected, strict=True):
        if not s:
            out.append(_ones_like(leaf, use_jax))
            continue
        shape = np.shape(leaf)
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"axis {axis} is out of range for leaf {p!r} of shape {shape}")
        if shape[axis] % m:
            raise ValueError(
                f"leaf {p!r} has shape {shape}: dimension {shape[axis]} along axis {axis} "
                f"is not divisible by m={m}"
            )
        w = xp.moveaxis(_abs_scores(leaf, use_jax), axis, -1)
        moved = w.shape
        groups = split_axis(w, w.ndim - 1, m)  # no merge of axes: no resharding
        keep = (_group_ranks(groups, m, use_jax) >= m - n).reshape(moved)
        out.append(place_like(xp.moveaxis(keep, -1, axis), leaf))
    return jax.tree_util.tree_unflatten(treedef, out)


def block_masks(
    params: PyTree,
    sparsity: Any,
    *,
    block: tuple[int, int] = (16, 16),
    where: Where | None = None,
) -> PyTree:
    """Prune whole ``(bh, bw)`` blocks with the smallest L2 (Frobenius) norm.

    Block sparsity as in Gray, Radford & Kingma (2017), "GPU Kernels for Block-Sparse Weights"
    and Narang et al. (2017), "Block-Sparse Recurrent Neural Networks": the block grid of each
    2-D kernel is ranked by block norm and ``round(s * num_blocks)`` blocks are pruned, ties by
    row-major block index.

    Args:
      params: any pytree of arrays; selected leaves must be 2-D with shapes divisible by
        ``block`` (no implicit padding).
      sparsity: fraction of blocks to prune; number or per-leaf mapping.
      block: ``(bh, bw)`` block shape.
      where: ``(path, leaf) -> bool`` selecting leaves (default: ``ndim >= 2``).

    Returns:
      A pytree of boolean masks (True = kept), constant on every block.
    """
    bh, bw = check_block(block)
    paths, leaves, treedef, selected = _validated(params, where)
    for p, leaf, s in zip(paths, leaves, selected, strict=True):
        if not s:
            continue
        shape = np.shape(leaf)
        if len(shape) != 2:
            raise ValueError(
                f"block_masks needs 2-D kernels, but leaf {p!r} has shape {shape}; "
                "exclude it with where="
            )
        if shape[0] % bh or shape[1] % bw:
            raise ValueError(
                f"leaf {p!r} of shape {shape} is not divisible into ({bh}, {bw}) blocks"
            )
    use_jax = _use_jax(leaves, *_sparsity_leaves(sparsity))
    _check_jax_range(paths, leaves, selected, use_jax)
    xp = jnp if use_jax else np
    values = per_leaf_values(sparsity, paths, selected, name="sparsity", check=_check_sparsity)

    def build(i: int, leaf: Any, s: Any) -> Any:
        r, c = np.shape(leaf)
        w = xp.asarray(leaf).astype(_norm_dtype(leaf, use_jax))
        blocks = split_axis(split_axis(w, 1, bw), 0, bh)  # (r // bh, bh, c // bw, bw)
        norms = xp.sqrt(xp.sum(blocks * blocks, axis=(1, 3)))
        k = _num_pruned(s, int(np.size(norms)), use_jax)
        keep = keep_lowest_k(norms, k, use_jax)  # ties by row-major block index
        return repeat_axis(repeat_axis(keep, bh, 0), bw, 1)

    return _per_leaf_masks(treedef, leaves, values, use_jax, build)


def random_masks(
    key: jax.Array,
    params: PyTree,
    sparsity: Any,
    *,
    where: Where | None = None,
) -> PyTree:
    """Prune a uniformly random subset of exactly ``round(s * n)`` entries per selected leaf.

    The control baseline of pruning studies (e.g. Liu et al. 2019, "Rethinking the Value of
    Network Pruning"; Frankle & Carbin 2019).  Deterministic in ``key``; each leaf uses
    ``jax.random.fold_in(key, leaf_index)``.

    Args:
      key: a ``jax.random`` key (``jax.random.key(0)`` or ``jax.random.PRNGKey(0)``).
      params: any pytree of arrays (values unused; shapes and selection only).
      sparsity: fraction to prune; number or per-leaf mapping.
      where: ``(path, leaf) -> bool`` selecting leaves (default: ``ndim >= 2``).

    Returns:
      A pytree of boolean masks (True = kept).
    """
    paths, leaves, treedef = flatten(params)
    selected = select(paths, leaves, where)
    use_jax = _use_jax(leaves, *_sparsity_leaves(sparsity))
    values = per_leaf_values(sparsity, paths, selected, name="sparsity", check=_check_sparsity)

    def build(i: int, leaf: Any, s: Any) -> Any:
        size = int(np.prod(np.shape(leaf), dtype=np.int64))
        # drawn in the leaf's shape: the same numbers as a flat draw, and no reshape to reshard
        k = _num_pruned(s, size, True)

        def draw() -> Any:
            scores = jax.random.uniform(jax.random.fold_in(key, i), np.shape(leaf))
            return keep_lowest_k(scores, k, True)

        if is_jax(leaf) and not is_traced(leaf) and not is_traced(key):
            return jax.jit(draw, out_shardings=leaf.sharding)()  # drawn shard by shard
        return place_like(draw(), leaf) if use_jax else np.asarray(draw())

    return _per_leaf_masks(treedef, leaves, values, use_jax, build)


# ----------------------------------------------------------------------------- mask algebra


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Zero the pruned entries: ``where(mask, param, 0)`` leaf by leaf, dtypes preserved.

    Args:
      params: any pytree of arrays.
      masks: boolean pytree of the same structure and shapes.

    Returns:
      The pruned params: the same kinds of arrays and dtypes as ``params`` (NumPy params give
      NumPy results even with JAX masks, unless the masks are traced under ``jit``).

    Raises:
      ValueError: structures or shapes differ (the message names the leaf).
      TypeError: a mask leaf is not boolean.
    """
    _, leaves, mleaves, treedef = check_same_structure(params, masks)
    out = []
    for leaf, m in zip(leaves, mleaves, strict=True):
        if is_jax(leaf) or is_traced(m):
            out.append(jnp.where(m, leaf, jnp.zeros((), jnp.asarray(leaf).dtype)))
        else:  # NumPy params stay NumPy (and float64 stays float64) even with JAX masks
            out.append(np.where(np.asarray(m), leaf, np.zeros((), dtype_of(leaf))))
    return jax.tree_util.tree_unflatten(treedef, out)


def combine(masks: PyTree, *others: PyTree) -> PyTree:
    """Logical AND of two or more mask trees (an entry is kept only if every tree keeps it).

    Args:
      masks: a boolean pytree.
      *others: more boolean pytrees of the same structure and shapes.

    Returns:
      The intersection mask tree.
    """
    if not others:
        raise TypeError("combine needs at least two mask trees")
    paths, leaves, treedef = flatten(masks, what="masks")
    for p, leaf in zip(paths, leaves, strict=True):
        if dtype_of(leaf) != np.bool_:
            raise TypeError(f"masks leaf {p!r} has dtype {dtype_of(leaf)}, expected bool")
    for other in others:
        _, _, oleaves, _ = check_same_structure(masks, other)
        leaves = [
            (jnp.logical_and if is_jax(a) or is_jax(b) else np.logical_and)(a, b)
            for a, b in zip(leaves, oleaves, strict=True)
        ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class SparsityReport:
    """Per-leaf and total counts of kept entries; ``str(report)`` is a readable table.

    Attributes:
      rows: one dict per leaf: ``path``, ``shape``, ``kept``, ``total``, ``sparsity``.
      kept: kept entries over all leaves.
      total: entries over all leaves.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    kept: int = 0
    total: int = 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def to_dict(self) -> dict[str, Any]:
        return {
            "leaves": [dict(r) for r in self.rows],
            "kept": self.kept,
            "total": self.total,
            "sparsity": self.sparsity,
        }

    def __str__(self) -> str:
        header = ("leaf", "shape", "kept", "total", "kept %", "sparsity")
        body = [
            (
                r["path"],
                "x".join(map(str, r["shape"])) or "scalar",
                f"{r['kept']:,}",
                f"{r['total']:,}",
                f"{100 * (1 - r['sparsity']):.2f}",
                f"{r['sparsity']:.4f}",
            )
            for r in self.rows
        ]
        body.append(
            (
                "total",
                "",
                f"{self.kept:,}",
                f"{self.total:,}",
                f"{100 * self.density:.2f}",
                f"{self.sparsity:.4f}",
            )
        )
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]

        def fmt(row: Sequence[str]) -> str:
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
            return "  ".join(cells).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([fmt(header), rule, *map(fmt, body[:-1]), rule, fmt(body[-1])])


def sparsity_report(tree: PyTree, *, where: Where | None = None) -> SparsityReport:
    """Count kept entries per leaf of params (nonzeros) or masks (True entries).

    Args:
      tree: a params pytree (kept = nonzero) or a boolean mask pytree (kept = True).
      where: optional ``(path, leaf) -> bool`` restricting which leaves are reported
        (default: all leaves, biases included).

    Returns:
      A :class:`SparsityReport`; ``print(report)`` shows the table, ``report.to_dict()`` the data.
    """
    paths, leaves, _ = flatten(tree)
    chosen = select(paths, leaves, where) if where is not None else [True] * len(paths)
    rows = []
    kept_total = total = 0
    for p, leaf, c in zip(paths, leaves, chosen, strict=True):
        if not c:
            continue
        if hasattr(leaf, "todense") and not isinstance(leaf, np.ndarray | jax.Array):
            leaf = leaf.todense()
        arr = np.asarray(leaf)
        kept = int(np.count_nonzero(arr))
        n = int(arr.size)
        rows.append(
            {
                "path": p,
                "shape": tuple(int(d) for d in arr.shape),
                "kept": kept,
                "total": n,
                "sparsity": 1.0 - kept / n if n else 0.0,
            }
        )
        kept_total += kept
        total += n
    return SparsityReport(rows=rows, kept=kept_total, total=total)
