"""The toy world's labels against closed forms: if these hold, probes are scored against truth."""
from __future__ import annotations

import numpy as np
import pytest

from probes.toy import world
from probes.toy.world import Camera, Scene, SceneObject, render, render_many, scene_for

LIGHT = (0.3, 0.5, 0.2)


def _scene(*objects: SceneObject, elevation: float = 30.0, azimuth: float = 0.0,
           distance: float = 6.0, fov: float = 36.0, light=LIGHT, ambient: float = 0.25) -> Scene:
    return Scene(objects=objects, camera=Camera(elevation, azimuth, distance, fov),
                 light=light, ambient=ambient)


def _sphere_at_target(radius: float, colour: str = "red") -> SceneObject:
    # world.TARGET is (0, 0.5, 0): a sphere of radius 0.5 at the origin is centred on it.
    assert world.TARGET == (0.0, 0.5, 0.0)
    return SceneObject("sphere", colour, 0.0, 0.0, radius, 0.0)


@pytest.mark.parametrize("elevation,azimuth,distance", [(30, 0, 6), (40, 123, 5.5), (22, 250, 7)])
def test_sphere_depth_at_centre_pixel(elevation, azimuth, distance):
    # An odd image size puts a pixel centre exactly on the optical axis, which passes through
    # the sphere's centre: the nearest surface point is at distance - r along the axis.
    r = render(_scene(_sphere_at_target(0.5), elevation=elevation, azimuth=azimuth,
                      distance=distance), size=65)
    assert r.instances[32, 32] == 1
    assert r.depth[32, 32] == pytest.approx(distance - 0.5, abs=1e-5)
    np.testing.assert_allclose(r.normals[32, 32], -np.asarray(Camera(
        elevation, azimuth, distance, 36).frame()[3]), atol=1e-5)


def test_sphere_mask_area_matches_projected_disc():
    # A sphere centred on the optical axis projects to a disc of radius rho = f * tan(asin(R/D)).
    # Counting pixel centres inside a disc: every counted pixel's square lies inside the disc
    # grown by half a pixel diagonal, and every pixel whose square fits inside the disc shrunk
    # by it is counted, so pi (rho -+ sqrt(2)/2)^2 bound the count rigorously.
    size, fov, dist, rad = 64, 36.0, 6.0, 0.5
    r = render(_scene(_sphere_at_target(rad), distance=dist, fov=fov), size=size)
    f = 0.5 * size / np.tan(np.radians(fov) / 2)
    rho = f * np.tan(np.arcsin(rad / dist))
    area = r.foreground.sum()
    h = np.sqrt(2) / 2
    assert np.pi * (rho - h) ** 2 <= area <= np.pi * (rho + h) ** 2
    assert abs(area - np.pi * rho**2) / (np.pi * rho**2) < 0.05


@pytest.mark.parametrize("light", [LIGHT, (-0.6, 0.1, -0.4), (0.0, 0.7, 0.0)])
def test_ground_and_wall_shading_closed_form(light):
    scene = _scene(SceneObject("cube", "blue", 0.3, -0.2, 0.6, 20.0), light=light, ambient=0.3)
    r = render(scene)
    ground = ~r.foreground & (r.normals[..., 1] > 0.5)
    wall = ~r.foreground & (r.normals[..., 1] < 0.5)
    assert ground.sum() > 500 and wall.sum() > 50
    np.testing.assert_allclose(r.shading[ground], 0.3 + max(0.0, light[1]), atol=1e-6)
    fwd = scene.camera.frame()[3]
    wall_n = -np.array([fwd[0], 0.0, fwd[2]]) / np.hypot(fwd[0], fwd[2])
    np.testing.assert_allclose(r.shading[wall], 0.3 + max(0.0, wall_n @ light), atol=1e-6)
    # The cube's top face points up, so it is shaded like the ground.
    top = (r.instances == 1) & (r.normals[..., 1] > 0.999)
    assert top.sum() > 10
    np.testing.assert_allclose(r.shading[top], 0.3 + max(0.0, light[1]), atol=1e-6)


def test_near_object_occludes_far_one():
    near = SceneObject("sphere", "red", 0.0, 1.0, 0.5, 0.0)       # camera is on +z
    far = SceneObject("cube", "blue", 0.1, -1.2, 0.7, 30.0)
    both = render(_scene(far, near, elevation=12))
    alone_near, alone_far = render(_scene(near, elevation=12)), render(_scene(far, elevation=12))
    overlap = alone_near.foreground & alone_far.foreground
    assert overlap.sum() > 50
    assert np.all(both.instances[overlap] == 2)                     # near is objects[1]
    np.testing.assert_array_equal(both.depth[overlap], alone_near.depth[overlap])
    assert np.all(alone_near.depth[overlap] < alone_far.depth[overlap])
    far_only = alone_far.foreground & ~alone_near.foreground
    assert np.all(both.instances[far_only] == 1)
    np.testing.assert_array_equal(both.depth[far_only], alone_far.depth[far_only])


def test_caption_orders_objects_left_to_right_in_the_image():
    a = SceneObject("sphere", "red", -1.0, 0.0, 0.5, 0.0)
    b = SceneObject("cube", "blue", 1.0, 0.2, 0.5, 0.0)
    c = SceneObject("cone", "orange", 0.0, 0.8, 0.5, 0.0)
    assert _scene(b, a).caption() == "a red sphere to the left of a blue cube"
    assert _scene(a, b, azimuth=180).caption() == "a blue cube to the left of a red sphere"
    scene = _scene(c, b, a)
    assert scene.caption() == ("a red sphere to the left of an orange cone "
                               "to the left of a blue cube")
    r = render(scene)
    cols = [np.nonzero(r.instances == k)[1].mean() for k in (3, 1, 2)]   # a, c, b
    assert cols == sorted(cols)
    assert _scene(c).caption() == "an orange cone"


def test_labels_are_consistent_and_exact():
    d = render_many(6, seed=11)
    fg = d["foreground"]
    assert fg.dtype == bool and d["instances"].dtype == np.int16
    np.testing.assert_array_equal(fg, d["instances"] > 0)
    np.testing.assert_array_equal(fg, d["classes"] >= 0)
    np.testing.assert_array_equal(fg, d["colours"] >= 0)
    assert np.all(np.isfinite(d["depth"])) and np.all(d["depth"] > 0)
    np.testing.assert_allclose(d["inv_depth"], 1.0 / d["depth"], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(d["normals"], axis=-1), 1.0, atol=1e-5)
    expected = np.rint(d["albedo"].astype(np.float64) * d["shading"][..., None] * 255)
    assert np.abs(d["rgb"].astype(float) - expected).max() <= 1
    assert d["shading"].max() <= 1.0 + 1e-6                      # |light| + ambient <= 1
    for i in range(6):
        scene = scene_for(11, i)
        assert d["captions"][i] == scene.caption()
        for k, obj in enumerate(scene.objects, start=1):
            sel = d["instances"][i] == k
            assert np.all(d["classes"][i][sel] == world.SHAPES.index(obj.shape))
            assert np.all(d["colours"][i][sel] == world.COLOURS.index(obj.colour))


def test_visible_surfaces_face_the_camera():
    # A flipped normal (a sign slip in a shape's gradient) would face away from the viewer.
    for i in range(8):
        scene = scene_for(5, i)
        r = render(scene)
        origin, d, _ = world._rays(scene.camera, 64)
        facing = (r.normals.reshape(-1, 3) * d).sum(1)
        assert facing.max() < 1e-4, f"scene {i}"


def test_determinism_and_indexing():
    a, b = render_many(5, seed=3), render_many(5, seed=3)
    for k in world.FIELDS:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["captions"] == b["captions"]
    tail = render_many(2, seed=3, start=3, fields=["rgb", "depth"])
    assert set(tail) == {"rgb", "depth", "captions"}
    np.testing.assert_array_equal(tail["rgb"], a["rgb"][3:])
    assert not np.array_equal(render_many(5, seed=4)["rgb"], a["rgb"])


def test_scenes_are_well_formed_and_objects_sizeable():
    fractions = []
    for i in range(60):
        scene = scene_for(0, i, max_objects=3)
        assert 1 <= len(scene.objects) <= 3
        for p, q in [(p, q) for j, p in enumerate(scene.objects) for q in scene.objects[j + 1:]]:
            assert np.hypot(p.x - q.x, p.z - q.z) > p.footprint() + q.footprint()
        r = render(scene)
        fractions += [(r.instances == k).mean() for k in range(1, len(scene.objects) + 1)]
    med = np.median(fractions)
    assert 0.05 <= med <= 0.30, med
    assert max(len(scene_for(1, i, max_objects=1).objects) for i in range(10)) == 1
