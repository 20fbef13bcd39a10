"""Training checkpoints: any pytree (params, masks, optimizer state) plus JSON metadata in one
file, written atomically, with one SHA-256 over every byte before it.

File layout (format version 2)::

    magic      8 bytes   b"\\x89PJCK\\r\\n\\x1a"
    version    4 bytes   little-endian uint32, 2
    body       msgpack   {"meta": <JSON text>, "state": <flax state dict of NumPy arrays>}
    sha256     32 bytes  SHA-256 of magic + version + body

The hash is checked before anything is parsed, so a truncation or a flipped bit anywhere (the
metadata included: epoch, history, run config) raises :class:`CheckpointError`, never a
``KeyError`` or a silent resume from another state.  A file whose hash was recomputed after an
edit is a valid file: the hash detects damage, it is not a signature.  :func:`restore_checkpoint`
then checks every leaf's path, shape and dtype against a template, and the training loop checks
the metadata (run settings, epoch, history) against the run it resumes.

Format version 1 (prunejax 0.1.0: msgpack with the hash over the arrays only) is refused with a
:class:`CheckpointError` telling the user to start afresh: its metadata was never checked, so
resuming from it could not be trusted.

Why not orbax-checkpoint (measured on an AMD EPYC with AVX-512, 2 cores, orbax-checkpoint 0.12.8,
``Checkpointer(CompositeCheckpointHandler())`` with ``StandardSave`` + ``JsonSave``, on
LeNet-300-100 params + Adam state + masks, 3.47 MB raw): (1) it keeps no content hash: in two
sweeps of 200 random single-bit flips over a checkpoint's files, 24 and 17 restored silently
changed arrays or metadata (19 of the 22 flips that hit the array data file in the first), 131 and
140 restored exactly, and the rest raised four exception types (``KeyError``, ``JSONDecodeError``,
``UnicodeDecodeError``, ``ValueError``); (2) overwriting a checkpoint in place (``force=True``)
deletes the old directory before writing the new one: 19 of 20 SIGKILLs during a save loop left no
readable checkpoint, where this format left a complete file 20 of 20 times; (3) a save writes 13
files in 83-110 ms and a restore takes 12-17 ms, against one file in 27 ms (``fsync`` included) and
4 ms here; importing it adds 0.3-0.5 s. In its favour: zstd makes it 1.03 MB against 3.47 MB, and
it costs no extra install (flax already depends on orbax-checkpoint and tensorstore). Using it
safely would need a directory per epoch plus a hash manifest of our own; one file written through
:func:`prunejax._util.atomic_path` (permissions ``0o666 & ~umask``, as model files) is simpler and
stricter.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from prunejax._util import PyTree, atomic_write_bytes, path_str, read_regular_file

__all__ = [
    "CheckpointError",
    "leaf_shapes",
    "load_checkpoint",
    "restore_checkpoint",
    "save_checkpoint",
]

_MAGIC = b"\x89PJCK\r\n\x1a"
_VERSION = 2
_HEAD = len(_MAGIC) + 4
_DIGEST = hashlib.sha256().digest_size
_V1_MARK = b"prunejax-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt, or was written for a different model/run."""


def save_checkpoint(path: str | os.PathLike, tree: PyTree, meta: dict | None = None) -> None:
    """Write ``tree`` (any pytree: params, masks, optimizer state) and JSON ``meta`` atomically.

    The file (layout in the module docstring) is written with
    :func:`prunejax._util.atomic_path`: an interrupted write never leaves a partial file under
    ``path``, and the file gets the permissions a plain ``open`` would give.

    Args:
      path: destination file.
      tree: the pytree to save (NumPy/JAX arrays; NamedTuple optimizer states are fine).
      meta: JSON-serialisable metadata (model widths, epoch, history, run config).

    Raises:
      CheckpointError: ``path`` exists and is not a regular file.
      TypeError: ``meta`` is not JSON-serialisable.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise CheckpointError(f"cannot write checkpoint {path}: it exists and is not a file")
    state = flax.serialization.to_state_dict(jax.device_get(tree))
    state = jax.tree_util.tree_map(np.asarray, state)
    body = flax.serialization.msgpack_serialize(
        {"meta": json.dumps(meta or {}, sort_keys=True, allow_nan=True), "state": state}
    )
    head = _MAGIC + struct.pack("<I", _VERSION) + body
    atomic_write_bytes(path, head + hashlib.sha256(head).digest())


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _check_state(path: Path, node: Any, where: str = "") -> None:
    """Every node a dict with str keys, every leaf a NumPy array (or None, an empty state)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if not isinstance(k, str):
                raise CheckpointError(f"checkpoint {path} is malformed: key {k!r} at {where!r}")
            _check_state(path, v, f"{where}/{k}" if where else k)
    elif node is not None and (not isinstance(node, np.ndarray) or node.dtype.hasobject):
        raise CheckpointError(
            f"checkpoint {path} is malformed: leaf {where!r} is {type(node).__name__}, not an array"
        )


def _verified_body(path: Path, raw: bytes) -> bytes:
    """The body of a checkpoint file after the magic, version and SHA-256 checks."""
    if not raw.startswith(_MAGIC):
        if _V1_MARK in raw[:64]:
            raise CheckpointError(
                f"checkpoint {path} has format version 1 (prunejax 0.1.0), whose metadata is "
                "not integrity-checked; it cannot be resumed from: start afresh (rerun without "
                "--resume, or delete it)"
            )
        if len(raw) < len(_MAGIC) and _MAGIC.startswith(raw):
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({len(raw)} bytes)")
        raise CheckpointError(f"{path} is not a prunejax checkpoint (bad magic)")
    if len(raw) < _HEAD + _DIGEST:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({len(raw)} bytes)")
    (version,) = struct.unpack("<I", raw[len(_MAGIC) : _HEAD])
    if hashlib.sha256(raw[:-_DIGEST]).digest() != raw[-_DIGEST:]:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({len(raw)} bytes, SHA-256 mismatch)"
        )
    if version != _VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}, this prunejax reads version "
            f"{_VERSION}"
        )
    return raw[_HEAD:-_DIGEST]


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a checkpoint without a template, after checking its SHA-256.

    Args:
      path: the checkpoint file.

    Returns:
      ``(state, meta)``: the raw state dict (nested dicts of NumPy arrays) and the metadata.

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: the file is truncated, corrupt, not a regular file, not a prunejax
        checkpoint, or of another format version.
    """
    path = Path(path)
    body = _verified_body(path, read_regular_file(path, error=CheckpointError, what="checkpoint"))
    try:
        payload = flax.serialization.msgpack_restore(body)
        if not isinstance(payload, dict) or set(payload) != {"meta", "state"}:
            raise ValueError("the body is not {'meta', 'state'}")
        meta = json.loads(payload["meta"], object_pairs_hook=_no_duplicates)
        if not isinstance(meta, dict) or not isinstance(payload["state"], dict):
            raise ValueError("meta and state must be maps")
    except CheckpointError:
        raise
    except Exception as e:  # a crafted body with a valid hash: any parse failure is our error
        raise CheckpointError(f"checkpoint {path} is malformed: {type(e).__name__}: {e}") from None
    _check_state(path, payload["state"])
    return payload["state"], meta


def leaf_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{leaf path: (shape, dtype name)}`` of a pytree (paths as ``"params/Dense_0/kernel"``).

    Args:
      tree: any pytree of arrays.

    Returns:
      One entry per leaf.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(kp): (tuple(np.shape(v)), str(_dtype(v))) for kp, v in flat}


def _dtype(v: Any) -> np.dtype:
    dtype = getattr(v, "dtype", None)
    return np.asarray(v).dtype if dtype is None else np.dtype(dtype)


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
    """Read a checkpoint into the structure of ``template``, checking every leaf.

    Args:
      path: the checkpoint file.
      template: a pytree with the expected structure, shapes and dtypes (e.g. freshly
        initialised params and optimizer state).

    Returns:
      ``(tree, meta)``.

    Raises:
      FileNotFoundError: no such file.
      CheckpointError: truncated/corrupt file (see :func:`load_checkpoint`), or a leaf
        missing, extra, of another shape or dtype (a checkpoint written by a different model),
        naming the leaf.
    """
    state, meta = load_checkpoint(path)
    want_state = flax.serialization.to_state_dict(jax.device_get(template))
    _check_leaves(path, leaf_shapes(want_state), leaf_shapes(state))
    try:
        tree = flax.serialization.from_state_dict(template, state)
    except Exception as e:  # e.g. an empty sub-state present in one and not the other
        raise CheckpointError(
            f"checkpoint {path} does not match this model's structure: {e}"
        ) from None
    tree = jax.tree_util.tree_map(jnp.asarray, tree)
    return tree, meta
