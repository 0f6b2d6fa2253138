"""Image files: the one list of suffixes the data layer reads, listing a folder, decoding to floats in [0, 1].

Every reader of images in the data layer (multi-view datasets, fitting targets) goes through here, so they
accept the same files and fail with the same one-line messages naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def describe_suffixes() -> str:
    """``".png, .jpg or .jpeg"`` for messages."""
    return ", ".join(IMAGE_SUFFIXES[:-1]) + " or " + IMAGE_SUFFIXES[-1]


def list_images(folder: Path) -> list[Path]:
    """The image files (by :data:`IMAGE_SUFFIXES`, any case) directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def to_unit_float(a: np.ndarray, where: str) -> np.ndarray:
    """uint8 -> /255, uint16 -> /65535, bool -> 0/1, float -> checked finite and in [0, 1]; float32 out.

    where: what the values are, for messages (a file name).
    """
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{where}: contains NaN or Inf values")
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{where}: float values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
        return a
    raise ValueError(f"{where}: expected uint8, uint16 or float values, got dtype {a.dtype}")


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to ``(H, W, C)`` float32 in [0, 1], ``C`` in 1..4 (grey, grey + alpha, RGB, RGBA).

    ValueError naming the file for an unreadable file, another pixel type or another shape.
    """
    import imageio.v3 as iio

    try:
        with warnings.catch_warnings():  # imageio warns about its plugins while it tries them
            warnings.simplefilter("ignore")
            img = np.asarray(iio.imread(path))
    except Exception as e:  # imageio raises many types for undecodable files
        raise ValueError(f"{path}: not a readable image ({e})") from None
    img = to_unit_float(img, str(path))
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"{path}: expected a greyscale, RGB or RGBA image, got an array of shape {img.shape}")
    return img
