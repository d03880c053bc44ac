"""Errors of the data package: each message names the file at fault and what to do about it."""
from __future__ import annotations


class DatasetError(ValueError):
    """A dataset cannot be built: wrong root, missing or malformed annotation, empty image list."""


class ImageLoadError(ValueError):
    """One image cannot be decoded (missing, corrupt, truncated, not an image, too small)."""
