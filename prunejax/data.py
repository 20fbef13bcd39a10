"""MNIST through tensorflow-datasets (no TensorFlow), with a decoded-array cache and batching.

The prepared TFDS directory (``mnist/3.0.1/*.array_record``) is read with
``tfds.data_source``, which needs Pillow but not TensorFlow.  Decoding the 70,000 PNGs takes a few
seconds, so the decoded arrays are cached as a ``.npz`` file (written atomically) keyed by the
source directory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "MNIST",
    "MNIST_TRAIN_LABEL_COUNTS",
    "batches",
    "cache_dir",
    "find_data_dir",
    "load_mnist",
    "num_batches",
    "random_shift",
]

MNIST_TRAIN_LABEL_COUNTS = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
_SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_CACHE_VERSION = 1


class MNIST(NamedTuple):
    """MNIST arrays: images float32 in ``[0, 1]`` of shape ``(n, 784)``, labels int32 ``(n,)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _candidates() -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    env = os.environ.get("TFDS_DATA_DIR")
    if env:
        out.append(("$TFDS_DATA_DIR", Path(env).expanduser()))
    root = _repo_root()
    out.append(("repository copy", root / "data" / "tensorflow_datasets"))
    out.append(
        (
            "shared data beside the repository",
            root.parent / "shared" / "data" / "tensorflow_datasets",
        )
    )
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
    ``<repo>/data/tensorflow_datasets`` > ``<repo>/../shared/data/tensorflow_datasets`` >
    ``~/tensorflow_datasets``; the first that holds a prepared ``mnist`` wins.

    Args:
      data_dir: an explicit TFDS data directory.

    Returns:
      The directory (its ``mnist/<version>/`` subdirectory holds the array_record files).

    Raises:
      FileNotFoundError: no candidate holds MNIST; the message lists every place looked at.
    """
    if data_dir is not None:
        cands = [("data_dir argument", Path(data_dir).expanduser())]
    else:
        cands = _candidates()
    for _, d in cands:
        if _has_mnist(d):
            return d.resolve()
    looked = "\n".join(f"  - {d / 'mnist'} ({why})" for why, d in cands)
    raise FileNotFoundError(
        "MNIST (a prepared tensorflow-datasets directory mnist/<version>/ with array_record "
        f"files) was not found. Looked in:\n{looked}\n"
        "Provide it with --data-dir / load_mnist(data_dir=...) or $TFDS_DATA_DIR, or copy a "
        "prepared tensorflow_datasets directory to <repo>/data/tensorflow_datasets "
        '(on a machine with network: `python -c "import tensorflow_datasets as tfds; '
        "tfds.data_source('mnist')\"` prepares ~/tensorflow_datasets)."
    )


def cache_dir() -> Path:
    """Where decoded arrays are cached: ``$PRUNEJAX_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/prunejax``, else ``~/.cache/prunejax``."""
    env = os.environ.get("PRUNEJAX_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "prunejax"


def _source_key(data_dir: Path) -> str:
    h = hashlib.sha256()
    h.update(f"v{_CACHE_VERSION}:{data_dir}".encode())
    for f in sorted((data_dir / "mnist").rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(data_dir)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _decode(data_dir: Path) -> dict[str, np.ndarray]:
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


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def load_mnist(data_dir: str | os.PathLike | None = None, *, cache: bool = True) -> MNIST:
    """Load MNIST (LeCun et al. 1998) as NumPy arrays, offline.

    Args:
      data_dir: TFDS data directory; see :func:`find_data_dir` for the default resolution.
      cache: read/write the decoded arrays in :func:`cache_dir` (keyed by the source path and
        its files' sizes and times).  An unwritable cache directory is skipped silently.

    Returns:
      :class:`MNIST` with ``x_*`` float32 in ``[0, 1]`` of shape ``(n, 784)`` and ``y_*`` int32:
      60,000 training and 10,000 test examples.

    Raises:
      FileNotFoundError: MNIST was not found (the message says where it looked).
    """
    src = find_data_dir(data_dir)
    arrays: dict[str, np.ndarray] | None = None
    cache_file = cache_dir() / f"mnist-{_source_key(src)}.npz"
    if cache and cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                arrays = {k: z[k] for k in z.files}
            _check(arrays, str(cache_file))
        except Exception:  # a damaged cache is rebuilt from the source
            arrays = None
    if arrays is None:
        arrays = _decode(src)
        _check(arrays, str(src))
        if cache:
            try:
                _atomic_savez(cache_file, arrays)
            except OSError:
                pass
    return MNIST(
        x_train=arrays["x_train"].astype(np.float32) / 255.0,
        y_train=arrays["y_train"].astype(np.int32),
        x_test=arrays["x_test"].astype(np.float32) / 255.0,
        y_test=arrays["y_test"].astype(np.int32),
    )


def num_batches(n: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """Number of batches :func:`batches` yields for ``n`` examples."""
    return n // batch_size if drop_remainder else -(-n // batch_size)


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

    The order depends only on ``seed`` and ``epoch``, so a resumed run sees the same batches.

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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size > n:
        raise ValueError(f"batch_size ({batch_size}) is larger than the split ({n} examples)")
    if seed is None:
        order = np.arange(n)
    else:
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    nb = num_batches(n, batch_size, drop_remainder=drop_remainder)
    for b in range(start, nb):
        idx = order[b * batch_size : (b + 1) * batch_size]
        yield x[idx], y[idx]


def random_shift(
    x: np.ndarray,
    rng: np.random.Generator,
    *,
    max_shift: int = 2,
    image_shape: tuple[int, int] = (28, 28),
) -> np.ndarray:
    """Translate each flattened image by a random whole-pixel offset, filling with zeros.

    The classic MNIST augmentation (small translations; e.g. Ciresan et al. 2010 use distortions
    of this kind).

    Args:
      x: images of shape ``(batch, h * w)``.
      rng: NumPy generator (so the shifts are reproducible).
      max_shift: offsets are drawn uniformly from ``[-max_shift, max_shift]`` on each axis.
      image_shape: ``(h, w)``.

    Returns:
      The shifted images, same shape and dtype as ``x``.
    """
    h, w = image_shape
    if x.ndim != 2 or x.shape[1] != h * w:
        raise ValueError(f"x must have shape (batch, {h * w}), got {x.shape}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return x
    b, m = x.shape[0], int(max_shift)
    padded = np.pad(x.reshape(b, h, w), ((0, 0), (m, m), (m, m)))
    dy = rng.integers(0, 2 * m + 1, size=b)
    dx = rng.integers(0, 2 * m + 1, size=b)
    rows = (dy[:, None] + np.arange(h)[None, :])[:, :, None]
    cols = (dx[:, None] + np.arange(w)[None, :])[:, None, :]
    return padded[np.arange(b)[:, None, None], rows, cols].reshape(b, h * w)
