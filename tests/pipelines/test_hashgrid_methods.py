"""Every field method on the hash-grid encoding: the tables get their own learning rate, one training step
trains them (and the networks' eikonal / normal terms by finite differences, with no double backward through
the grid), configs round-trip, a resume checks the grid's shape but not its learning rate, and the command
line takes --encoding hashgrid."""

import dataclasses

import pytest
import torch
from app_helpers import ball_dataset

import taichi_dr as tdr
from taichi_dr.data.datasets import load_dataset
from taichi_dr.nets.encodings import EncodingSettings
from taichi_dr.nets.hash_grid import HashGridEncoding
from taichi_dr.pipelines.idr import IDRConfig, IDRMethod
from taichi_dr.pipelines.nerf import NeRFConfig, NeRFMethod
from taichi_dr.pipelines.unisurf import UnisurfConfig, UnisurfMethod

GRID = EncodingSettings(kind="hashgrid", n_levels=4, log2_table_size=10, finest_resolution=64, table_lr=2e-2)
SMALL = dict(iterations=4, rays_per_batch=64, encoding=GRID)
METHODS = {
    "idr": (IDRMethod, IDRConfig(**SMALL, geometry_depth=2, geometry_width=32, geometry_skip_in=(), feature_dim=8,
                                 rendering_depth=1, rendering_width=16)),
    "unisurf": (UnisurfMethod, UnisurfConfig(**SMALL, geometry_depth=2, geometry_width=32, geometry_skip_in=(),
                                             feature_dim=8, rendering_depth=1, rendering_width=16)),
    "nerf": (NeRFMethod, NeRFConfig(**SMALL, depth=2, width=32, skip_in=(), colour_width=16, n_coarse=8, n_fine=8)),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tdr.init("cpu")
    return load_dataset(ball_dataset(tmp_path_factory.mktemp("hashgrid"), views=4, size=16))


@pytest.mark.parametrize("name", list(METHODS))
def test_a_step_trains_the_tables_at_their_own_rate(data, name):
    cls, config = METHODS[name]
    torch.manual_seed(0)
    method = cls(data, config)
    grids = [m for m in method.model.modules() if isinstance(m, HashGridEncoding)]
    assert grids and all(g.table_size == 2 ** 10 and g.n_levels == 4 for g in grids)
    groups = {g["name"]: g for g in method.param_groups()}
    assert groups["hash_tables"]["lr"] == 2e-2 and groups["networks"]["lr"] == config.lr
    table_ids = {id(p) for g in grids for p in g.parameters()}
    assert {id(p) for p in groups["hash_tables"]["params"]} == table_ids
    assert not table_ids & {id(p) for p in groups["networks"]["params"]}
    # IDR's geometric initialisation starts the first layer's weights on the grid's features at zero, so the
    # tables receive gradients from the second step on.
    optimizer = torch.optim.Adam(method.param_groups())
    generator = torch.Generator().manual_seed(0)
    for iteration in range(2):
        optimizer.zero_grad()
        loss, _ = method.step(method.sample(iteration, generator), iteration)
        loss.backward()                  # no double backward through the grid: the bridge would raise
        assert torch.isfinite(loss)
        optimizer.step()
    assert any(float(g.table.grad.abs().max()) > 0 for g in grids)


@pytest.mark.parametrize("name", list(METHODS))
def test_config_round_trip_and_resume_checks(name):
    cls, config = METHODS[name]
    back = type(config).from_dict(config.to_dict())
    assert back == config and back.encoding == GRID
    module = __import__(cls.__module__, fromlist=["check_network_settings"])
    faster = dataclasses.replace(config, encoding=dataclasses.replace(GRID, table_lr=1e-3))
    module.check_network_settings(config.to_dict(), faster)       # the learning rate may change on resume
    bigger = dataclasses.replace(config, encoding=dataclasses.replace(GRID, log2_table_size=12))
    with pytest.raises(ValueError, match="encoding"):
        module.check_network_settings(config.to_dict(), bigger)


def test_encoding_settings_refuse_bad_values():
    for kwargs, words in (({"kind": "grid"}, "kind"), ({"n_levels": 0}, "n_levels"),
                          ({"finest_resolution": 8}, "finest_resolution"), ({"table_lr": -1.0}, "table_lr"),
                          ({"log2_table_size": 30}, "log2_table_size")):
        with pytest.raises(ValueError, match=words):
            EncodingSettings(**kwargs)


def test_command_line_encoding_options(tmp_path):
    from app_helpers import invoke_tdr

    data = ball_dataset(tmp_path, views=4, size=16)
    r = invoke_tdr(*["reconstruct", str(data), "--out", str(tmp_path / "a"), "--encoding", "hashgrid",
                    "--frequencies", "4"])
    assert r.exit_code == 1 and "--frequencies: only with --encoding frequency" in r.output
    r = invoke_tdr(*["reconstruct", str(data), "--out", str(tmp_path / "b"), "--hash-levels", "4"])
    assert r.exit_code == 1 and "--hash-levels: only with --encoding hashgrid" in r.output
    r = invoke_tdr(*["reconstruct", str(data), "--out", str(tmp_path / "c"), "--encoding", "hashgrid",
                    "--hash-finest", "4"])
    assert r.exit_code == 1 and "--hash-finest" in r.output and "base_resolution" in r.output
    r = invoke_tdr(*["reconstruct", str(data), "--out", str(tmp_path / "d"), "--encoding", "hashgrid",
                    "--iterations", "2", "--rays", "32", "--hash-levels", "4", "--hash-table-size", "10",
                    "--resolution", "16", "--holdout-every", "0"])
    assert r.exit_code == 0, r.output
    saved = (tmp_path / "d" / "config.json").read_text()
    assert '"kind": "hashgrid"' in saved and '"geometry_width": 64' in saved
    # The run loads back with its grid (tdr view, tdr evaluate and resume read it so).
    from taichi_dr.pipelines.reconstruction import load_trained

    trained = load_trained(tmp_path / "d")
    assert any(isinstance(m, HashGridEncoding) for m in trained.model.modules())


def test_command_line_hashgrid_defaults_and_grid_options(tmp_path):
    """--encoding hashgrid brings its own defaults (networks' lr 5e-3, 2^16 table entries; what is given wins);
    --occupancy-grid / --grid-resolution reach the config, and bad values or methods are one-line errors."""
    import json

    from app_helpers import invoke_tdr

    data = ball_dataset(tmp_path, views=4, size=16)
    quick = ["--iterations", "2", "--rays", "32", "--resolution", "16", "--holdout-every", "0"]
    r = invoke_tdr("reconstruct", str(data), "--out", str(tmp_path / "a"), "--method", "unisurf", "--encoding",
                   "hashgrid", "--hash-levels", "4", "--grid-resolution", "16", "--search-steps", "32", *quick)
    assert r.exit_code == 0, r.output
    method_config = json.loads((tmp_path / "a" / "config.json").read_text())["method_config"]
    assert method_config["lr"] == 5e-3 and method_config["encoding"]["log2_table_size"] == 16
    assert method_config["occupancy_grid"]["enabled"] is True and method_config["occupancy_grid"]["resolution"] == 16
    r = invoke_tdr("reconstruct", str(data), "--out", str(tmp_path / "b"), "--method", "nerf", "--encoding",
                   "hashgrid", "--hash-levels", "4", "--hash-table-size", "12", "--lr", "1e-3", "--occupancy-grid",
                   "--grid-resolution", "16", "--coarse-samples", "8", "--fine-samples", "8", *quick)
    assert r.exit_code == 0, r.output
    method_config = json.loads((tmp_path / "b" / "config.json").read_text())["method_config"]
    assert method_config["lr"] == 1e-3 and method_config["encoding"]["log2_table_size"] == 12
    assert method_config["occupancy_grid"]["enabled"] is True
    r = invoke_tdr("reconstruct", str(data), "--out", str(tmp_path / "c"), "--method", "unisurf",
                   "--grid-resolution", "0")
    assert r.exit_code == 1 and "--grid-resolution must be an integer in 1..1024" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = invoke_tdr("reconstruct", str(data), "--out", str(tmp_path / "d"), "--occupancy-grid")
    assert r.exit_code == 1 and "--occupancy-grid: only for --method unisurf or nerf, not idr" in r.output
