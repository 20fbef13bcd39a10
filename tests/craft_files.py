"""Writers of format-version-1 files (the ZIP archive of ``.npy`` members prunejax wrote before
the safetensors container), byte for byte as that version wrote them, for the tests of the
legacy reader."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np

from prunejax.fileformat.dtypes import from_storage
from prunejax.fileformat.encodings import ROLES, encode
from prunejax.fileformat.plan import plan_tree

HEADER_NAME = "header.json"


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(arr, order="C"), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def checksum(header: dict, members: list[tuple[str, bytes]]) -> str:
    body = {k: v for k, v in header.items() if k != "checksum"}
    d = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    )
    for name, data in members:
        d.update(name.encode())
        d.update(data)
    return "sha256:" + d.hexdigest()


def _zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def write_zip(path, header_bytes: bytes, members: list[tuple[str, bytes]]) -> None:
    """An archive of ``header.json`` then ``<name>.npy`` members, as version 1 wrote it."""
    if hasattr(path, "write"):
        _write_zip(path, header_bytes, members)
    else:
        with open(path, "wb") as f:
            _write_zip(f, header_bytes, members)


def _write_zip(f, header_bytes: bytes, members: list[tuple[str, bytes]]) -> None:
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        z.writestr(_zipinfo(HEADER_NAME), header_bytes)
        for name, data in members:
            z.writestr(_zipinfo(name + ".npy"), data)


def legacy_members(params, *, format="auto", masks=None, activation=None):
    """``(header without checksum, [(member name, .npy bytes)])`` of a version-1 file."""
    plan = plan_tree(params, format=format, masks=masks, activation=activation)
    header = dict(plan.header, format_version=1)
    members = []
    for i, (arr, enc) in enumerate(zip(plan.leaves, plan.encodings, strict=True)):
        for role, a in zip(ROLES[enc], encode(enc, arr), strict=True):
            if arr.dtype.kind == "c" and role in ("data", "values"):  # v1: complex as complex
                a = from_storage(a, arr.dtype)
            members.append((f"{i}.{role}", npy_bytes(a)))
    for j, k in enumerate(plan.kept):
        members.append((f"kept.{j}", npy_bytes(k)))
    return header, members


def header_bytes(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":"), allow_nan=False).encode()


def legacy_save(path, params, *, format="auto", masks=None, activation=None) -> None:
    """Save ``params`` as prunejax format version 1 wrote them."""
    header, members = legacy_members(params, format=format, masks=masks, activation=activation)
    header = dict(header, checksum=checksum(header, members))
    write_zip(path, header_bytes(header), members)


def write_raw(path, header_text: str, members: dict, *, checksum: str | None = None) -> bytes:
    """A format-version-2 file built from the specification, with ``header_text`` verbatim as
    the prunejax header and the SHA-256 recomputed (or ``checksum`` as given).  Returns the
    bytes written."""
    import struct

    from prunejax.fileformat.dtypes import SAFETENSORS_DTYPES

    entries, offset, payload = [], 0, []
    for name, a in members.items():
        a = np.ascontiguousarray(a)
        entries.append(
            f'{json.dumps(name)}:{{"dtype":"{SAFETENSORS_DTYPES[a.dtype]}",'
            f'"shape":{json.dumps(list(a.shape))},"data_offsets":[{offset},{offset + a.nbytes}]}}'
        )
        offset += a.nbytes
        payload.append(a.tobytes())
    meta = f'"__metadata__":{{"prunejax":{json.dumps(header_text)},"prunejax.sha256":"{"0" * 64}"}}'
    text = "{" + "".join(e + "," for e in entries) + meta + "}"
    text += " " * (-len(text) % 8)
    raw = text.encode()
    data = struct.pack("<Q", len(raw)) + raw + b"".join(payload)
    digest = checksum or hashlib.sha256(data).hexdigest()
    return _replace_last(path, data, digest)


def _replace_last(path, data: bytes, digest: str) -> bytes:
    at = data.rindex(b'"prunejax.sha256":"') + len(b'"prunejax.sha256":"')
    data = data[:at] + digest.encode() + data[at + 64 :]
    with open(path, "wb") as f:
        f.write(data)
    return data


def assemble(entries: list[str], header_text: str, payload: bytes, *, length=None) -> bytes:
    """A format-version-2 file from raw safetensors header entries (``'"name":{...}'``), the
    prunejax header text and the payload, with a valid SHA-256 (``length`` overrides the 8-byte
    header length field)."""
    import struct

    meta = f'"__metadata__":{{"prunejax":{json.dumps(header_text)},"prunejax.sha256":"{"0" * 64}"}}'
    text = "{" + "".join(e + "," for e in entries) + meta + "}"
    text += " " * (-len(text) % 8)
    raw = text.encode()
    n = len(raw) if length is None else length
    data = struct.pack("<Q", n) + raw + payload
    digest = hashlib.sha256(data).hexdigest().encode()
    at = data.rindex(b'"prunejax.sha256":"') + len(b'"prunejax.sha256":"')
    return data[:at] + digest + data[at + 64 :]


def split_file(data: bytes) -> tuple[list[tuple[str, dict]], str, bytes]:
    """``(entries as (name, dict) in file order, prunejax header text, payload)`` of a file."""
    n = int.from_bytes(data[:8], "little")
    outer = json.loads(data[8 : 8 + n])
    meta = outer.pop("__metadata__")
    entries = sorted(outer.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return entries, meta["prunejax"], data[8 + n :]


def entry_text(name: str, entry: dict) -> str:
    return f"{json.dumps(name)}:{json.dumps(entry, separators=(',', ':'))}"


def tree_digest(tree) -> str:
    """A digest of a pytree's structure, leaf kinds, dtypes, shapes and bytes (exact equality)."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    d = hashlib.sha256(str(treedef).encode())
    for x in leaves:
        a = np.asarray(x)
        d.update(f"{type(x).__module__}.{type(x).__name__}|{a.dtype}|{a.shape}|".encode())
        d.update(np.ascontiguousarray(a).tobytes())
    return d.hexdigest()
