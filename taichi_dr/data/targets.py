"""Loading target silhouettes (and colours) for mesh fitting.

Two sources, both giving ``N`` views of the same size:

* a folder of images (PNG, or JPEG for plain masks; the suffixes of :mod:`taichi_dr.data.images`), sorted by
  file name: an image with an alpha channel gives its alpha as the silhouette
  and its RGB as the colour (how ``tdr render`` writes its views); an image without alpha is a mask
  (greyscale, or RGB with equal channels), 0 = background and 255 = object;
* a ``.npy`` array: ``(N, H, W)`` silhouettes, or ``(N, C, H, W)`` / ``(N, H, W, C)`` with ``C`` = 1
  (silhouette) or 4 (RGB + alpha = silhouette). ``uint8`` is divided by 255, floats must lie in [0, 1].
  ``C = 3`` is refused: colour without a silhouette says nothing about which pixels are the object.

Image row 0 is the top (docs/design.md), as in the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from taichi_dr.data.images import describe_suffixes, list_images, read_image, to_unit_float


@dataclass(frozen=True)
class Targets:
    """Target views.

    silhouettes: (N, H, W) float32 in [0, 1].
    rgb: (N, H, W, 3) float32 in [0, 1], or None when the source has no colour.
    names: N labels (file names, or ``"<file>[i]"`` for arrays), for messages.
    source: the path they were read from.
    """

    silhouettes: torch.Tensor
    rgb: torch.Tensor | None
    names: tuple[str, ...]
    source: str

    @property
    def num_views(self) -> int:
        return int(self.silhouettes.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.silhouettes.shape[1]), int(self.silhouettes.shape[2])


def load_targets(path: str | Path) -> Targets:
    """Read targets from a folder of PNGs or a ``.npy`` file (see the module docstring).

    Raises FileNotFoundError for a missing path and ValueError, naming the file, for anything malformed.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"targets {str(path)!r} do not exist (expected a folder of PNGs or a .npy "
                                "file)")
    if path.is_dir():
        return _load_image_folder(path)
    if path.suffix.lower() == ".npy":
        return _load_npy(path)
    raise ValueError(f"targets {str(path)!r}: expected a folder of PNGs or a .npy file, got a "
                     f"{path.suffix or 'suffix-less'} file")


def _split_image(img: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One decoded image (H, W) or (H, W, C) in [0, 1] -> (silhouette (H, W), rgb (H, W, 3) or None)."""
    if img.ndim == 2:
        return img, None
    if img.ndim != 3:
        raise ValueError(f"{where}: expected a 2-D image, got an array of shape {img.shape}")
    c = img.shape[2]
    if c == 1:
        return img[..., 0], None
    if c == 2:  # grey + alpha
        return img[..., 1], None
    if c == 4:
        return img[..., 3], img[..., :3]
    if c == 3:
        # A mask saved as RGB is fine; real colour without alpha has no silhouette.
        if np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2]):
            return img[..., 0], None
        raise ValueError(f"{where}: an RGB image without an alpha channel has no silhouette; give RGBA "
                         "images (alpha = silhouette) or greyscale masks")
    raise ValueError(f"{where}: expected 1, 2, 3 or 4 channels, got {c}")


def _load_image_folder(folder: Path) -> Targets:
    files = list_images(folder)
    if not files:
        raise ValueError(f"targets folder {str(folder)!r} holds no {describe_suffixes()} images")
    sils, rgbs = [], []
    for f in files:
        sil, rgb = _split_image(read_image(f), f"target image {str(f)!r}")
        if sils and sil.shape != sils[0].shape:
            raise ValueError(f"target image {str(f)!r} is {sil.shape[1]}x{sil.shape[0]} (WxH) but "
                             f"{str(files[0])!r} is {sils[0].shape[1]}x{sils[0].shape[0]}; all targets "
                             "must have the same size")
        sils.append(sil)
        rgbs.append(rgb)
    has_rgb = [r is not None for r in rgbs]
    rgb = None
    if all(has_rgb):
        rgb = torch.from_numpy(np.stack(rgbs)).contiguous()
    elif any(has_rgb):
        first_plain = files[has_rgb.index(False)]
        first_rgba = files[has_rgb.index(True)]
        raise ValueError(f"targets folder {str(folder)!r} mixes RGBA images ({first_rgba.name}) and masks "
                         f"({first_plain.name}); use one kind")
    return Targets(silhouettes=torch.from_numpy(np.stack(sils)).contiguous(), rgb=rgb,
                   names=tuple(f.name for f in files), source=str(folder))


def _load_npy(path: Path) -> Targets:
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"targets {str(path)!r} could not be read as a .npy array ({e})") from None
    where = f"targets {str(path)!r}"
    if a.ndim == 3:
        a = a[..., None]
    elif a.ndim == 4:
        if a.shape[1] in (1, 3, 4):  # (N, C, H, W), the documented layout
            a = np.moveaxis(a, 1, -1)
        elif a.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{where}: expected (N, H, W), (N, C, H, W) or (N, H, W, C) with C in "
                             f"(1, 3, 4), got shape {a.shape}")
    else:
        raise ValueError(f"{where}: expected (N, H, W), (N, C, H, W) or (N, H, W, C), got shape {a.shape}")
    n, h, w, c = a.shape
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"{where}: empty array of shape {a.shape}")
    if c == 3:
        raise ValueError(f"{where}: has 3 (RGB) channels but no silhouette; give (N, 4, H, W) with alpha "
                         "as the silhouette, or (N, H, W) masks")
    a = to_unit_float(a, where)
    sil = torch.from_numpy(np.ascontiguousarray(a[..., -1]))
    rgb = torch.from_numpy(np.ascontiguousarray(a[..., :3])) if c == 4 else None
    return Targets(silhouettes=sil, rgb=rgb, names=tuple(f"{path.name}[{i}]" for i in range(n)),
                   source=str(path))
