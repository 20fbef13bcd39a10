"""MNIST through tensorflow-datasets (no TensorFlow), with a decoded-array cache, and batching.

The prepared TFDS directory (``mnist/3.0.1/*.array_record``) is read with ``tfds.data_source``,
which needs Pillow but not TensorFlow.  Decoding the 70,000 PNGs takes a few seconds, so the
decoded arrays are cached as a ``.npz`` file (written atomically) in
:func:`prunejax._util.cache_dir`, keyed by the source directory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from prunejax._util import atomic_path, cache_dir, check_int

__all__ = [
    "DEFAULT_DATA_DIR",
    "MNIST",
    "MNIST_TRAIN_LABEL_COUNTS",
    "VALIDATION_SIZE",
    "batch_indices",
    "batches",
    "data_candidates",
    "decode_mnist",
    "epoch_order",
    "find_data_dir",
    "load_mnist",
    "num_batches",
    "split_validation",
]

MNIST_TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
DEFAULT_DATA_DIR = Path("data") / "tensorflow_datasets"
"""The documented default, relative to the current working directory (a clone's root)."""
_SPLIT_SIZES = {"train": 60_000, "test": 10_000}
VALIDATION_SIZE = 10_000
"""The documented validation split: the LAST 10,000 of MNIST's 60,000 training images (in the
TFDS record order), held out from training whenever a setting is chosen."""
_CACHE_VERSION = 1


class MNIST(NamedTuple):
    """MNIST arrays: images float32 in ``[0, 1]`` of shape ``(n, 784)``, labels int32 ``(n,)``.

    ``x_val``/``y_val`` hold the validation split when one was held out
    (:func:`split_validation`, ``load_mnist(validation=...)``), else ``None``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None


# ----------------------------------------------------------------------------- finding the data


def data_candidates() -> list[tuple[str, Path]]:
    """The TFDS data directories looked at when no ``data_dir`` is given, in order.

    Returns:
      ``(why, directory)`` pairs: ``$TFDS_DATA_DIR`` (when set), then
      ``data/tensorflow_datasets`` in the current working directory, then the TFDS default
      ``~/tensorflow_datasets``.
    """
    out: list[tuple[str, Path]] = []
    env = os.environ.get("TFDS_DATA_DIR")
    if env:
        out.append(("$TFDS_DATA_DIR", Path(env).expanduser()))
    out.append(("default, relative to the working directory", Path.cwd() / DEFAULT_DATA_DIR))
    out.append(("TFDS default", Path.home() / "tensorflow_datasets"))
    return out


def _has_mnist(data_dir: Path) -> bool:
    d = data_dir / "mnist"
    return d.is_dir() and any(
        (v / "dataset_info.json").is_file() for v in d.iterdir() if v.is_dir()
    )


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The TFDS data directory that holds MNIST.

    Resolution order: the explicit ``data_dir`` (used alone when given) > ``$TFDS_DATA_DIR`` >
    ``data/tensorflow_datasets`` in the current working directory > ``~/tensorflow_datasets``
    (see :func:`data_candidates`); the first that holds a prepared ``mnist`` wins.

    Args:
      data_dir: an explicit TFDS data directory.

    Returns:
      The directory (its ``mnist/<version>/`` subdirectory holds the array_record files).

    Raises:
      FileNotFoundError: no candidate holds MNIST; the message lists every place looked at and
        how to provide the data.
    """
    if data_dir is not None:
        cands = [("data_dir argument", Path(data_dir).expanduser())]
    else:
        cands = data_candidates()
    for _, d in cands:
        if _has_mnist(d):
            return d.resolve()
    looked = "\n".join(f"  - {d / 'mnist'} ({why})" for why, d in cands)
    raise FileNotFoundError(
        "MNIST (a prepared tensorflow-datasets directory mnist/<version>/ with array_record "
        f"files) was not found. Looked in:\n{looked}\n"
        "Provide it with --data-dir / load_mnist(data_dir=...) or $TFDS_DATA_DIR, or run from "
        f"a directory holding {DEFAULT_DATA_DIR}/mnist (a clone of the repository has it at "
        "its root); on a machine with network, "
        "`python -c \"import tensorflow_datasets as tfds; tfds.data_source('mnist')\"` "
        "prepares ~/tensorflow_datasets."
    )


# ----------------------------------------------------------------------------- decoding + cache


def _source_key(data_dir: Path) -> str:
    h = hashlib.sha256()
    h.update(f"v{_CACHE_VERSION}:{data_dir}".encode())
    for f in sorted((data_dir / "mnist").rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(data_dir)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def decode_mnist(data_dir: Path) -> dict[str, np.ndarray]:
    """Decode both MNIST splits from a TFDS data directory with ``tfds.data_source``.

    Args:
      data_dir: the TFDS data directory (holding ``mnist/<version>/``).

    Returns:
      ``{"x_train", "y_train", "x_test", "y_test"}``: uint8 images ``(n, 784)``, int32 labels.

    Raises:
      FileNotFoundError: tensorflow-datasets could not open MNIST there.
    """
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source("mnist", data_dir=str(data_dir), download=False)
    except Exception as e:  # tfds raises its own error types
        raise FileNotFoundError(
            f"could not open MNIST in {data_dir}: {type(e).__name__}: {e}"
        ) from e
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        ds = source[split]
        n = len(ds)
        x = np.empty((n, 784), np.uint8)
        y = np.empty((n,), np.int32)
        chunk = 2048
        for start in range(0, n, chunk):
            idx = list(range(start, min(start + chunk, n)))
            recs = ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[i] for i in idx]
            for i, rec in zip(idx, recs, strict=True):
                x[i] = np.asarray(rec["image"], np.uint8).reshape(784)
                y[i] = int(rec["label"])
        out[f"x_{split}"] = x
        out[f"y_{split}"] = y
    return out


def _check(arrays: dict[str, np.ndarray], where: str) -> None:
    for split, n in _SPLIT_SIZES.items():
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape != (n, 784) or y.shape != (n,):
            raise ValueError(
                f"MNIST {split} split from {where} has shapes {x.shape}/{y.shape}, "
                f"expected ({n}, 784)/({n},)"
            )
        if y.min() < 0 or y.max() > 9:
            raise ValueError(f"MNIST {split} labels from {where} are outside 0..9")


def _read_cache(cache_file: Path) -> dict[str, np.ndarray] | None:
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file) as z:
            arrays = {k: z[k] for k in z.files}
        _check(arrays, str(cache_file))
    except Exception:  # a damaged cache is rebuilt from the source
        return None
    return arrays


def _write_cache(cache_file: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError:  # an unwritable cache directory is skipped
        pass


def split_validation(data: MNIST, n: int = VALIDATION_SIZE) -> MNIST:
    """Hold out the LAST ``n`` training examples as a validation split.

    The split is deterministic (no shuffling: the last ``n`` rows in the TFDS record order), so
    every run and every seed sees the same validation images, disjoint from the training ones.
    Settings are chosen on this split; the test split is read only for the final report.

    Args:
      data: MNIST without a validation split.
      n: validation size, ``1 <= n < len(data.x_train)`` (default :data:`VALIDATION_SIZE`).

    Returns:
      :class:`MNIST` whose ``x_train``/``y_train`` are the first ``len - n`` examples and
      ``x_val``/``y_val`` the last ``n``; the test split unchanged.

    Raises:
      ValueError: ``data`` already has a validation split, or ``n`` is out of range.
    """
    if data.x_val is not None:
        raise ValueError("data already holds a validation split")
    total = len(data.x_train)
    check_int(n, name="validation", minimum=1)
    if n >= total:
        raise ValueError(f"validation ({n}) must be smaller than the training split ({total})")
    k = total - n
    return MNIST(
        x_train=data.x_train[:k],
        y_train=data.y_train[:k],
        x_test=data.x_test,
        y_test=data.y_test,
        x_val=data.x_train[k:],
        y_val=data.y_train[k:],
    )


def load_mnist(
    data_dir: str | os.PathLike | None = None, *, cache: bool = True, validation: int = 0
) -> MNIST:
    """Load MNIST (LeCun et al. 1998) as NumPy arrays, offline.

    Args:
      data_dir: TFDS data directory; see :func:`find_data_dir` for the default resolution.
      cache: read/write the decoded arrays in :func:`prunejax._util.cache_dir` (keyed by the
        source path and its files' sizes and times).  An unwritable cache directory is skipped
        silently.
      validation: hold out the last ``validation`` training examples as ``x_val``/``y_val``
        (:func:`split_validation`; the documented choice is :data:`VALIDATION_SIZE`, 10,000);
        0 keeps all 60,000 for training.

    Returns:
      :class:`MNIST` with ``x_*`` float32 in ``[0, 1]`` of shape ``(n, 784)`` and ``y_*`` int32:
      60,000 training (minus ``validation``) and 10,000 test examples.

    Raises:
      FileNotFoundError: MNIST was not found (the message says where it looked).
      ValueError: ``validation`` is negative or not smaller than 60,000.
    """
    check_int(validation, name="validation", minimum=0)
    src = find_data_dir(data_dir)
    cache_file = cache_dir() / f"mnist-{_source_key(src)}.npz"
    arrays = _read_cache(cache_file) if cache else None
    if arrays is None:
        arrays = decode_mnist(src)
        _check(arrays, str(src))
        if cache:
            _write_cache(cache_file, arrays)
    data = MNIST(
        x_train=arrays["x_train"].astype(np.float32) / 255.0,
        y_train=arrays["y_train"].astype(np.int32),
        x_test=arrays["x_test"].astype(np.float32) / 255.0,
        y_test=arrays["y_test"].astype(np.int32),
    )
    return split_validation(data, validation) if validation else data


# ----------------------------------------------------------------------------- batching


def num_batches(n: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """Number of batches :func:`batches` yields for ``n`` examples."""
    return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of epoch ``epoch``: a permutation of ``range(n)`` that depends
    only on ``(seed, epoch)`` (NumPy's default generator), so a resumed run sees the same batches.

    Args:
      n: number of examples.
      seed: the run's seed.
      epoch: the epoch index.

    Returns:
      An int array of shape ``(n,)``.
    """
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The example indices of every full batch of an epoch, as :func:`batches` visits them.

    Args:
      n: number of examples.
      batch_size: examples per batch.
      seed, epoch: see :func:`epoch_order`.

    Returns:
      An int array of shape ``(n // batch_size, batch_size)`` (the remainder dropped).
    """
    nb = num_batches(n, batch_size)
    return epoch_order(n, seed, epoch)[: nb * batch_size].reshape(nb, batch_size)


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int | None = None,
    epoch: int = 0,
    drop_remainder: bool = True,
    start: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mini-batches of ``(x, y)``, shuffled with NumPy from ``(seed, epoch)``.

    The order depends only on ``seed`` and ``epoch`` (:func:`epoch_order`), so a resumed run
    sees the same batches.

    Args:
      x: inputs, first axis is the example axis.
      y: labels, same length as ``x``.
      batch_size: examples per batch (``1 <= batch_size <= len(x)``).
      seed: shuffle seed; ``None`` keeps the order.
      epoch: mixed into the shuffle so every epoch has its own order.
      drop_remainder: drop the last incomplete batch (static shapes under ``jit``).
      start: index of the first batch to yield (to resume inside an epoch).

    Yields:
      ``(x_batch, y_batch)`` NumPy arrays.

    Raises:
      ValueError: bad ``batch_size`` or mismatched lengths.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} examples but y has {len(y)}")
    check_int(batch_size, name="batch_size", minimum=1)
    if batch_size > n:
        raise ValueError(f"batch_size ({batch_size}) is larger than the split ({n} examples)")
    order = np.arange(n) if seed is None else epoch_order(n, seed, epoch)
    nb = num_batches(n, batch_size, drop_remainder=drop_remainder)
    for b in range(start, nb):
        idx = order[b * batch_size : (b + 1) * batch_size]
        yield x[idx], y[idx]
