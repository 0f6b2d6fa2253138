"""Dataset loaders on small fixtures (and the real DTU scan when ../shared is there)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from sdf_scenes import dataset_from_sdf

from taichi_dr.core.camera import Cameras
from taichi_dr.data.datasets import (
    MultiViewDataset,
    load_dataset,
    load_idr,
    load_nerf_synthetic,
    sample_rays,
    split_holdout,
    validate_dataset,
    write_idr,
)
from taichi_dr.implicit.analytic import sphere_sdf

DTU = Path(__file__).resolve().parents[3] / "shared" / "data" / "dtu_scan24"


def _cameras(n=4, size=(20, 24), dist=3.0):
    az = torch.linspace(0, 360, n + 1, dtype=torch.float64)[:-1]
    el = torch.tensor([20.0, -15.0] * n, dtype=torch.float64)[:n]
    d = torch.full((n,), dist, dtype=torch.float64)
    return Cameras.from_spherical(d, el, az, fov=45, image_size=size, convention="opencv")  # IDR: proper


def _fixture(tmp_path, n=4, scale=None):
    cams = _cameras(n)
    ds = dataset_from_sdf(lambda x: sphere_sdf(x, 0.5), cams.to(dtype=torch.float32))
    s = np.diag([2.0, 2.0, 2.0, 1.0]) if scale is None else scale
    s[:3, 3] = [0.5, -1.0, 3.0]
    write_idr(tmp_path / "ds", ds.images, ds.masks, cams, s)
    return tmp_path / "ds", cams, ds, s


def test_idr_round_trip(tmp_path):
    root, cams, ref, s = _fixture(tmp_path)
    ds = load_idr(root)
    assert len(ds) == 4 and ds.image_size == (20, 24)
    # P = K [R | t] decomposed back into the cameras that wrote it
    assert torch.allclose(ds.cameras.K, cams.K.float(), atol=1e-3)
    assert torch.allclose(ds.cameras.R, cams.R.float(), atol=1e-5)
    assert torch.allclose(ds.cameras.t, cams.t.float(), atol=1e-5)
    assert torch.allclose(ds.scale_mat, torch.from_numpy(s))
    assert torch.equal(ds.masks, ref.masks)
    assert (ds.images - ref.images).abs().max() <= 0.5 / 255 + 1e-6
    # to_world undoes the normalisation
    p = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(ds.to_world(p), torch.tensor([[0.5, -1.0, 3.0], [2.5, -1.0, 3.0]]))
    assert load_dataset(root).names == ds.names


def test_idr_projection_of_world_points(tmp_path):
    """A world point projects through world_mat_i exactly where the loaded (normalised) camera puts its
    normalised counterpart."""
    root, _, _, s = _fixture(tmp_path)
    ds = load_idr(root)
    cams = np.load(root / "cameras.npz")
    xn = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    xw = np.append(s[:3, :3] @ xn[0].numpy() + s[:3, 3], 1.0)
    for i in range(len(ds)):
        p = cams[f"world_mat_{i}"] @ xw
        uv = ds.cameras[i].to(dtype=torch.float64).project(xn)[0, 0, :2]
        assert np.allclose(uv.numpy(), p[:2] / p[2], atol=1e-3)


def test_idr_errors(tmp_path):
    root, *_ = _fixture(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_idr(tmp_path / "nope")
    # count mismatch
    (root / "mask" / "003.png").rename(tmp_path / "m3.png")
    with pytest.raises(ValueError, match="counts differ: 4 images, 3 masks"):
        load_idr(root)
    # empty mask
    iio.imwrite(root / "mask" / "003.png", np.zeros((20, 24), np.uint8))
    with pytest.raises(ValueError, match="empty object masks.*003.png"):
        load_idr(root)
    # mixed sizes
    iio.imwrite(root / "mask" / "003.png", np.full((21, 24), 255, np.uint8))
    with pytest.raises(ValueError, match="003.png.*one size"):
        load_idr(root)
    (tmp_path / "m3.png").replace(root / "mask" / "003.png")
    # missing key / missing cameras
    data = dict(np.load(root / "cameras.npz"))
    del data["world_mat_2"]
    np.savez(root / "cameras.npz", **data)
    with pytest.raises(ValueError, match="missing \\[2\\]"):
        load_idr(root)
    (root / "cameras.npz").unlink()
    with pytest.raises(ValueError, match="missing cameras.npz"):
        load_idr(root)
    with pytest.raises(ValueError, match="not a dataset folder"):
        load_dataset(root)


def test_idr_rejects_unnormalised_scene(tmp_path):
    """With a scale_mat far too small the object (and the cameras) leave the unit sphere."""
    root, cams, ref, _ = _fixture(tmp_path)
    # cameras of a scene 10x larger, written with an identity scale_mat: the object is not in the unit sphere
    big = Cameras(cams.K, cams.R, cams.t * 10, cams.image_size)
    write_idr(tmp_path / "big", ref.images, ref.masks, big, None)
    with pytest.raises(ValueError, match="rays that miss the bounding sphere|inside the bounding sphere"):
        load_idr(tmp_path / "big")
    # a camera inside the unit sphere
    near = Cameras(cams.K, cams.R, cams.t * 0.3, cams.image_size)
    write_idr(tmp_path / "near", ref.images, ref.masks, near, None)
    with pytest.raises(ValueError, match="view 0 .*inside the bounding sphere"):
        load_idr(tmp_path / "near")
    assert len(load_idr(tmp_path / "near", validate=False)) == 4


def _nerf_fixture(root: Path, size=(16, 16)):
    root.mkdir(parents=True)
    (root / "train").mkdir()
    h, w = size
    frames = []
    for i, (eye, alpha_value) in enumerate([((0, 0, 4.0), 255), ((4.0, 0, 0), 255)]):
        # an OpenGL camera at `eye` looking at the origin, y up: columns are the camera axes (x, y, z=back)
        z = np.asarray(eye) / np.linalg.norm(eye)
        x = np.cross([0, 1, 0], z)
        y = np.cross(z, x)
        c2w = np.eye(4)
        c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, eye
        img = np.zeros((h, w, 4), np.uint8)
        img[..., 0] = 200
        img[4:12, 4:12, 3] = alpha_value
        iio.imwrite(root / "train" / f"r_{i}.png", img)
        frames.append({"file_path": f"./train/r_{i}", "transform_matrix": c2w.tolist()})
    doc = {"camera_angle_x": math.radians(40), "frames": frames}
    (root / "transforms_train.json").write_text(json.dumps(doc))


def test_nerf_synthetic(tmp_path):
    root = tmp_path / "lego"
    _nerf_fixture(root)
    ds = load_nerf_synthetic(root, scene_radius=2.0, background=1.0)
    assert len(ds) == 2 and ds.image_size == (16, 16)
    assert ds.masks[0, 4:12, 4:12].all() and ds.masks.sum() == 2 * 64
    # composited on white outside the alpha, the RGB inside
    assert torch.allclose(ds.images[0, 0, 0], torch.ones(3))
    assert torch.allclose(ds.images[0, 8, 8], torch.tensor([200 / 255, 0, 0]))
    # OpenGL -> OpenCV: the origin projects to the centre; world up (+y) is above it (smaller v); the camera
    # centre is the eye divided by scene_radius
    cams = ds.cameras
    assert torch.allclose(cams.camera_centers(), torch.tensor([[0, 0, 2.0], [2.0, 0, 0]]), atol=1e-5)
    uvz = cams.project(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.3, 0.0]]))
    assert torch.allclose(uvz[:, 0, :2], torch.tensor([8.0, 8.0]), atol=1e-4)
    assert (uvz[:, 1, 1] < 8.0 - 1).all() and (uvz[:, :, 2] > 0).all()
    f = 8.0 / math.tan(math.radians(20))
    assert torch.allclose(cams.K[0, 0, 0], torch.tensor(f), atol=1e-3)
    assert torch.allclose(ds.scale_mat, torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64)))
    assert load_dataset(root, scene_radius=2.0).names == ds.names


def test_nerf_synthetic_errors(tmp_path):
    root = tmp_path / "lego"
    _nerf_fixture(root)
    doc = json.loads((root / "transforms_train.json").read_text())
    del doc["frames"][1]["transform_matrix"]
    (root / "transforms_train.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="frame 1: missing key 'transform_matrix'"):
        load_nerf_synthetic(root)
    with pytest.raises(ValueError, match="transforms_val.json"):
        load_nerf_synthetic(root, split="val")
    iio.imwrite(root / "train" / "r_0.png", np.zeros((16, 16, 2), np.uint8))
    doc["frames"] = doc["frames"][:1]
    (root / "transforms_train.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="r_0.png: expected an RGB or RGBA image"):
        load_nerf_synthetic(root)


def test_nerf_synthetic_rgb_has_no_masks(tmp_path):
    """RGB frames: no masks, the pixels as they are (no compositing); a split mixing RGB and RGBA is refused."""
    root = tmp_path / "lego"
    _nerf_fixture(root)
    rgba = iio.imread(root / "train" / "r_1.png")
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 1] = 90
    rgb[4:12, 4:12, 0] = 200
    iio.imwrite(root / "train" / "r_0.png", rgb)
    with pytest.raises(ValueError, match="r_1.png: has 4 channels but r_0.png has 3"):
        load_nerf_synthetic(root, scene_radius=2.0)
    iio.imwrite(root / "train" / "r_1.png", rgb)
    ds = load_nerf_synthetic(root, scene_radius=2.0, background=1.0)
    assert ds.masks is None and not ds.has_masks and len(ds) == 2
    assert torch.allclose(ds.images[0, 0, 0], torch.tensor([0, 90 / 255, 0]))   # background as photographed
    assert torch.allclose(ds.images[1, 8, 8], torch.tensor([200 / 255, 90 / 255, 0]))
    batch = sample_rays(ds, 16, torch.Generator().manual_seed(0))
    assert batch.mask is None and batch.rgb.shape == (16, 3)
    with pytest.raises(ValueError, match="IDR's mask loss needs object masks, but .*lego has none"):
        ds.require_masks("IDR's mask loss")
    assert len(ds.subset([1])) == 1 and ds.subset([1]).masks is None
    # the RGBA split still gives masks
    iio.imwrite(root / "train" / "r_1.png", rgba)
    iio.imwrite(root / "train" / "r_0.png", rgba)
    assert load_nerf_synthetic(root, scene_radius=2.0).masks.shape == (2, 16, 16)


def test_idr_without_masks(tmp_path):
    root, cams, ref, s = _fixture(tmp_path)
    for f in (root / "mask").iterdir():
        f.unlink()
    (root / "mask").rmdir()
    ds = load_idr(root)
    assert ds.masks is None and len(ds) == 4
    assert (ds.images - ref.images).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(ds.require_masks("x") if ds.has_masks else ref.masks, ref.masks)
    # written back without masks: no mask folder, and it reads the same
    write_idr(tmp_path / "again", ds.images, None, cams, s)
    assert not (tmp_path / "again" / "mask").exists()
    assert torch.equal(load_idr(tmp_path / "again").images, ds.images)


def test_validate_without_masks_needs_views_of_the_sphere():
    """Without masks the check is that each view sees the bounding sphere at all."""
    ds = dataset_from_sdf(lambda x: sphere_sdf(x, 0.5), _cameras(2, (8, 8)).to(dtype=torch.float32), masks=False)
    validate_dataset(ds)
    away = Cameras.look_at([[0.0, 0.0, 3.0]], at=[[0.0, 0.0, 6.0]], fov=20, image_size=(8, 8))
    cams = Cameras(torch.cat([ds.cameras.K[:1], away.K]), torch.cat([ds.cameras.R[:1], away.R]),
                   torch.cat([ds.cameras.t[:1], away.t]), (8, 8))
    bad = MultiViewDataset(ds.images, None, cams, ds.scale_mat, ds.names)
    with pytest.raises(ValueError, match=r"no ray of view 1 \(sdf_001\) meets the bounding sphere"):
        validate_dataset(bad)


def test_data_layer_imports_no_renderer():
    code = ("import sys, taichi_dr.data, taichi_dr.data.images, taichi_dr.data.targets, taichi_dr.data.shapes; "
            "print(sorted(m for m in sys.modules if m.startswith(('taichi_dr.raster', 'taichi_dr.implicit'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"  # (after Taichi's banner)


def test_one_image_reader_for_datasets_and_targets(tmp_path):
    """Datasets and targets accept the same suffixes (any case) and decode pixels the same way."""
    from taichi_dr.data.images import IMAGE_SUFFIXES, list_images, read_image
    from taichi_dr.data.targets import load_targets

    assert {".png", ".jpg", ".jpeg"} == set(IMAGE_SUFFIXES)
    mask = np.zeros((6, 5), np.uint8)
    mask[1:4, 2:4] = 255
    iio.imwrite(tmp_path / "b.PNG", mask)
    iio.imwrite(tmp_path / "a.png", mask)
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.PNG"]
    t = load_targets(tmp_path)
    assert t.names == ("a.png", "b.PNG") and torch.equal(t.silhouettes[1], torch.from_numpy(mask / 255.0).float())
    img16 = np.full((2, 3), 65535, np.uint16)
    img16[0, 0] = 0
    img16[0, 1] = 32768
    iio.imwrite(tmp_path / "deep.png", img16)
    d = read_image(tmp_path / "deep.png")
    assert d.dtype == np.float32 and d.shape == (2, 3, 1)
    assert d[0, 0, 0] == 0 and d[1, 2, 0] == 1 and abs(d[0, 1, 0] - 32768 / 65535) < 1e-7
    assert read_image(tmp_path / "a.png").shape == (6, 5, 1)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        read_image(tmp_path / "broken.png")


def test_holdout_and_subset(tmp_path):
    ds = dataset_from_sdf(lambda x: sphere_sdf(x, 0.5), _cameras(10, (8, 8)).to(dtype=torch.float32))
    train, test = split_holdout(ds, 4)
    assert test.names == tuple(ds.names[i] for i in (0, 4, 8))
    assert len(train) == 7 and not set(train.names) & set(test.names)
    assert torch.equal(test.images[1], ds.images[4]) and torch.equal(test.cameras.R[2], ds.cameras.R[8])
    assert split_holdout(ds, 0) == (ds, None)
    with pytest.raises(ValueError, match="K must be 0"):
        split_holdout(ds, 1)
    with pytest.raises(IndexError):
        ds.subset([10])


def test_sample_rays_pass_through_their_pixels():
    ds = dataset_from_sdf(lambda x: sphere_sdf(x, 0.5), _cameras(3, (10, 12)).to(dtype=torch.float32))
    b = sample_rays(ds, 200, torch.Generator().manual_seed(0))
    assert b.origins.shape == (200, 3) and torch.allclose(b.dirs.norm(dim=-1), torch.ones(200))
    for k in range(0, 200, 37):
        v = int(b.view[k])
        uvz = ds.cameras[v].project((b.origins[k] + 2.0 * b.dirs[k])[None])[0, 0]
        assert torch.allclose(uvz[:2], b.pixels[k], atol=1e-3)
        col, row = int(b.pixels[k, 0]), int(b.pixels[k, 1])
        assert torch.equal(b.rgb[k], ds.images[v, row, col])
        assert bool(b.mask[k]) == bool(ds.masks[v, row, col])


def test_dataset_container_checks():
    ds = dataset_from_sdf(lambda x: sphere_sdf(x, 0.5), _cameras(2, (8, 8)).to(dtype=torch.float32))
    with pytest.raises(ValueError, match="masks must be bool"):
        MultiViewDataset(ds.images, ds.masks.float(), ds.cameras, ds.scale_mat, ds.names)
    with pytest.raises(ValueError, match="cameras for"):
        MultiViewDataset(ds.images, ds.masks, ds.cameras[0], ds.scale_mat, ds.names)


@pytest.mark.skipif(not DTU.is_dir(), reason="needs ../shared/data/dtu_scan24")
def test_dtu_scan24():
    ds = load_idr(DTU)
    assert len(ds) == 49 and ds.image_size == (300, 400)
    assert 0.3 < ds.masks.float().mean() < 0.9
    centres = ds.cameras.camera_centers()
    assert (centres.norm(dim=-1) > 1.5).all()
    # every camera looks at the object: the unit sphere's centre projects inside the image, in front
    uvz = ds.cameras.project(torch.zeros(1, 3))[:, 0]
    assert ((uvz[:, 0] > 0) & (uvz[:, 0] < 400) & (uvz[:, 1] > 0) & (uvz[:, 1] < 300) & (uvz[:, 2] > 0)).all()
    assert ds.scale_mat[0, 0] > 100          # DTU's world is in millimetres
