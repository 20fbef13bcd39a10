"""Compacted files: the MLP saved with its dead units removed, and the record to restore them.

A compacted file holds the compacted leaves (``prunejax.compact.compact``), a ``compaction``
header record (the activation's name and, per dense layer, its kernel and bias leaf indices and
ORIGINAL widths) and one ``kept.<layer>`` member per layer: the original indices of the units
the layer keeps.  ``expand`` re-inserts the removed units as zeros.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np

from prunejax._util import PyTree, dense_layers, is_matrix_object
from prunejax.compact import compact, compaction_plan
from prunejax.fileformat.dtypes import index_dtype
from prunejax.fileformat.errors import FileFormatError

__all__ = ["compact_arrays", "check_record", "kept_members", "expand"]


def _activation_name(activation: Callable | None) -> str | None:
    if activation is None:
        return None
    return str(getattr(activation, "__name__", type(activation).__name__))


def _slice_arrays(tree: PyTree, arrays: list[np.ndarray]) -> tuple[list, list[np.ndarray]]:
    """Compaction by slicing only (no folding): exact shapes, unfolded biases."""
    layers = dense_layers(tree)
    kept = compaction_plan(tree)
    rows = [np.arange(arrays[layers[0].kernel].shape[0])] + kept[:-1]
    new = list(arrays)
    for layer, r, c in zip(layers, rows, kept, strict=True):
        new[layer.kernel] = arrays[layer.kernel][np.ix_(r, c)]
        if layer.bias is not None:
            new[layer.bias] = arrays[layer.bias][c]
    return new, kept


def compact_arrays(
    params: PyTree,
    arrays: list[np.ndarray],
    activation: Callable | None,
    *,
    structural: bool = False,
) -> tuple[list[np.ndarray], dict, list[np.ndarray]]:
    """Compact the leaves of an MLP for saving.

    Args:
      params: the params tree (its structure is used; sparse kernel objects count as leaves).
      arrays: its dense, masked NumPy leaves in flatten order.
      activation: the nonlinearity through which dead units' constant outputs are folded into
        the next biases.
      structural: with ``activation=None``, compact by slicing only, without folding (exact
        shapes and sizes, not the folded bias values; for size predictions).

    Returns:
      ``(leaves, record, kept)``: the compacted leaves, the header's ``compaction`` record and
      the ``kept`` member arrays (one per layer, in the smallest unsigned index dtype).

    Raises:
      ValueError: the params are not a compactable MLP.
    """
    tree = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(params, is_leaf=is_matrix_object), arrays
    )
    layers = dense_layers(tree)
    if structural and activation is None:
        new, kept = _slice_arrays(tree, arrays)
    else:
        small, kept = compact(tree, activation=activation)
        new = [np.asarray(x) for x in jax.tree_util.tree_leaves(small)]
    record = {
        "activation": _activation_name(activation),
        "layers": [
            {
                "name": layer.name,
                "kernel": layer.kernel,
                "bias": layer.bias,
                "in": int(arrays[layer.kernel].shape[0]),
                "out": int(arrays[layer.kernel].shape[1]),
            }
            for layer in layers
        ],
    }
    kept = [
        k.astype(index_dtype(max(lay["out"] - 1, 0)))
        for k, lay in zip(kept, record["layers"], strict=True)
    ]
    return new, record, kept


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_record(header: Mapping) -> list[dict]:
    """The layers of a header's compaction record, validated against its leaves.

    Args:
      header: a file's JSON header (its ``leaves`` already validated).

    Returns:
      The record's layers (empty for an uncompacted file).

    Raises:
      ValueError: a malformed record (indices out of range, kernels that are not 2-D, widths
        that do not fit the kernels).
    """
    comp = header.get("compaction")
    if comp is None:
        return []
    leaves = header["leaves"]
    if not isinstance(comp, dict) or not isinstance(comp.get("layers"), list):
        raise ValueError("malformed compaction record")
    act = comp.get("activation")
    if act is not None and not isinstance(act, str):
        raise ValueError("malformed compaction record (activation)")
    seen: set[int] = set()
    for j, lay in enumerate(comp["layers"]):
        if not isinstance(lay, dict) or not isinstance(lay.get("name"), str):
            raise ValueError(f"malformed compaction record (layer {j})")
        k, b = lay.get("kernel"), lay.get("bias")
        width_in, width_out = lay.get("in"), lay.get("out")
        refs = [k] if b is None else [k, b]
        if not all(_is_int(r) and 0 <= r < len(leaves) and r not in seen for r in refs):
            raise ValueError(f"compaction layer {j} refers to bad leaf indices")
        seen.update(refs)
        kshape = leaves[k]["shape"]
        if len(kshape) != 2 or (b is not None and leaves[b]["shape"] != [kshape[1]]):
            raise ValueError(f"compaction layer {j}: kernel or bias of the wrong rank")
        if not (_is_int(width_in) and _is_int(width_out)):
            raise ValueError(f"compaction layer {j} has bad widths")
        if not (kshape[0] <= width_in <= 2**48 and kshape[1] <= width_out <= 2**48):
            raise ValueError(f"compaction layer {j}: widths {width_in}x{width_out} do not fit")
    return comp["layers"]


def kept_members(header: Mapping) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """``(member name, shape, dtype)`` of the ``kept`` members a header calls for.

    Args:
      header: a file's JSON header (its ``leaves`` already validated).

    Returns:
      One triple per compacted layer (none for an uncompacted file).

    Raises:
      ValueError: a malformed compaction record.
    """
    out = []
    for j, lay in enumerate(check_record(header)):
        n_kernel = header["leaves"][lay["kernel"]]["shape"][1]
        out.append((f"kept.{j}", (int(n_kernel),), index_dtype(max(int(lay["out"]) - 1, 0))))
    return out


def expand(leaves: list[np.ndarray], comp: Mapping, kept: list[np.ndarray]) -> list[np.ndarray]:
    """Re-insert the units a compacted file removed, as zeros: every leaf gets its original shape.

    Args:
      leaves: the decoded (compacted) leaves.
      comp: the header's ``compaction`` record.
      kept: the ``kept`` member arrays, one per layer.

    Returns:
      The leaves at their original shapes.

    Raises:
      FileFormatError: the record does not fit the kernels.
    """
    out = list(leaves)
    prev = None
    for lay, cols in zip(comp["layers"], kept, strict=True):
        cols = cols.astype(np.int64)
        k = leaves[lay["kernel"]]
        if prev is None and k.shape[0] != lay["in"]:
            raise FileFormatError("corrupted header: compaction record does not fit the kernels")
        rows = np.arange(lay["in"]) if prev is None else prev
        if (
            k.shape != (rows.size, cols.size)
            or np.any(cols >= lay["out"])
            or np.any(rows >= lay["in"])
            or np.any(np.diff(cols) <= 0)
        ):
            raise FileFormatError("corrupted header: compaction record does not fit the kernels")
        big = np.zeros((lay["in"], lay["out"]), k.dtype)
        big[np.ix_(rows, cols)] = k
        out[lay["kernel"]] = big
        if lay["bias"] is not None:
            b = leaves[lay["bias"]]
            full = np.zeros(lay["out"], b.dtype)
            full[cols] = b
            out[lay["bias"]] = full
        prev = cols
    return out
