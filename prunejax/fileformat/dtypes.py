"""The dtypes a file can hold, by header name, and how each travels in a member array.

Members are stored in dtypes every safetensors reader knows: ``bfloat16`` payloads travel as
their ``uint16`` bits and (from format version 2) complex payloads as pairs of reals (a trailing
axis of length 2: real, imaginary).  Format version 1 (the ``.npy`` members of the legacy ZIP
container) stored complex payloads as complex ``.npy`` arrays.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = [
    "DTYPES",
    "SAFETENSORS_DTYPES",
    "dtype_name",
    "storage_dtype",
    "storage_shape",
    "to_storage",
    "from_storage",
    "index_dtype",
]

#: Header dtype name -> NumPy dtype, for every dtype a file can hold.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
}
DTYPES["bfloat16"] = np.dtype(jnp.bfloat16)


def dtype_name(dtype: np.dtype) -> str:
    """The header name of ``dtype``.

    Args:
      dtype: a NumPy dtype.

    Returns:
      Its key in ``DTYPES``.

    Raises:
      TypeError: the dtype cannot be saved.
    """
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise TypeError(f"dtype {dtype} cannot be saved")


def storage_dtype(dtype: np.dtype, version: int = 2) -> np.dtype:
    """The dtype a payload has in its member (bfloat16 as uint16 bits, complex as real pairs).

    Args:
      dtype: the leaf's dtype.
      version: the file format version (1: complex stays complex).

    Returns:
      The member's dtype.
    """
    dtype = np.dtype(dtype)
    if dtype == DTYPES["bfloat16"]:
        return np.dtype(np.uint16)
    if version >= 2 and dtype.kind == "c":
        return np.dtype(np.float32 if dtype == np.complex64 else np.float64)
    return dtype


def storage_shape(shape: tuple[int, ...], dtype: np.dtype, version: int = 2) -> tuple[int, ...]:
    """The shape a payload of ``shape`` has in its member (a trailing 2 for complex, version 2).

    Args:
      shape: the payload's shape.
      dtype: the leaf's dtype.
      version: the file format version.

    Returns:
      The member's shape.
    """
    if version >= 2 and np.dtype(dtype).kind == "c":
        return (*tuple(shape), 2)
    return tuple(shape)


def to_storage(arr: np.ndarray) -> np.ndarray:
    """A payload as its member array (format version 2; no copy for contiguous input).

    Args:
      arr: the payload, in the leaf's dtype.

    Returns:
      The member array, of ``storage_dtype``/``storage_shape``.
    """
    arr = np.asarray(arr, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
    sd = storage_dtype(arr.dtype)
    if sd == arr.dtype:
        return arr
    if arr.dtype.kind == "c":
        return arr.reshape(-1).view(sd).reshape(storage_shape(arr.shape, arr.dtype))
    return arr.view(sd)


def from_storage(member: np.ndarray, dtype: np.dtype, version: int = 2) -> np.ndarray:
    """A member array back in the leaf's dtype (the inverse of ``to_storage``).

    Args:
      member: the member array (already checked to have ``storage_shape``/``storage_dtype``).
      dtype: the leaf's dtype.
      version: the file format version.

    Returns:
      The payload, shaped without the complex pair axis.
    """
    dtype = np.dtype(dtype)
    if member.dtype == dtype:
        return member
    member = np.asarray(member, order="C")
    if version >= 2 and dtype.kind == "c":
        return member.reshape(-1).view(dtype).reshape(member.shape[:-1])
    return member.view(dtype)


#: Member dtype -> its safetensors dtype name (the member dtypes ``storage_dtype`` produces).
SAFETENSORS_DTYPES: dict[np.dtype, str] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint16): "U16",
    np.dtype(np.int16): "I16",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint64): "U64",
    np.dtype(np.int64): "I64",
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
}


def index_dtype(max_value: int) -> np.dtype:
    """The smallest unsigned integer dtype holding ``max_value`` (>= 0).

    Args:
      max_value: the largest index the array will hold.

    Returns:
      ``uint8``, ``uint16``, ``uint32`` or ``uint64``.
    """
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)
