"""The container: a ZIP archive of ``.npy`` members behind a JSON header with a SHA-256 checksum.

The container knows nothing of encodings: it writes a header and named array members, and reads
them back verified (ZIP CRCs, magic, format version, member list, checksum).  It also owns the
exact byte count of every piece, so sizes can be predicted before anything is written.  The
layout is specified in ``prunejax.fileformat``'s docstring.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterable

import numpy as np

from prunejax._util import atomic_path
from prunejax._version import __version__
from prunejax.fileformat.errors import FileFormatError

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "HEADER_NAME",
    "npy_bytes",
    "member_bytes",
    "file_bytes",
    "write",
    "read",
    "read_array",
]

FORMAT_VERSION = 1
MAGIC = "prunejax"
HEADER_NAME = "header.json"
_CHECKSUM_PLACEHOLDER = "sha256:" + "0" * 64
_ZIP_ENTRY_OVERHEAD = 30 + 46  # local file header + central directory record, no extras
_ZIP_END = 22  # end of central directory record, no comment


# ----------------------------------------------------------------------------- bytes


def _header_json(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":"), allow_nan=False).encode()


def _checksum_json(header: dict) -> bytes:
    body = {k: v for k, v in header.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _checksum(header: dict, members: Iterable[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256(_checksum_json(header))
    for name, data in members:
        digest.update(name.encode())
        digest.update(data)
    return "sha256:" + digest.hexdigest()


def npy_bytes(arr: np.ndarray) -> bytes:
    """The ``.npy`` bytes (format 1.0, C order, no pickle) of one member.

    Args:
      arr: the member array.

    Returns:
      The bytes the member holds in the archive.
    """
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(arr, order="C"), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


@functools.lru_cache(maxsize=4096)
def _npy_header_bytes(shape: tuple[int, ...], descr: str) -> int:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return len(buf.getvalue())


def member_bytes(name: str, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Exact bytes one array member adds to the file (zip headers + ``.npy`` header + payload).

    Args:
      name: the member name without ``.npy``.
      shape, dtype: the member array's shape and dtype.

    Returns:
      The member's bytes in the archive.
    """
    dtype = np.dtype(dtype)
    payload = math.prod(shape) * dtype.itemsize
    zip_name = name + ".npy"
    descr = np.lib.format.dtype_to_descr(dtype)
    return (
        _ZIP_ENTRY_OVERHEAD + 2 * len(zip_name) + _npy_header_bytes(tuple(shape), descr) + payload
    )


def file_bytes(header: dict, members: Iterable[tuple[str, tuple[int, ...], np.dtype]]) -> int:
    """Exact size of the file ``write`` produces for ``header`` (without its checksum) and members.

    Args:
      header: the JSON header, ``checksum`` excluded (its fixed-length value is accounted for).
      members: ``(name, shape, dtype)`` of every array member.

    Returns:
      The file size in bytes.
    """
    hlen = len(_header_json(dict(header, checksum=_CHECKSUM_PLACEHOLDER)))
    return (
        _ZIP_ENTRY_OVERHEAD
        + 2 * len(HEADER_NAME)
        + hlen
        + sum(member_bytes(n, s, d) for n, s, d in members)
        + _ZIP_END
    )


# ----------------------------------------------------------------------------- write


def _zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def write(path: str | os.PathLike, header: dict, members: list[tuple[str, bytes]]) -> int:
    """Write a file atomically: the header (with its checksum added), then the members in order.

    Args:
      path: the destination; a temporary file beside it is renamed into place on success
        (``prunejax._util.atomic_path``), so no partial file ever has the final name.
      header: the JSON header without ``checksum``.
      members: ``(name, .npy bytes)`` of every array member, in file order; names without
        ``.npy``.

    Returns:
      The size of the written file in bytes.
    """
    header = dict(header, checksum=_checksum(header, members))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.writestr(_zipinfo(HEADER_NAME), _header_json(header))
                for name, data in members:
                    zf.writestr(_zipinfo(name + ".npy"), data)
    return os.path.getsize(path)


# ----------------------------------------------------------------------------- read


def _read_zip(where: str) -> tuple[bytes, dict[str, bytes]]:
    """The raw header and member bytes of an archive (ZIP CRCs checked)."""
    try:
        with zipfile.ZipFile(where) as zf:
            names = zf.namelist()
            if HEADER_NAME not in names:
                raise FileFormatError(f"{where!r} is not a prunejax model file (no {HEADER_NAME})")
            raw_header = zf.read(HEADER_NAME)
            raw = {n[: -len(".npy")]: zf.read(n) for n in names if n != HEADER_NAME}
            extra = [n for n in names if n != HEADER_NAME and not n.endswith(".npy")]
    except zipfile.BadZipFile as e:
        raise FileFormatError(
            f"{where!r} is truncated or corrupted (not a readable ZIP archive: {e})"
        ) from None
    except (EOFError, zipfile.LargeZipFile, NotImplementedError) as e:
        raise FileFormatError(f"{where!r} is truncated or corrupted ({e})") from None
    if extra:
        raise FileFormatError(f"{where!r} holds unexpected members {extra[:5]}")
    return raw_header, raw


def _parse_header(where: str, raw_header: bytes) -> dict:
    """The JSON header, checked for the magic and the format version."""
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{where!r} has a corrupted header ({e})") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise FileFormatError(f"{where!r} is not a prunejax model file (bad magic)")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise FileFormatError(
            f"{where!r} uses prunejax file format version {version!r} (written by prunejax "
            f"{header.get('library_version')!r}); this prunejax {__version__} reads format "
            f"version {FORMAT_VERSION} only"
        )
    return header


def read(
    path: str | os.PathLike, member_names: Callable[[dict], list[str]]
) -> tuple[dict, dict[str, bytes]]:
    """Read and verify a file: its header and the raw ``.npy`` bytes of every member.

    Args:
      path: the file.
      member_names: header -> the names of the array members it calls for, in file order (it
        may raise ``KeyError``/``TypeError``/``ValueError`` on a malformed header).

    Returns:
      ``(header, raw)``: the verified JSON header and member name -> ``.npy`` bytes.

    Raises:
      FileFormatError: not a readable ZIP archive, no header, bad magic, another format version,
        a malformed header, members that do not match the header, or a checksum mismatch.
    """
    where = os.fspath(path)
    raw_header, raw = _read_zip(where)
    header = _parse_header(where, raw_header)
    try:
        expected = member_names(header)
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(
            f"{where!r} has a corrupted header ({type(e).__name__}: {e})"
        ) from None
    if sorted(raw) != sorted(expected):
        raise FileFormatError(f"{where!r} is corrupted: its array members do not match its header")
    if header.get("checksum") != _checksum(header, ((n, raw[n]) for n in expected)):
        raise FileFormatError(f"{where!r} is corrupted: checksum mismatch")
    return header, raw


def read_array(
    where: str, name: str, data: bytes, shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    """Parse one member's ``.npy`` bytes (never unpickling) and check its shape and dtype.

    Args:
      where: the file (for messages).
      name: the member name.
      data: its ``.npy`` bytes.
      shape, dtype: what the header says the member holds.

    Returns:
      The member array.

    Raises:
      FileFormatError: not a valid ``.npy`` array, or another shape or dtype.
    """
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise FileFormatError(f"{where!r}: member {name!r} is not a valid array ({e})") from None
    if a.shape != shape or a.dtype != dtype:
        raise FileFormatError(
            f"{where!r}: member {name!r} has shape {a.shape} and dtype {a.dtype}, "
            f"the header says {shape} and {dtype}"
        )
    return a
