"""Saving and loading sharded trees (params, masks, optimizer state) across devices and processes.

A tree of arrays sharded over many devices, possibly over several JAX processes, is written with
orbax-checkpoint (tensorstore, OCDBT): every shard is written once, by the process that holds its
first replica, and nothing is gathered to one device or to the host.  Loading restores each leaf
directly onto the sharding asked for (which may differ from the one it was saved with); every
process reads only the pieces its devices hold.

Every process of a multi-process run calls :func:`save_sharded` and :func:`load_sharded` with
the same arguments (they are collective); the directory must be one all processes see.  A new
save is atomic: orbax writes to a temporary directory and renames it when every process is done,
so a crash leaves no half-written checkpoint under ``path``.  ``overwrite=True`` replaces only a
directory that holds an orbax checkpoint, and orbax removes the old one before it writes the new
one: a crash during such a save leaves neither.  orbax-checkpoint is an optional
dependency (``pip install prunejax[sharded]``), imported on first use.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from prunejax._util import PyTree, flatten, path_str

__all__ = ["save_sharded", "load_sharded"]

_MARKER = "_CHECKPOINT_METADATA"  # orbax writes it into every checkpoint directory


def _ocp() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError(
            "saving sharded trees needs orbax-checkpoint: pip install 'prunejax[sharded]'"
        ) from e
    return ocp


def _check_tree(tree: PyTree, what: str) -> None:
    paths, leaves, _ = flatten(tree, what=what)
    for p, leaf in zip(paths, leaves, strict=True):
        if not isinstance(leaf, jax.Array | np.ndarray | np.generic):
            raise TypeError(f"{what} leaf {p!r} is a {type(leaf).__name__}, not an array")


def save_sharded(path: str | os.PathLike, tree: PyTree, *, overwrite: bool = False) -> None:
    """Write a (sharded) tree of arrays, each shard once, without gathering it.

    Args:
      path: the checkpoint directory (created; must not exist unless ``overwrite``).  With
        several processes, a directory every process sees, and the same on every process.
      tree: a pytree of JAX arrays (any shardings, across processes too) or NumPy arrays.
      overwrite: replace an existing checkpoint at ``path``.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False, or ``path`` exists and is
        not a checkpoint directory (a file, or a directory without orbax's
        ``_CHECKPOINT_METADATA``): nothing that is not a checkpoint is ever replaced.
      TypeError: a leaf is not an array (the message names it).
    """
    _check_tree(tree, "tree")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, _MARKER)):
            raise FileExistsError(f"{path} exists and is not a sharded checkpoint; not replaced")
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, tree, force=overwrite)
        ckpt.wait_until_finished()


def load_sharded(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Read a tree written by :func:`save_sharded` onto the shardings of ``like``.

    Args:
      path: the checkpoint directory.
      like: a pytree with the saved tree's structure whose leaves give each leaf's shape, dtype
        and sharding: ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` (nothing allocated)
        or arrays placed as wanted.  The sharding may differ from the saved one.

    Returns:
      The tree, every leaf a ``jax.Array`` with the sharding of its ``like`` leaf.

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      ValueError: the saved tree's structure, shapes or dtypes differ from ``like``'s (the
        message names the leaf).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no sharded checkpoint at {path}")
    target = jax.tree_util.tree_map(_abstract, like)
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckpt:
        _check_saved(ckpt.metadata(path), target)
        return ckpt.restore(path, target)


def _check_saved(metadata: Any, target: PyTree) -> None:
    """Raise naming the first leaf whose saved shape or dtype differs from ``target``'s."""
    saved = getattr(metadata, "item_metadata", metadata)
    saved = getattr(saved, "tree", saved)
    s_flat = jax.tree_util.tree_flatten_with_path(saved)[0]
    t_flat = jax.tree_util.tree_flatten_with_path(target)[0]
    s_paths, s_leaves = [path_str(k) for k, _ in s_flat], [x for _, x in s_flat]
    t_paths, t_leaves = [path_str(k) for k, _ in t_flat], [x for _, x in t_flat]
    if s_paths != t_paths:
        raise ValueError(f"the checkpoint holds leaves {s_paths}, like= has {t_paths}")
    for p, s, t in zip(s_paths, s_leaves, t_leaves, strict=True):
        if tuple(s.shape) != tuple(t.shape) or np.dtype(s.dtype) != np.dtype(t.dtype):
            raise ValueError(
                f"leaf {p!r} was saved as {np.dtype(s.dtype)}{list(s.shape)}, like= asks for "
                f"{np.dtype(t.dtype)}{list(t.shape)}"
            )


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        if x.sharding is None:
            raise ValueError(f"like leaf {x} has no sharding; give one (NamedSharding, ...)")
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    raise TypeError(f"like leaves must be jax.ShapeDtypeStruct or jax.Array, got {type(x)}")
