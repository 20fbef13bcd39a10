"""The pytree structure of saved params as JSON, and the tree rebuilt from it.

Nodes are ``{"dict": [[key, node], ...]}`` (keys are JSON strings or integers),
``{"frozendict": [...]}`` (Flax ``FrozenDict``), ``{"list": [node, ...]}``, ``{"tuple": [...]}``,
``{"none": null}`` and ``{"leaf": index}``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from prunejax._util import PyTree, is_matrix_object, path_str
from prunejax.fileformat.errors import FileFormatError
from prunejax.quantize import is_quantized

__all__ = ["describe_structure", "rebuild_structure"]


def describe_structure(node: Any, index_of: dict[str, int], keypath: tuple = ()) -> dict:
    """The JSON structure node of ``node``.

    Args:
      node: a params (sub)tree of dicts, Flax ``FrozenDict``s, lists, tuples, ``None`` and arrays
        (sparse kernel objects and ``Quantized`` leaves count as arrays).
      index_of: leaf path (``prunejax._util.path_str``) -> leaf index.
      keypath: the key path of ``node`` in the whole tree.

    Returns:
      The node, JSON-serialisable.

    Raises:
      TypeError: an unsupported container or dict key.
    """
    if (
        is_matrix_object(node)
        or is_quantized(node)
        or isinstance(node, np.ndarray | np.generic | jax.Array)
    ):
        return {"leaf": index_of[path_str(keypath)]}
    if node is None:
        return {"none": None}
    kind = None
    if type(node) is dict:
        kind = "dict"
    else:
        try:
            from flax.core import FrozenDict
        except ImportError:  # pragma: no cover - flax is a dependency
            FrozenDict = ()  # noqa: N806
        if FrozenDict and isinstance(node, FrozenDict):
            kind = "frozendict"
    if kind is not None:
        items = []
        for k, v in node.items():
            if not isinstance(k, str | int) or isinstance(k, bool):
                raise TypeError(
                    f"cannot save params: dict key {k!r} at {path_str(keypath)!r} is a "
                    f"{type(k).__name__}; only str and int keys are supported"
                )
            items.append(
                [k, describe_structure(v, index_of, keypath + (jax.tree_util.DictKey(k),))]
            )
        return {kind: items}
    if type(node) in (list, tuple):
        children = [
            describe_structure(v, index_of, keypath + (jax.tree_util.SequenceKey(i),))
            for i, v in enumerate(node)
        ]
        return {type(node).__name__: children}
    raise TypeError(
        f"cannot save params: node at {path_str(keypath)!r} is a {type(node).__name__}; "
        "supported containers are dict, Flax FrozenDict, list, tuple and None"
    )


def rebuild_structure(node: Any, leaves: list[Any], used: set[int]) -> PyTree:
    """The tree a structure node describes, with its leaves taken from ``leaves``.

    Args:
      node: a structure node from a file's header.
      leaves: the decoded leaves, by index.
      used: the leaf indices used so far (updated; the caller checks every leaf is used once).

    Returns:
      The rebuilt (sub)tree.

    Raises:
      FileFormatError: a malformed node or a bad or repeated leaf reference.
    """
    if not isinstance(node, dict) or len(node) != 1:
        raise FileFormatError("corrupted header: malformed structure node")
    ((kind, value),) = node.items()
    if kind == "leaf":
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value < len(leaves)
            or value in used
        ):
            raise FileFormatError(f"corrupted header: bad leaf reference {value!r}")
        used.add(value)
        return leaves[value]
    if kind == "none":
        if value is not None:
            raise FileFormatError("corrupted header: malformed none node")
        return None
    if kind in ("list", "tuple"):
        if not isinstance(value, list):
            raise FileFormatError("corrupted header: malformed sequence node")
        seq = [rebuild_structure(v, leaves, used) for v in value]
        return seq if kind == "list" else tuple(seq)
    if kind in ("dict", "frozendict"):
        if not isinstance(value, list):
            raise FileFormatError("corrupted header: malformed dict node")
        out = {}
        for item in value:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str | int)
                or isinstance(item[0], bool)
            ):
                raise FileFormatError("corrupted header: malformed dict item")
            if item[0] in out:
                raise FileFormatError(f"corrupted header: duplicate dict key {item[0]!r}")
            out[item[0]] = rebuild_structure(item[1], leaves, used)
        if len({type(k) for k in out}) > 1:
            raise FileFormatError("corrupted header: a dict mixes str and int keys")
        if kind == "frozendict":
            from flax.core import FrozenDict

            return FrozenDict(out)
        return out
    raise FileFormatError(f"corrupted header: unknown structure node kind {kind!r}")
