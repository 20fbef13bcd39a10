"""Random whole-pixel translations of flattened images, the classic MNIST augmentation (small
translations; e.g. Ciresan et al. 2010 use distortions of this kind).

Two forms of the same augmentation: :func:`random_shift` on the host with a NumPy generator (for
:func:`prunejax.apps.mnist.fit`'s ``augment``), and :func:`shift_images` inside ``jit`` with a
JAX key (for :func:`prunejax.apps.mnist.fit_scan`, where a whole epoch is one ``lax.scan``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["random_shift", "shift_images"]


def random_shift(
    x: np.ndarray,
    rng: np.random.Generator,
    *,
    max_shift: int = 2,
    image_shape: tuple[int, int] = (28, 28),
) -> np.ndarray:
    """Translate each flattened image by a random whole-pixel offset, filling with zeros.

    Args:
      x: images of shape ``(batch, h * w)``.
      rng: NumPy generator (so the shifts are reproducible).
      max_shift: offsets are drawn uniformly from ``[-max_shift, max_shift]`` on each axis.
      image_shape: ``(h, w)``.

    Returns:
      The shifted images, same shape and dtype as ``x``.

    Raises:
      ValueError: ``x`` is not ``(batch, h * w)`` or ``max_shift < 0``.
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


def shift_images(
    key: jax.Array,
    x: jax.Array,
    max_shift: int,
    *,
    image_shape: tuple[int, int] = (28, 28),
) -> jax.Array:
    """Translate each flattened image by a random whole-pixel offset in ``[-m, m]^2``, zero fill.

    The in-jit counterpart of :func:`random_shift` (same augmentation, drawn with a JAX key so
    a whole epoch can stay one ``lax.scan``).

    Args:
      key: JAX random key; the offsets are ``randint(key, (batch, 2), 0, 2 m + 1)``.
      x: images of shape ``(batch, h * w)``.
      max_shift: ``m``, a static Python int ``>= 0`` (0 returns ``x``).
      image_shape: ``(h, w)``.

    Returns:
      The shifted images, same shape and dtype as ``x``.
    """
    if max_shift == 0:
        return x
    h, w = image_shape
    b, m = x.shape[0], int(max_shift)
    imgs = jnp.pad(x.reshape(b, h, w), ((0, 0), (m, m), (m, m)))
    off = jax.random.randint(key, (b, 2), 0, 2 * m + 1)

    def one(img: jax.Array, o: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(img, (o[0], o[1]), (h, w))

    return jax.vmap(one)(imgs, off).reshape(b, h * w)
