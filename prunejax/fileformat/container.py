"""The container: a safetensors file of typed member arrays, with prunejax's JSON header and a
SHA-256 over the whole file in its metadata.

The container knows nothing of encodings: it writes a header and named member arrays, and reads
them back verified (bounded header, duplicate-free JSON, magic, format version, checksum, the
safetensors offsets, the member list).  It also owns the exact byte count of every piece, so sizes
can be predicted before anything is written.  The layout is specified in
``prunejax.fileformat``'s docstring.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import safetensors
import safetensors.numpy

from prunejax._util import atomic_path, json_depth, loads_json_bounded
from prunejax._version import __version__
from prunejax.fileformat.dtypes import SAFETENSORS_DTYPES
from prunejax.fileformat.errors import FileFormatError

__all__ = [
    "FORMAT_VERSION",
    "LEGACY_VERSION",
    "MAGIC",
    "EXTENSION",
    "META_KEY",
    "SUM_KEY",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "member_bytes",
    "file_bytes",
    "header_json",
    "check_version",
    "write",
    "read",
]

FORMAT_VERSION = 2
LEGACY_VERSION = 1
MAGIC = "prunejax"
EXTENSION = ".safetensors"
META_KEY = "prunejax"
SUM_KEY = "prunejax.sha256"
#: The largest header (safetensors JSON, prunejax header included) a reader accepts.
MAX_HEADER_BYTES = 64 * 2**20
#: The deepest JSON nesting a reader accepts (a pytree level takes 3).
MAX_JSON_DEPTH = 256
_OFFSET_WIDTH = 20  # data offsets are space-padded to 20 characters: every entry's size is fixed
_ZERO_SUM = "0" * 64
_SUM_TAIL = re.compile(rb',"prunejax\.sha256":"([0-9a-f]{64})"\}\}\Z')


# ----------------------------------------------------------------------------- bytes


def header_json(header: Mapping) -> str:
    """The prunejax header as the JSON text stored in the safetensors metadata (ASCII).

    Args:
      header: the prunejax header (no checksum).

    Returns:
      Its compact JSON text.
    """
    return json.dumps(header, separators=(",", ":"), allow_nan=False)


def _entry(name: str, shape: tuple[int, ...], dtype: np.dtype, begin: int, end: int) -> str:
    """One tensor's entry in the safetensors header (its size does not depend on the offsets)."""
    return (
        f'{json.dumps(name)}:{{"dtype":"{SAFETENSORS_DTYPES[np.dtype(dtype)]}",'
        f'"shape":[{",".join(str(int(s)) for s in shape)}],'
        f'"data_offsets":[{begin:>{_OFFSET_WIDTH}},{end:>{_OFFSET_WIDTH}}]}}'
    )


def _metadata(header: Mapping, checksum: str) -> str:
    return (
        f'"__metadata__":{{"{META_KEY}":{json.dumps(header_json(header))},'
        f'"{SUM_KEY}":"{checksum}"}}'
    )


def _padded(text: str) -> bytes:
    return (text + " " * (-len(text) % 8)).encode("ascii")


def member_bytes(name: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Exact bytes one member adds to the file: its header entry (with a comma) and its payload.

    Args:
      name: the member name.
      shape, dtype: the member array's shape and (storage) dtype.

    Returns:
      The member's bytes in the file.
    """
    dtype = np.dtype(dtype)
    return len(_entry(name, shape, dtype, 0, 0)) + 1 + math.prod(shape) * dtype.itemsize


def file_bytes(header: Mapping, members: Iterable[tuple[str, tuple[int, ...], np.dtype]]) -> int:
    """Exact size of the file ``write`` produces for ``header`` and members.

    Args:
      header: the prunejax header (no checksum).
      members: ``(name, shape, storage dtype)`` of every member.

    Returns:
      The file size in bytes: the 8-byte length, the header padded to a multiple of 8 with
      spaces, and the payloads.
    """
    entries = payload = 0
    for name, shape, dtype in members:
        b = member_bytes(name, shape, dtype)
        p = math.prod(shape) * np.dtype(dtype).itemsize
        entries += b - p
        payload += p
    text = 2 + entries + len(_metadata(header, _ZERO_SUM))
    return 8 + text + (-text % 8) + payload


# ----------------------------------------------------------------------------- write


def _raw(a: np.ndarray) -> np.ndarray:
    """The bytes of a member array, as a flat uint8 view (no copy for contiguous input)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def write(path: str | os.PathLike, header: Mapping, members: list[tuple[str, np.ndarray]]) -> int:
    """Write a file atomically: the safetensors header (prunejax header and checksum in its
    metadata), then the member payloads, widest dtype first so every payload is aligned.

    Args:
      path: the destination; a temporary file beside it is renamed into place on success
        (``prunejax._util.atomic_path``), so no partial file ever has the final name.
      header: the prunejax header (no checksum).
      members: ``(name, array)`` of every member, in storage dtypes (stored widest dtype first,
        so each payload is aligned to its item size).

    Returns:
      The size of the written file in bytes.

    Raises:
      ValueError: the header nests deeper than a reader accepts.
    """
    if json_depth(header_json(header).encode()) > MAX_JSON_DEPTH - 2:
        raise ValueError(
            f"cannot save params: the tree nests too deeply (its JSON structure exceeds "
            f"{MAX_JSON_DEPTH} levels)"
        )
    order = sorted(range(len(members)), key=lambda i: -members[i][1].dtype.itemsize)
    entries, offset = [], 0
    for i in order:
        name, a = members[i]
        entries.append(_entry(name, a.shape, a.dtype, offset, offset + a.nbytes))
        offset += a.nbytes
    text = "{" + "".join(e + "," for e in entries) + _metadata(header, _ZERO_SUM) + "}"
    slot = len(text) - 3 - 64  # the checksum's 64 hex digits end 3 characters from the end
    raw = _padded(text)
    prefix = struct.pack("<Q", len(raw))
    digest = hashlib.sha256(prefix + raw)
    for i in order:
        digest.update(_raw(members[i][1]))
    raw = raw[:slot] + digest.hexdigest().encode() + raw[slot + 64 :]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(prefix)
        f.write(raw)
        for i in order:
            f.write(_raw(members[i][1]).data)
    return os.path.getsize(path)


# ----------------------------------------------------------------------------- read


def check_version(where: str, header: object, version: int) -> dict:
    """Check a parsed prunejax header's magic and format version.

    Args:
      where: the file (for messages).
      header: the parsed header.
      version: the version the container holds.

    Returns:
      The header.

    Raises:
      FileFormatError: not a prunejax header, or another format version.
    """
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise FileFormatError(f"{where!r} is not a prunejax model file (bad magic)")
    found = header.get("format_version")
    if found != version:
        raise FileFormatError(
            f"{where!r} uses prunejax file format version {found!r} (written by prunejax "
            f"{header.get('library_version')!r}); this prunejax {__version__} reads format "
            f"version {FORMAT_VERSION} (and the legacy ZIP files of version {LEGACY_VERSION})"
        )
    return header


def _outer_header(where: str, data: bytes) -> tuple[bytes, dict]:
    """The raw safetensors header and its metadata, bounded and duplicate-free."""
    if len(data) < 8:
        raise FileFormatError(f"{where!r} is truncated or corrupted (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        raise FileFormatError(
            f"{where!r} is truncated or corrupted (its header length {n:,} exceeds the file or "
            f"the limit of {MAX_HEADER_BYTES:,} bytes)"
        )
    raw = data[8 : 8 + n]
    try:
        outer = loads_json_bounded(raw, max_bytes=MAX_HEADER_BYTES, max_depth=4)
    except ValueError as e:
        raise FileFormatError(
            f"{where!r} is truncated or corrupted (its safetensors header is not valid: {e})"
        ) from None
    meta = outer.get("__metadata__") if isinstance(outer, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get(META_KEY), str):
        raise FileFormatError(
            f"{where!r} is not a prunejax model file (no {META_KEY!r} safetensors metadata)"
        )
    return raw, meta


def _verify_checksum(where: str, data: bytes, raw: bytes, meta: dict) -> str:
    """Check the SHA-256 over the whole file (its own 64 digits read as zeros)."""
    stripped = raw.rstrip(b" ")
    m = _SUM_TAIL.search(stripped)
    if m is None or meta.get(SUM_KEY) != m.group(1).decode() or len(meta) != 2:
        raise FileFormatError(f"{where!r} is corrupted: its checksum field is missing or moved")
    slot = m.start(1)
    digest = hashlib.sha256(data[:8])
    digest.update(raw[:slot])
    digest.update(_ZERO_SUM.encode())
    digest.update(data[8 + slot + 64 :])
    if digest.hexdigest() != m.group(1).decode():
        raise FileFormatError(f"{where!r} is corrupted: checksum mismatch")
    return "sha256:" + m.group(1).decode()


def _tensors(where: str, data: bytes) -> dict[str, np.ndarray]:
    """The member arrays, parsed and bounds-checked by the safetensors library."""
    try:
        return safetensors.numpy.load(data)
    except (safetensors.SafetensorError, KeyError, ValueError, TypeError) as e:
        raise FileFormatError(
            f"{where!r} is corrupted: not a valid safetensors file ({type(e).__name__}: {e})"
        ) from None


def read(
    where: str, data: bytes, expected: Callable[[dict], list[tuple[str, tuple, np.dtype]]]
) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and verify a file: its prunejax header and member arrays.

    Args:
      where: the file (for messages).
      data: its bytes.
      expected: header -> ``(name, shape, storage dtype)`` of the members it calls for (raising
        ``ValueError`` on a malformed header).

    Returns:
      ``(header, arrays)``: the verified header (with ``checksum`` added) and name -> array.

    Raises:
      FileFormatError: a bad header length, invalid or duplicate-keyed JSON, no prunejax metadata,
        bad magic, another format version, a malformed header, a checksum mismatch, invalid
        safetensors offsets or dtypes, or members that do not match the header.
    """
    raw, meta = _outer_header(where, data)
    try:
        header = loads_json_bounded(
            meta[META_KEY].encode(), max_bytes=MAX_HEADER_BYTES, max_depth=MAX_JSON_DEPTH
        )
    except ValueError as e:
        raise FileFormatError(f"{where!r} has a corrupted header ({e})") from None
    header = check_version(where, header, FORMAT_VERSION)
    checksum = _verify_checksum(where, data, raw, meta)
    try:
        members = expected(header)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise FileFormatError(f"{where!r} has a corrupted header ({e})") from None
    arrays = _tensors(where, data)
    if sorted(arrays) != sorted(n for n, _, _ in members) or len(members) != len(arrays):
        raise FileFormatError(f"{where!r} is corrupted: its members do not match its header")
    for name, shape, dtype in members:
        a = arrays[name]
        if a.shape != tuple(shape) or a.dtype != dtype:
            raise FileFormatError(
                f"{where!r}: member {name!r} has shape {a.shape} and dtype {a.dtype}, "
                f"the header says {tuple(shape)} and {np.dtype(dtype)}"
            )
    return dict(header, checksum=checksum), arrays
