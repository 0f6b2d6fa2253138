"""OrbitControls: drags and keys move the orbit camera by the stated amounts; keys give the listed actions."""

from __future__ import annotations

import numpy as np
import pytest

from taichi_dr.viewer.controls import KEY_BINDINGS, InputEvent, OrbitControls
from taichi_dr.viewer.images import OUTPUTS
from taichi_dr.viewer.orbit import OrbitCamera


def make(**camera):
    values = dict(target=(0.1, 0.2, 0.3), distance=2.0, azimuth=10.0, elevation=15.0)
    values.update(camera)
    return OrbitControls(OrbitCamera(**values))


def drag(controls, button, start, end, shift=False):
    actions = set()
    if shift:
        actions |= controls.handle(InputEvent("press", "Shift"))
    actions |= controls.handle(InputEvent("press", button, *start))
    assert controls.dragging
    actions |= controls.handle(InputEvent("move", "", *end))
    actions |= controls.handle(InputEvent("release", button, *end))
    if shift:
        actions |= controls.handle(InputEvent("release", "Shift"))
    assert not controls.dragging
    return actions


def test_left_drag_half_the_width_orbits_90_degrees():
    c = make()
    assert drag(c, "LMB", (0.2, 0.5), (0.7, 0.5)) == {"camera"}
    assert c.camera.azimuth == pytest.approx(100.0) and c.camera.elevation == pytest.approx(15.0)
    drag(c, "LMB", (0.5, 0.5), (0.5, 0.6))  # a tenth of the height: 18 degrees up
    assert c.camera.elevation == pytest.approx(33.0) and c.camera.azimuth == pytest.approx(100.0)
    # In several moves it adds up the same.
    c2 = make()
    c2.handle(InputEvent("press", "LMB", 0.2, 0.5))
    for x in (0.3, 0.45, 0.7):
        assert c2.handle(InputEvent("move", "", x, 0.5)) == {"camera"}
    assert c2.camera.azimuth == pytest.approx(100.0)


def test_moves_without_a_button_do_nothing():
    c = make()
    before = c.camera.copy()
    assert c.handle(InputEvent("move", "", 0.1, 0.1)) == set()
    assert c.handle(InputEvent("move", "", 0.9, 0.9)) == set()
    assert c.camera == before and not c.dragging


@pytest.mark.parametrize("button,shift", [("RMB", False), ("LMB", True)])
def test_right_or_shift_left_drag_pans(button, shift):
    c = make()
    c.aspect = 0.75
    expected = c.camera.copy()
    expected.pan(0.2, -0.1, aspect=0.75)
    assert drag(c, button, (0.4, 0.5), (0.6, 0.4), shift=shift) == {"camera"}
    np.testing.assert_allclose(c.camera.target, expected.target, atol=1e-12)
    assert c.camera.azimuth == 10.0 and c.camera.distance == 2.0


def test_middle_drag_zooms():
    c = make()
    drag(c, "MMB", (0.5, 0.5), (0.5, 0.6))  # down a tenth of the height: out by one zoom step
    assert c.camera.distance == pytest.approx(2.0 * 1.15)
    drag(c, "MMB", (0.5, 0.6), (0.5, 0.4))  # up two tenths: in by two
    assert c.camera.distance == pytest.approx(2.0 / 1.15)


@pytest.mark.parametrize("keys,change", [
    (("w", "Up", "W"), ("distance", 2.0 / 1.15)), (("s", "Down"), ("distance", 2.0 * 1.15)),
    (("a", "Left", "A"), ("azimuth", 20.0)), (("d", "Right"), ("azimuth", 0.0)),
    (("q",), ("elevation", 5.0)), (("e",), ("elevation", 25.0)),
])
def test_camera_keys(keys, change):
    name, value = change
    for key in keys:
        c = make()
        assert c.handle(InputEvent("press", key)) == {"camera"}, key
        assert getattr(c.camera, name) == pytest.approx(value), key
        assert c.handle(InputEvent("release", key)) == set()


def test_r_resets_to_home_in_place():
    c = make()
    cam = c.camera
    drag(c, "LMB", (0.1, 0.1), (0.6, 0.3))
    c.handle(InputEvent("press", "w"))
    drag(c, "RMB", (0.1, 0.1), (0.3, 0.3))
    assert cam != c.home
    assert c.handle(InputEvent("press", "r")) == {"camera"}
    assert c.camera is cam and cam == OrbitCamera(target=(0.1, 0.2, 0.3), distance=2.0, azimuth=10.0,
                                                  elevation=15.0)
    # Home is a copy: moving again does not move it.
    c.handle(InputEvent("press", "a"))
    assert c.home.azimuth == 10.0


def test_action_keys():
    c = make()
    before = c.camera.copy()
    expected = {" ": "pause", "p": "snapshot", "P": "snapshot", "f": "overlay:frustums", "c": "compare",
                "[": "previous_view", "]": "next_view", "Escape": "free_view"}
    for key, action in expected.items():
        assert c.handle(InputEvent("press", key)) == {action}, key
    for i, name in enumerate(OUTPUTS):
        assert c.handle(InputEvent("press", str(i + 1))) == {f"output:{name}"}
    assert [OUTPUTS[i] for i in range(6)] == ["colour", "depth", "normals", "opacity", "wireframe", "silhouette"]
    for key in ("Tab", "7", "0", "x", "Shift"):
        assert c.handle(InputEvent("press", key)) == set(), key
    assert c.camera == before


def test_key_bindings_table_lists_every_bound_key():
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in KEY_BINDINGS)
    text = " ".join(k for k, _ in KEY_BINDINGS)
    for key in ("left drag", "right drag", "Shift", "middle drag", "W", "S", "A", "D", "Q", "E", "R", "Space",
                "P", "1-6", "F", "C", "[", "]", "Escape", "Up", "Down", "Left", "Right"):
        assert key in text, key


def test_bad_events_and_settings():
    c = make()
    with pytest.raises(ValueError, match="kind"):
        c.handle(InputEvent("click", "LMB"))
    with pytest.raises(ValueError, match="zoom_step"):
        OrbitControls(OrbitCamera(), zoom_step=1.0)
    with pytest.raises(TypeError, match="OrbitCamera"):
        OrbitControls("camera")
