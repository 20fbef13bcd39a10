"""The one exception every reader of a prunejax model file raises."""

from __future__ import annotations

__all__ = ["FileFormatError"]


class FileFormatError(ValueError):
    """A file is not a valid prunejax model file: truncated, corrupted, tampered with, written by
    an incompatible format version, or not a prunejax file at all."""
