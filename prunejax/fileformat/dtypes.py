"""The dtypes a file can hold, by header name, and how each travels in an ``.npy`` member."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["DTYPES", "dtype_name", "storage_dtype", "index_dtype"]

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


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a payload has in the ``.npy`` member (bfloat16 travels as its uint16 bits).

    Args:
      dtype: the leaf's dtype.

    Returns:
      ``uint16`` for ``bfloat16``, ``dtype`` itself otherwise.
    """
    if dtype == DTYPES["bfloat16"]:
        return np.dtype(np.uint16)
    return dtype


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
