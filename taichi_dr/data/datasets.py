"""Multi-view datasets for reconstruction: posed images, with object masks where the source has them.

Two layouts on disk, one container in memory (:class:`MultiViewDataset`):

* IDR / NeuS (``load_idr``): ``image/*.png|jpg``, ``mask/*.png`` (optional) and ``cameras.npz`` with ``world_mat_i``
  (``P = K [R | t]`` as 4x4 or 3x4, pixel units) and optionally ``scale_mat_i`` (a similarity that maps the
  unit sphere, where the object is, into world coordinates). The cameras used for training are those of
  the normalised projections ``(world_mat_i @ scale_mat_i)[:3]``, so the object lies inside the unit sphere;
  ``scale_mat`` is kept to bring results (meshes) back to world units.
* NeRF-synthetic (``load_nerf_synthetic``): ``transforms_{train,val,test}.json`` with ``camera_angle_x``
  (radians) and per frame ``file_path`` and an OpenGL camera-to-world ``transform_matrix``; RGBA images, whose
  alpha is the mask, or RGB images (no masks; the background as photographed). Poses are converted to OpenCV
  axes and the scene is scaled by ``1 / scene_radius``.

Both loaders validate what they read and raise ValueError naming the file and what is wrong (missing keys,
counts of images, masks and cameras that differ, mixed image sizes, empty masks, cameras whose rays miss
the unit sphere). :func:`split_holdout` keeps every K-th view out for evaluation; :func:`sample_rays` draws
training rays; :func:`write_idr` writes the IDR layout (``tdr make-dataset``, test fixtures).

Images are ``(N, H, W, 3)`` float32 in [0, 1]; masks ``(N, H, W)`` bool, or None (methods that need them,
such as IDR's mask loss, call :meth:`MultiViewDataset.require_masks`); row 0 is the top of the image.
The data layer knows no renderer: rendering a known shape into a dataset is the tests' job
(``tests/sdf_scenes.py``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from taichi_dr.core.camera import Cameras, load_cameras
from taichi_dr.core.rays import intersect_sphere
from taichi_dr.data.images import IMAGE_SUFFIXES, describe_suffixes, list_images, read_image

__all__ = ["IMAGE_SUFFIXES", "MultiViewDataset", "RayBatch", "load_dataset", "load_idr", "load_nerf_synthetic",
           "rays_for_pixels", "sample_rays", "split_holdout", "validate_dataset", "write_idr"]


@dataclass(frozen=True)
class MultiViewDataset:
    """Posed views of one object, in normalised coordinates (the object inside the unit sphere).

    images: (N, H, W, 3) float32 in [0, 1].
    masks: (N, H, W) bool, True on the object; None when the source has no masks.
    cameras: N cameras (float32) of the normalised scene.
    scale_mat: (4, 4) float64, normalised -> world coordinates (``x_w = S @ [x_n, 1]``).
    names: N labels (image file names) for messages and outputs.
    source: where it was read from ("" for in-memory data).
    """

    images: torch.Tensor
    masks: torch.Tensor | None
    cameras: Cameras
    scale_mat: torch.Tensor
    names: tuple[str, ...]
    source: str = ""

    def __post_init__(self):
        n = len(self.names)
        if self.images.dim() != 4 or self.images.shape[-1] != 3 or self.images.shape[0] != n:
            raise ValueError(f"MultiViewDataset: images must be (N={n}, H, W, 3), "
                             f"got {tuple(self.images.shape)}")
        if self.masks is not None and (self.masks.shape != self.images.shape[:3] or self.masks.dtype != torch.bool):
            raise ValueError(f"MultiViewDataset: masks must be bool (N, H, W) = "
                             f"{tuple(self.images.shape[:3])}, got {self.masks.dtype} "
                             f"{tuple(self.masks.shape)}")
        if len(self.cameras) != n:
            raise ValueError(f"MultiViewDataset: {len(self.cameras)} cameras for {n} views")
        if tuple(self.cameras.image_size) != self.image_size:
            raise ValueError(f"MultiViewDataset: cameras are for images of {self.cameras.image_size}, the "
                             f"images are {self.image_size}")
        if tuple(self.scale_mat.shape) != (4, 4):
            raise ValueError(f"MultiViewDataset: scale_mat must be 4x4, got {tuple(self.scale_mat.shape)}")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    def require_masks(self, what: str) -> torch.Tensor:
        """The masks; a one-line ValueError saying that ``what`` (e.g. "IDR's mask loss") needs them if the
        dataset has none."""
        if self.masks is None:
            raise ValueError(f"{what} needs object masks, but {self.source or 'the dataset'} has none (IDR layout: "
                             "a mask/ folder; NeRF-synthetic: RGBA images whose alpha is the mask)")
        return self.masks

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, indices) -> MultiViewDataset:
        """The views at ``indices`` (a list of ints)."""
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"MultiViewDataset.subset: view indices {bad} out of range for "
                             f"{len(self)} views")
        t = torch.as_tensor(idx, dtype=torch.long)
        return replace(self, images=self.images[t], masks=None if self.masks is None else self.masks[t],
                       cameras=self.cameras[t],
                       names=tuple(self.names[i] for i in idx))

    def to_world(self, points: torch.Tensor) -> torch.Tensor:
        """Normalised points (M, 3) -> world coordinates (M, 3) (float64 maths, the input's dtype out)."""
        s = self.scale_mat.to(torch.float64)
        p = points.to(torch.float64) @ s[:3, :3].T + s[:3, 3]
        return p.to(points.dtype)


# ---------------------------------------------------------------------------------------------------------
# reading


def _list_images(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"{folder}: missing {what} folder")
    files = list_images(folder)
    if not files:
        raise ValueError(f"{folder}: no {what} files ({describe_suffixes()})")
    return files


def _stack_same_size(arrays: list[np.ndarray], files: list[Path], what: str) -> np.ndarray:
    size = arrays[0].shape[:2]
    for a, f in zip(arrays, files, strict=True):
        if a.shape[:2] != size:
            raise ValueError(f"{f}: {what} is {a.shape[1]}x{a.shape[0]} (WxH) but {files[0].name} is "
                             f"{size[1]}x{size[0]}; all views must have one size")
    return np.stack(arrays)


def _mask_from(img: np.ndarray) -> np.ndarray:
    """(H, W, C) in [0, 1] -> (H, W) bool: the alpha of RGBA / grey+alpha, else the first channel."""
    channel = img[..., -1] if img.shape[-1] in (2, 4) else img[..., 0]
    return channel > 0.5


def _check_masks(masks: np.ndarray, names: list[str]) -> None:
    empty = [n for m, n in zip(masks, names, strict=True) if not m.any()]
    if empty:
        raise ValueError(f"empty object masks (no pixel on the object) in {len(empty)} view(s): "
                         f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")


def load_idr(root, *, validate: bool = True) -> MultiViewDataset:
    """Read an IDR / NeuS dataset folder (see the module docstring); without a ``mask/`` folder the dataset
    has no masks."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    npz = root / "cameras.npz"
    if not npz.is_file():
        raise ValueError(f"{root}: missing cameras.npz (IDR layout: image/, mask/, cameras.npz)")
    image_files = _list_images(root / "image", "image")
    mask_files = _list_images(root / "mask", "mask") if (root / "mask").exists() else None
    with np.load(npz, allow_pickle=False) as data:
        keys = set(data.files)
        world_ids = sorted(int(m.group(1)) for k in keys if (m := re.fullmatch(r"world_mat_(\d+)", k)))
        scale_keys = sorted(k for k in keys if re.fullmatch(r"scale_mat_\d+", k))
        scales = [np.asarray(data[k], dtype=np.float64) for k in scale_keys]
    if not world_ids:
        raise ValueError(f"{npz}: no 'world_mat_<i>' arrays (keys: {sorted(keys)[:8]})")
    if world_ids != list(range(len(world_ids))):
        missing = sorted(set(range(world_ids[-1] + 1)) - set(world_ids))
        raise ValueError(f"{npz}: world_mat indices must run 0..{world_ids[-1]}; missing {missing[:5]}")
    counts = {"images": len(image_files), "cameras (world_mat_i)": len(world_ids)}
    if mask_files is not None:
        counts = {"images": len(image_files), "masks": len(mask_files), "cameras (world_mat_i)": len(world_ids)}
    if len(set(counts.values())) != 1:
        raise ValueError(f"{root}: counts differ: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if scale_keys and len(scale_keys) != len(world_ids):
        raise ValueError(f"{npz}: {len(scale_keys)} scale_mat_i for {len(world_ids)} world_mat_i")
    scale_mat = np.eye(4)
    if scales:
        for k, s in zip(scale_keys, scales, strict=True):
            if s.shape != (4, 4) or not np.isfinite(s).all():
                raise ValueError(f"{npz}: {k!r} must be a finite 4x4 matrix, got shape {s.shape}")
        scale_mat = scales[0]
        ref = np.abs(scale_mat).max()
        for k, s in zip(scale_keys, scales, strict=True):
            if np.abs(s - scale_mat).max() > 1e-6 * ref:
                raise ValueError(f"{npz}: {k} differs from {scale_keys[0]}; one normalisation must serve "
                                 "all views")

    images = [read_image(f) for f in image_files]
    img = _stack_same_size(images, image_files, "image")
    if img.shape[-1] in (2, 4):          # drop an alpha channel
        img = img[..., :-1]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    masks = None
    if mask_files is not None:
        masks = _stack_same_size([read_image(f) for f in mask_files], mask_files, "mask")
        if masks.shape[1:3] != img.shape[1:3]:
            raise ValueError(f"{mask_files[0]}: masks are {masks.shape[2]}x{masks.shape[1]} (WxH) but images are "
                             f"{img.shape[2]}x{img.shape[1]}")
        masks = np.stack([_mask_from(m) for m in masks])
        _check_masks(masks, [f.name for f in mask_files])
    names = [f.name for f in image_files]
    image_size = (int(img.shape[1]), int(img.shape[2]))
    cameras = load_cameras(npz, image_size=image_size, dtype=torch.float32)
    ds = MultiViewDataset(images=torch.from_numpy(np.ascontiguousarray(img)),
                          masks=None if masks is None else torch.from_numpy(masks),
                          cameras=cameras, scale_mat=torch.from_numpy(scale_mat), names=tuple(names),
                          source=str(root))
    if validate:
        validate_dataset(ds)
    return ds


def load_nerf_synthetic(root, split: str = "train", *, scene_radius: float = 1.5, background: float = 1.0,
                        validate: bool = True) -> MultiViewDataset:
    """Read one split of a NeRF-synthetic scene (``transforms_<split>.json`` + RGBA or RGB images).

    RGBA images: the alpha is the mask and the RGB is composited onto ``background``. RGB images (all of the
    split): no masks, the images as they are.

    scene_radius: radius (world units) of a sphere around the origin that holds the object; the scene is
        divided by it so the object lies in the unit sphere (Blender scenes fit in 1.5).
    background: grey level the RGB of RGBA images is composited onto where alpha < 1.
    """
    root = Path(root)
    path = root / f"transforms_{split}.json"
    if not path.is_file():
        raise ValueError(f"{root}: missing transforms_{split}.json (NeRF-synthetic layout)")
    if not scene_radius > 0:
        raise ValueError(f"scene_radius must be > 0, got {scene_radius}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(doc, dict) or "camera_angle_x" not in doc or "frames" not in doc:
        raise ValueError(f"{path}: expected an object with 'camera_angle_x' and 'frames'")
    frames = doc["frames"]
    if not isinstance(frames, list) or not frames:
        raise ValueError(f"{path}: 'frames' must be a non-empty list")
    files, c2ws = [], []
    for i, fr in enumerate(frames):
        for key in ("file_path", "transform_matrix"):
            if not isinstance(fr, dict) or key not in fr:
                raise ValueError(f"{path}: frame {i}: missing key {key!r}")
        f = (root / fr["file_path"]).resolve()
        if not f.suffix:
            f = f.with_suffix(".png")
        if not f.is_file():
            raise ValueError(f"{path}: frame {i}: image {f} not found")
        m = np.asarray(fr["transform_matrix"], dtype=np.float64)
        if m.shape not in ((4, 4), (3, 4)) or not np.isfinite(m).all():
            raise ValueError(f"{path}: frame {i}: 'transform_matrix' must be a finite 4x4 matrix")
        files.append(f)
        c2ws.append(m[:3])
    decoded = [read_image(f) for f in files]
    for a, f in zip(decoded, files, strict=True):
        if a.shape[-1] not in (3, 4):
            raise ValueError(f"{f}: expected an RGB or RGBA image (the alpha channel is the mask), got "
                             f"{a.shape[-1]} channel(s)")
        if a.shape[-1] != decoded[0].shape[-1]:
            raise ValueError(f"{f}: has {a.shape[-1]} channels but {files[0].name} has {decoded[0].shape[-1]}; "
                             "a split must be all RGBA (with masks) or all RGB (without)")
    arr = _stack_same_size(decoded, files, "image")
    names = [f.name for f in files]
    masks = None
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:]
        img = arr[..., :3] * alpha + background * (1 - alpha)
        masks = alpha[..., 0] > 0.5
        _check_masks(masks, names)
    else:
        img = arr
    h, w = int(arr.shape[1]), int(arr.shape[2])
    c2w = np.stack(c2ws)
    c2w[:, :, 3] /= scene_radius
    fov = math.degrees(float(doc["camera_angle_x"]))
    cameras = Cameras.from_opengl_c2w(torch.from_numpy(c2w), (h, w), fov=fov).to(dtype=torch.float32)
    scale = np.diag([scene_radius, scene_radius, scene_radius, 1.0])
    ds = MultiViewDataset(images=torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)),
                          masks=None if masks is None else torch.from_numpy(masks), cameras=cameras,
                          scale_mat=torch.from_numpy(scale),
                          names=tuple(names), source=str(root))
    if validate:
        validate_dataset(ds)
    return ds


def load_dataset(root, **kwargs) -> MultiViewDataset:
    """Read a dataset folder in whichever layout it has (IDR ``cameras.npz``, or NeRF-synthetic JSON)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    if (root / "cameras.npz").is_file():
        return load_idr(root, **kwargs)
    if (root / "transforms_train.json").is_file():
        return load_nerf_synthetic(root, **kwargs)
    raise ValueError(f"{root}: not a dataset folder: expected cameras.npz with image/ and mask/ (IDR layout) "
                     "or transforms_train.json (NeRF-synthetic layout)")


# ---------------------------------------------------------------------------------------------------------
# checks, splits, rays


def validate_dataset(ds: MultiViewDataset, bounding_radius: float = 1.0, max_miss_fraction: float = 0.01,
                     max_rays_per_view: int = 4096) -> None:
    """Check that the object can be reconstructed inside the bounding sphere.

    Every camera centre must lie outside the sphere, and the rays through each view's mask pixels (a strided
    subset of at most ``max_rays_per_view``) must hit it: if more than ``max_miss_fraction`` of them miss,
    the scene is not normalised (wrong ``scale_mat``, or cameras in other units). Without masks, which pixels
    see the object is unknown: each view must then see the sphere at all (some ray through its pixels hits it).
    """
    where = ds.source or "dataset"
    centres = ds.cameras.camera_centers().detach().to(torch.float64)
    inside = centres.norm(dim=-1) <= bounding_radius
    if bool(inside.any()):
        i = int(inside.nonzero()[0, 0])
        raise ValueError(f"{where}: camera of view {i} ({ds.names[i]}) is inside the bounding sphere of "
                         f"radius {bounding_radius} (distance {centres[i].norm().item():.3g}); the scene is "
                         "not normalised so that the object fits in the unit sphere")
    h, w = ds.image_size
    for i in range(len(ds)):
        seen = ds.masks[i] if ds.masks is not None else torch.ones((h, w), dtype=torch.bool)
        pix = seen.nonzero()
        stride = max(1, math.ceil(pix.shape[0] / max_rays_per_view))
        pix = pix[::stride]
        uv = torch.stack([pix[:, 1], pix[:, 0]], -1).to(ds.cameras.dtype) + 0.5
        o, d = ds.cameras[i].detach().pixel_rays(uv)
        _, _, hit = intersect_sphere(o[0].to(torch.float64), d[0].to(torch.float64), bounding_radius)
        miss = float((~hit).double().mean())
        if ds.masks is None:
            if miss == 1.0:
                raise ValueError(f"{where}: no ray of view {i} ({ds.names[i]}) meets the bounding sphere of "
                                 f"radius {bounding_radius}: the view does not see the normalised scene (check "
                                 "scale_mat / scene_radius)")
        elif miss > max_miss_fraction:
            raise ValueError(f"{where}: {100 * miss:.1f}% of the mask pixels of view {i} ({ds.names[i]}) "
                             f"have rays that miss the bounding sphere of radius {bounding_radius}: the "
                             "object is not inside it (check scale_mat / scene_radius)")


def split_holdout(ds: MultiViewDataset, every: int) -> tuple[MultiViewDataset, MultiViewDataset | None]:
    """Split into (train, held-out): views ``0, K, 2K, ...`` are held out (``every = K >= 2``);
    ``every = 0`` keeps all views for training and returns ``None`` for the held-out set."""
    if every == 0:
        return ds, None
    if every < 2:
        raise ValueError(f"holdout every K views: K must be 0 (no holdout) or >= 2, got {every}")
    test = [i for i in range(len(ds)) if i % every == 0]
    train = [i for i in range(len(ds)) if i % every != 0]
    if not train:
        raise ValueError(f"holdout every {every} views leaves no training view out of {len(ds)}")
    return ds.subset(train), ds.subset(test)


@dataclass
class RayBatch:
    """Training rays (normalised scene).

    origins, dirs: (N, 3), unit dirs; differentiable in the cameras they came from.
    rgb: (N, 3) target colours; mask: (N,) bool target mask (None for a dataset without masks);
    view: (N,) long; pixels: (N, 2) (u, v).
    """

    origins: torch.Tensor
    dirs: torch.Tensor
    rgb: torch.Tensor
    mask: torch.Tensor | None
    view: torch.Tensor
    pixels: torch.Tensor


def rays_for_pixels(cameras: Cameras, view: torch.Tensor, pixels: torch.Tensor):
    """Rays of pixel positions ``pixels (N, 2)`` (u, v) seen by camera ``view (N,)``: origins, dirs (N, 3)."""
    o, d = cameras[view].pixel_rays(pixels[:, None, :])
    return o[:, 0], d[:, 0]


def sample_rays(ds: MultiViewDataset, n: int, generator: torch.Generator | None = None,
                cameras: Cameras | None = None) -> RayBatch:
    """``n`` rays through pixel centres drawn uniformly over all pixels of all views.

    cameras: the cameras to use (e.g. learnable refinements of ``ds.cameras``); default ``ds.cameras``.
    """
    if n < 1:
        raise ValueError(f"sample_rays: n must be >= 1, got {n}")
    h, w = ds.image_size
    flat = torch.randint(0, len(ds) * h * w, (n,), generator=generator)
    view, rem = flat // (h * w), flat % (h * w)
    row, col = rem // w, rem % w
    cams = ds.cameras if cameras is None else cameras
    pixels = torch.stack([col, row], -1).to(cams.dtype) + 0.5
    o, d = rays_for_pixels(cams, view.to(cams.device), pixels.to(cams.device))
    mask = None if ds.masks is None else ds.masks[view, row, col]
    return RayBatch(o, d, ds.images[view, row, col], mask, view, pixels)


# ---------------------------------------------------------------------------------------------------------
# writing


def write_idr(root, images, masks, cameras: Cameras, scale_mat=None, *, overwrite: bool = False) -> None:
    """Write views in the IDR layout: ``image/000000.png``, ``mask/000.png``, ``cameras.npz``.

    images: (N, H, W, 3) float in [0, 1]; masks: (N, H, W) bool or float, or None (no ``mask/`` folder);
    cameras: N cameras of the
    *normalised* scene; scale_mat: (4, 4) normalised -> world (default identity). ``world_mat_i`` is written
    as ``[K (R | t) ; 0 0 0 1] @ scale_mat^-1`` so that loading gives back these cameras and scale_mat.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root}: output folder is not empty (pass overwrite=True)")
    import imageio.v3 as iio

    images = torch.as_tensor(images).detach().cpu().float()
    masks = None if masks is None else torch.as_tensor(masks).detach().cpu()
    n = images.shape[0]
    mask_shape = images.shape[:3] if masks is None else masks.shape
    if images.dim() != 4 or images.shape[-1] != 3 or mask_shape != images.shape[:3] or len(cameras) != n:
        raise ValueError(f"write_idr: expected images (N, H, W, 3), masks (N, H, W) or None and N cameras, got "
                         f"{tuple(images.shape)}, {tuple(mask_shape)} and {len(cameras)}")
    if bool(cameras.mirrored.any()):
        # P = K [R | t] of a mirrored camera (fx < 0) has det < 0, which IDR's loaders (and ours) read as a
        # proper camera with a negative projective scale: a different camera. Refuse rather than write it.
        i = int(cameras.mirrored.nonzero()[0, 0])
        raise ValueError(f"write_idr: camera {i} is mirrored (fx < 0, e.g. SoftRas-convention spherical "
                         "cameras); IDR's cameras.npz holds only proper cameras (use "
                         "Cameras.from_spherical(..., convention='opencv'))")
    s = np.eye(4) if scale_mat is None else np.asarray(torch.as_tensor(scale_mat).cpu(), dtype=np.float64)
    (root / "image").mkdir(parents=True, exist_ok=True)
    if masks is not None:
        (root / "mask").mkdir(parents=True, exist_ok=True)
    cams = cameras.detach().to(device="cpu", dtype=torch.float64)
    arrays = {}
    s_inv = np.linalg.inv(s)
    for i in range(n):
        P = np.eye(4)
        P[:3, :3] = cams.K[i].numpy() @ cams.R[i].numpy()
        P[:3, 3] = cams.K[i].numpy() @ cams.t[i].numpy()
        arrays[f"world_mat_{i}"] = P @ s_inv
        arrays[f"scale_mat_{i}"] = s
        img = (images[i].clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
        iio.imwrite(root / "image" / f"{i:06d}.png", img)
        if masks is not None:
            iio.imwrite(root / "mask" / f"{i:03d}.png", ((masks[i].float() > 0.5).numpy() * 255).astype(np.uint8))
    np.savez(root / "cameras.npz", **arrays)
