"""Pictures of reconstructed meshes seen from a dataset's own cameras, one row per mesh, for the docs.

Meshes written by ``tdr reconstruct`` are in the dataset's world coordinates; they are brought back into its
normalised frame (the inverse of ``scale_mat``) and rendered through the dataset's cameras, grey, lit from the
camera, on white (the rasterizer in hard mode).

    python benchmarks/mesh_pictures.py ../shared/data/dtu_scan24 --views 0 12 24 36 \\
        --mesh IDR=runs/dtu_idr/mesh.ply --mesh UNISURF=runs/dtu_unisurf/mesh.ply --out docs/images/dtu_meshes.png
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from taichi_dr.core import runtime  # noqa: E402
from taichi_dr.core.camera import Cameras  # noqa: E402
from taichi_dr.core.mesh import load_mesh  # noqa: E402
from taichi_dr.data.datasets import load_dataset  # noqa: E402
from taichi_dr.raster import RasterSettings  # noqa: E402
from taichi_dr.raster.renderer import render_mesh  # noqa: E402
from taichi_dr.raster.shading import Lights  # noqa: E402


def normalised(mesh, scale_mat: torch.Tensor):
    s = scale_mat.to(torch.float64)
    verts = (mesh.verts.double() - s[:3, 3]) @ torch.linalg.inv(s[:3, :3]).T
    return mesh.with_verts(verts.float())


def camera_light(camera) -> Lights:
    """Ambient 0.35 plus a white light from the camera's position (the direction towards it)."""
    centre = -(camera.R[0].T @ camera.t[0])
    return Lights(ambient=torch.full((3,), 0.35), directions=centre[None] / centre.norm(),
                  colors=torch.full((1, 3), 0.65), specular=torch.zeros(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--mesh", action="append", required=True, help="LABEL=PATH, one row each")
    parser.add_argument("--views", type=int, nargs="+", default=[0, 12, 24, 36])
    parser.add_argument("--scale", type=float, default=0.5, help="image size relative to the dataset's")
    parser.add_argument("--zoom", type=float, default=0.6, help="focal length factor (< 1 sees more around)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runtime.init("cpu")
    import imageio.v3 as iio

    from taichi_dr.pipelines.views import scale_cameras

    ds = load_dataset(args.data)
    cams = scale_cameras(ds.cameras, args.scale)
    K = cams.K.clone()
    K[:, :2, :2] *= args.zoom            # focal lengths (and skew) only: the principal point stays
    cams = Cameras(K, cams.R, cams.t, cams.image_size)
    rows = []
    for spec in args.mesh:
        label, path = spec.split("=", 1)
        mesh = normalised(load_mesh(path), ds.scale_mat)
        tiles = []
        for v in args.views:
            cam = cams[v]
            out = render_mesh(mesh, cam, camera_light(cam), RasterSettings(mode="hard", far=1000.0),
                              outputs=("rgb",))
            rgb = out.rgb[0] * out.alpha[0, ..., None] + (1 - out.alpha[0, ..., None])
            tiles.append((rgb.clamp(0, 1) * 255 + 0.5).byte().numpy())
        gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate(sum(([t, gap] for t in tiles), [])[:-1], axis=1))
        print(f"{label}: {path} ({mesh.num_faces} faces)")
    gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    iio.imwrite(args.out, np.concatenate(sum(([r, gap] for r in rows), [])[:-1], axis=0))
    print(f"wrote {args.out}: rows {[s.split('=')[0] for s in args.mesh]}, views {args.views}")


if __name__ == "__main__":
    main()
