"""Reading format version 1: the ZIP archive of ``.npy`` members that prunejax wrote before the
safetensors container (``.pjz``/``.npz`` files).  Read-only, hardened against hostile archives.

Every check happens before anything is inflated or allocated: the archive must have unique member
names, exactly one ``header.json``, only ``ZIP_STORED`` (uncompressed, unencrypted) members whose
declared sizes fit inside the file, and a header within ``MAX_HEADER_BYTES`` and
``MAX_JSON_DEPTH``.  Members are read with size-checked reads (never past their declared size;
ZIP CRCs checked), each ``.npy`` header is parsed on its own (never unpickling) and compared with
the shape and dtype the prunejax header calls for, and the payload length must match exactly
before the bytes are viewed as an array.  Every failure raises ``FileFormatError``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
import zipfile
from collections.abc import Callable

import numpy as np

from prunejax._util import loads_json_bounded
from prunejax.fileformat.container import (
    LEGACY_VERSION,
    MAX_HEADER_BYTES,
    MAX_JSON_DEPTH,
    check_version,
)
from prunejax.fileformat.errors import FileFormatError

__all__ = ["HEADER_NAME", "is_legacy", "read"]

HEADER_NAME = "header.json"
#: The most archive members a reader accepts (each costs a few hundred bytes of ``ZipInfo``).
MAX_MEMBERS = 100_000
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    NotImplementedError,
    struct.error,
    KeyError,
    IndexError,
    TypeError,
    OverflowError,
)


def is_legacy(data: bytes) -> bool:
    """Whether file bytes are a ZIP archive (format version 1) rather than safetensors.

    Args:
      data: the file's bytes.

    Returns:
      True for a ZIP local-file or empty-archive signature.
    """
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _member_count(where: str, data: bytes) -> None:
    """Refuse an archive whose central directory declares more than ``MAX_MEMBERS`` entries,
    before ``zipfile`` builds an object per entry (the end records are read directly)."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))
    if end < 0 or end + 22 > len(data):
        return  # zipfile reports the archive as unreadable
    (count,) = struct.unpack("<H", data[end + 10 : end + 12])
    if count == 0xFFFF and end >= 20 and data[end - 20 : end - 16] == b"PK\x06\x07":
        (at,) = struct.unpack("<Q", data[end - 12 : end - 4])
        if at + 40 <= len(data) and data[at : at + 4] == b"PK\x06\x06":
            (count,) = struct.unpack("<Q", data[at + 32 : at + 40])
    if count > MAX_MEMBERS:
        raise FileFormatError(
            f"{where!r}: the archive declares {count:,} members (at most {MAX_MEMBERS:,})"
        )


def _infos(where: str, zf: zipfile.ZipFile, size: int) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by name, checked before anything is read."""
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise FileFormatError(f"{where!r} is corrupted: duplicate archive members {dup[:5]}")
    if HEADER_NAME not in names:
        raise FileFormatError(f"{where!r} is not a prunejax model file (no {HEADER_NAME})")
    extra = [n for n in names if n != HEADER_NAME and not n.endswith(".npy")]
    if extra:
        raise FileFormatError(f"{where!r} holds unexpected members {extra[:5]}")
    total = 0
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED or i.flag_bits & 0x1:
            raise FileFormatError(
                f"{where!r}: member {i.filename!r} is compressed or encrypted; prunejax files "
                "store members uncompressed"
            )
        if i.file_size != i.compress_size or i.header_offset + i.file_size > size:
            raise FileFormatError(f"{where!r}: member {i.filename!r} declares a bad size")
        total += i.file_size
    if total > size:
        raise FileFormatError(f"{where!r} is corrupted: its members declare more than the file")
    if zf.getinfo(HEADER_NAME).file_size > MAX_HEADER_BYTES:
        raise FileFormatError(f"{where!r}: {HEADER_NAME} exceeds {MAX_HEADER_BYTES:,} bytes")
    return {i.filename: i for i in infos}


def _member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes, reading at most its declared size (the CRC is checked at its end)."""
    with zf.open(info) as f:
        data = f.read(info.file_size)
        if len(data) != info.file_size or f.read(1):
            raise zipfile.BadZipFile(f"member {info.filename!r} does not hold its declared size")
    return data


def _npy(where: str, name: str, raw: bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Parse one ``.npy`` member strictly: header first, exact payload length, no pickle."""
    f = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError, OverflowError) as e:
        raise FileFormatError(f"{where!r}: member {name!r} is not a valid array ({e})") from None
    if got_shape != tuple(shape) or got_dtype != dtype or fortran:
        raise FileFormatError(
            f"{where!r}: member {name!r} has shape {got_shape} and dtype {got_dtype}, "
            f"the header says {tuple(shape)} and {np.dtype(dtype)}"
        )
    count = math.prod(shape)
    if len(raw) - f.tell() != count * dtype.itemsize:
        raise FileFormatError(f"{where!r}: member {name!r} does not hold its payload")
    return np.frombuffer(raw, dtype, count=count, offset=f.tell()).reshape(shape)


def _checksum(header: dict, members: list[tuple[str, bytes]]) -> str:
    body = {k: v for k, v in header.items() if k != "checksum"}
    digest = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    )
    for name, data in members:
        digest.update(name.encode())
        digest.update(data)
    return "sha256:" + digest.hexdigest()


def read(
    where: str, data: bytes, expected: Callable[[dict], list[tuple[str, tuple, np.dtype]]]
) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and verify a version-1 ZIP file: its header and member arrays.

    Args:
      where: the file (for messages).
      data: its bytes.
      expected: header -> ``(name, shape, storage dtype)`` of the members it calls for (names
        without ``.npy``; raising ``ValueError`` on a malformed header).

    Returns:
      ``(header, arrays)``: the verified header and member name -> array.

    Raises:
      FileFormatError: anything wrong with the archive, the header or the members.
    """
    _member_count(where, data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = _infos(where, zf, len(data))
            raw_header = _member(zf, infos[HEADER_NAME])
            try:
                header = loads_json_bounded(
                    raw_header, max_bytes=MAX_HEADER_BYTES, max_depth=MAX_JSON_DEPTH
                )
            except ValueError as e:
                raise FileFormatError(f"{where!r} has a corrupted header ({e})") from None
            header = check_version(where, header, LEGACY_VERSION)
            try:
                members = expected(header)
            except (ValueError, TypeError, KeyError, IndexError) as e:
                raise FileFormatError(f"{where!r} has a corrupted header ({e})") from None
            names = [n for n, _, _ in members]
            if sorted(n + ".npy" for n in names) != sorted(set(infos) - {HEADER_NAME}):
                raise FileFormatError(
                    f"{where!r} is corrupted: its array members do not match its header"
                )
            raw = [(n, _member(zf, infos[n + ".npy"])) for n in names]
    except FileFormatError:
        raise
    except _ZIP_ERRORS as e:
        raise FileFormatError(
            f"{where!r} is truncated or corrupted (not a readable ZIP archive: "
            f"{type(e).__name__}: {e})"
        ) from None
    if header.get("checksum") != _checksum(header, raw):
        raise FileFormatError(f"{where!r} is corrupted: checksum mismatch")
    arrays = {
        n: _npy(where, n, b, tuple(s), np.dtype(d))
        for (n, b), (_, s, d) in zip(raw, members, strict=True)
    }
    return header, arrays
