"""Checkpoints: any pytree (params, masks, optimizer state) plus JSON metadata in one file,
written atomically and checked leaf by leaf when read back."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from prunejax._util import PyTree, atomic_write_bytes, path_str

__all__ = [
    "CheckpointError",
    "leaf_shapes",
    "load_checkpoint",
    "restore_checkpoint",
    "save_checkpoint",
]

_FORMAT = "prunejax-checkpoint"
_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt, or was written for a different model/run."""


def save_checkpoint(path: str | os.PathLike, tree: PyTree, meta: dict | None = None) -> None:
    """Write ``tree`` (any pytree: params, masks, optimizer state) and JSON ``meta`` atomically.

    The file is flax msgpack (``flax.serialization``) of ``{"format", "version", "meta",
    "sha256", "state"}``, written with :func:`prunejax._util.atomic_path`: an interrupted write
    never leaves a partial file behind.

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
    atomic_write_bytes(path, flax.serialization.msgpack_serialize(payload))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a checkpoint without a template.

    Args:
      path: the checkpoint file.

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


def leaf_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{leaf path: (shape, dtype name)}`` of a pytree (paths as ``"params/Dense_0/kernel"``).

    Args:
      tree: any pytree of arrays.

    Returns:
      One entry per leaf.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(kp): (tuple(np.shape(v)), str(np.result_type(v))) for kp, v in flat}


def _check_leaves(path: Any, want: dict, have: dict) -> None:
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
    want = leaf_shapes(flax.serialization.to_state_dict(jax.device_get(template)))
    _check_leaves(path, want, leaf_shapes(state))
    tree = flax.serialization.from_state_dict(template, state)
    tree = jax.tree_util.tree_map(jnp.asarray, tree)
    return tree, meta
