"""Mesh fitting on thin structures: default ``tdr fit-mesh`` on procedural objects, checked independently.

For each shape of :mod:`taichi_dr.data.shapes` (``airplane``: thin swept wings and tail; ``chair``: thin legs;
``spot``: a blob), targets are made the way SoftRas's data are: ``--views`` rows (distance 2.732, elevation
30, azimuth every 360/views degrees; SoftRas's ``camera.npy`` has one every 3 degrees) in SoftRas's
convention (:meth:`taichi_dr.Cameras.from_spherical`, 30 degree field of view = SoftRas's
``viewing_angle=15``), silhouettes at ``--size``² drawn by :func:`numpy_silhouettes` below and saved as
SoftRas's ``source.npy`` (N, 4, H, W) uint8 and ``camera.npy``. Then the command line a user would type,

    tdr fit-mesh --targets source.npy --cameras camera.npy --out DIR [--template T.obj] [EXTRA]

runs in a subprocess (its wall time includes start-up and kernel compilation), and its ``mesh.obj`` is
scored with the same NumPy rasterizer (not the engine's renderer): mean hard IoU over all views, and the
symmetric Chamfer distance to the true mesh in % of its bounding-box diagonal (20k samples).

    python benchmarks/fit_thin.py                                  # airplane, chair, spot; 642-vertex sphere
    python benchmarks/fit_thin.py --shapes airplane --levels 3 4   # also the 2562-vertex template
    python benchmarks/fit_thin.py --shapes airplane --extra "--iters 300"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SOFTRAS_DISTANCE = 2.732
SOFTRAS_ELEVATION = 30.0
SOFTRAS_FOV = 30.0  # full angle; SoftRas's viewing_angle=15 is the half angle


# ----------------------------------------------------------------------------------------------------------
# Independent silhouettes: pinhole projection + point-in-triangle tests at pixel centres (NumPy, float64)


def _inside(tri: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """tri (F, 3, 2) pixel coordinates; px, py (F, P) or (1, P) points -> (F, P) inside or on an edge, for
    either winding (mirrored cameras flip it)."""
    edge = []
    for k in range(3):
        a, b = tri[:, k], tri[:, (k + 1) % 3]
        edge.append((b[:, 0:1] - a[:, 0:1]) * (py - a[:, 1:2]) - (b[:, 1:2] - a[:, 1:2]) * (px - a[:, 0:1]))
    edge = np.stack(edge)
    return (edge >= 0).all(0) | (edge <= 0).all(0)


def numpy_silhouettes(verts, faces, K, R, t, image_size: tuple[int, int], window: int = 8) -> np.ndarray:
    """Binary silhouettes (N, H, W): pixel (row i, column j) is set iff its centre (j + 0.5, i + 0.5) lies in
    the projection ``K (R x + t)`` of some triangle (degenerate projections cover nothing).

    verts (V, 3), faces (F, 3); K, R (N, 3, 3), t (N, 3) as in :class:`taichi_dr.Cameras` (OpenCV axes, any
    sign of fx). Every vertex must be in front of every camera. Triangles whose pixel bounding box fits in
    ``window``² are tested on that window only, the others on the whole image.
    """
    v = np.asarray(verts, np.float64)
    f = np.asarray(faces, np.int64)
    K, R, t = (np.asarray(x, np.float64) for x in (K, R, t))
    h, w = image_size
    out = np.zeros((len(K), h, w), bool)
    wy, wx = (a.ravel() for a in np.mgrid[0:window, 0:window])
    gy, gx = (a.ravel()[None] + 0.5 for a in np.mgrid[0:h, 0:w])
    for n in range(len(K)):
        cam = v @ R[n].T + t[n]
        if not (cam[:, 2] > 1e-9).all():
            raise ValueError(f"numpy_silhouettes: a vertex is behind camera {n}")
        uvw = cam @ K[n].T
        tri = (uvw[:, :2] / uvw[:, 2:3])[f]  # (F, 3, 2)
        area2 = ((tri[:, 1, 0] - tri[:, 0, 0]) * (tri[:, 2, 1] - tri[:, 0, 1])
                 - (tri[:, 1, 1] - tri[:, 0, 1]) * (tri[:, 2, 0] - tri[:, 0, 0]))
        tri = tri[area2 != 0]
        lo = np.clip(np.floor(tri.min(1) - 0.5), 0, None).astype(np.int64)  # first pixel index that can hit
        hi = np.ceil(tri.max(1) - 0.5).astype(np.int64)
        small = ((hi - lo) < window).all(1)
        img = np.zeros(h * w, bool)
        px, py = lo[small, 0:1] + wx[None], lo[small, 1:2] + wy[None]
        hit = _inside(tri[small], px + 0.5, py + 0.5) & (px < w) & (py < h)
        img[(py * w + px)[hit]] = True
        big = tri[~small]
        for s in range(0, len(big), 256):
            img |= _inside(big[s:s + 256], gx, gy).any(0)
        out[n] = img.reshape(h, w)
    return out


def hard_iou(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-view IoU of two (N, H, W) bool arrays; 1 where both are empty."""
    inter = (pred & target).reshape(len(pred), -1).sum(1)
    union = (pred | target).reshape(len(pred), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def softras_rows(views: int, distance: float = SOFTRAS_DISTANCE, elevation: float = SOFTRAS_ELEVATION
                 ) -> np.ndarray:
    """(views, 3) float32 rows (distance, elevation, azimuth) with azimuths evenly spaced from 0."""
    azimuth = np.arange(views, dtype=np.float64) * (360.0 / views)
    return np.stack([np.full(views, distance), np.full(views, elevation), azimuth], 1).astype(np.float32)


def make_problem(shape: str, views: int, size: int, scale: float = 1.0):
    """``(mesh, rows (N, 3), silhouettes (N, H, W) bool)`` for a shape of taichi_dr.data.shapes, scaled by
    ``scale`` and seen from ``scale * 2.732`` (so the images do not change with the scale)."""
    import torch

    from taichi_dr.core.camera import Cameras
    from taichi_dr.data.shapes import make_shape

    mesh = make_shape(shape)
    mesh = mesh.with_verts(mesh.verts * scale)
    rows = softras_rows(views, SOFTRAS_DISTANCE * scale)
    r64 = torch.from_numpy(rows).double()
    cams = Cameras.from_spherical(r64[:, 0], r64[:, 1], r64[:, 2], SOFTRAS_FOV, (size, size))
    sil = numpy_silhouettes(mesh.verts, mesh.faces, cams.K, cams.R, cams.t, (size, size))
    return mesh, rows, sil, cams


def run_case(shape: str, level: int, views: int, size: int, extra: list[str], workdir: Path,
             scale: float = 1.0) -> dict:
    import torch

    from taichi_dr.core.mesh import icosphere, load_mesh, save_mesh
    from taichi_dr.core.metrics import bbox_diagonal, chamfer_distance

    mesh, rows, sil, cams = make_problem(shape, views, size, scale)
    case = workdir / f"{shape}_l{level}_x{scale:g}"
    case.mkdir(parents=True, exist_ok=True)
    alpha = sil.astype(np.uint8) * 255
    np.save(case / "source.npy", np.repeat(alpha[:, None], 4, axis=1))  # SoftRas: (N, 4, H, W) uint8
    np.save(case / "camera.npy", rows)
    cmd = [sys.executable, "-m", "apps", "fit-mesh", "--targets", str(case / "source.npy"),
           "--cameras", str(case / "camera.npy"), "--out", str(case / "fit"), "--overwrite"]
    template = "icosphere(level=3)"
    if level != 3:
        sphere = icosphere(level=level)
        save_mesh(sphere, case / "template.obj")
        cmd += ["--template", str(case / "template.obj")]
        template = f"icosphere(level={level})"
    cmd += extra
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"fit-mesh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    fitted = load_mesh(case / "fit" / "mesh.obj")
    pred = numpy_silhouettes(fitted.verts, fitted.faces, cams.K, cams.R, cams.t, (size, size))
    ious = hard_iou(pred, sil)
    # One JSON row per iteration (metrics.jsonl, the training engine's log; loss_log.csv before it, with a header).
    metrics, old_log = case / "fit" / "metrics.jsonl", case / "fit" / "loss_log.csv"
    iterations = (len(metrics.read_text().splitlines()) if metrics.is_file()
                  else len(old_log.read_text().splitlines()) - 1)
    chamfer = chamfer_distance(fitted, mesh) / bbox_diagonal(mesh)
    # Wing tips (airplane) / leg ends (chair): target pixels covered among the farthest 2% from the centre.
    centre = cams.project(torch.zeros(1, 3, dtype=cams.dtype))[:, 0, :2].numpy()
    far_cov = []
    for n in range(len(sil)):
        ys, xs = np.nonzero(sil[n])
        d = np.hypot(xs + 0.5 - centre[n, 0], ys + 0.5 - centre[n, 1])
        far = d >= np.quantile(d, 0.98)
        far_cov.append(pred[n][ys[far], xs[far]].mean())
    return {"shape": shape, "scale": scale, "template": template, "verts": int(fitted.verts.shape[0]),
            "iterations": iterations, "seconds": round(seconds, 1), "iou_hard": float(ious.mean()),
            "iou_hard_min": float(ious.min()), "extremity_coverage": float(np.mean(far_cov)),
            "chamfer_pct": 100.0 * chamfer, "extra": " ".join(extra),
            "fit_says": proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["airplane", "chair", "spot"])
    p.add_argument("--levels", nargs="+", type=int, default=[3], help="icosphere levels of the template")
    p.add_argument("--scales", nargs="+", type=float, default=[1.0], help="object (and distance) scales")
    p.add_argument("--views", type=int, default=120)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--extra", default="", help="extra fit-mesh options, e.g. '--iters 300'")
    p.add_argument("--workdir", type=Path, default=None, help="keep the problems and fits here")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    a = p.parse_args()

    os.environ.setdefault("TAICHI_DR_ARCH", "cpu")
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="fit_thin_"))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {a.views} views x "
          f"{a.size}^2, SoftRas cameras (d {SOFTRAS_DISTANCE}, e {SOFTRAS_ELEVATION}); work in {workdir}")
    print("| shape | scale | template | iterations | time (s) | mean hard IoU | min IoU | extremities covered "
          "| Chamfer (% diag) |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in a.shapes:
        for level in a.levels:
            for scale in a.scales:
                r = run_case(shape, level, a.views, a.size, shlex.split(a.extra), workdir, scale)
                rows.append(r)
                print(f"| {shape} | {scale:g} | {r['template']} ({r['verts']} v) | {r['iterations']} | "
                      f"{r['seconds']:.0f} | {r['iou_hard']:.3f} | {r['iou_hard_min']:.3f} | "
                      f"{r['extremity_coverage']:.2f} | {r['chamfer_pct']:.2f} |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
