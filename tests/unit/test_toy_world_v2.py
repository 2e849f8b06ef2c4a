"""World v2 against closed forms: roll, lamps, cast shadows, texture, image-space captions; and
World v1 unchanged (the shipped model and labelers were trained on it)."""
from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest

from probes.toy import world
from probes.toy.world import (
    V1,
    V2,
    Camera,
    Lamp,
    Scene,
    SceneObject,
    Texture,
    WorldConfig,
    render,
    render_many,
    scene_for,
)

NO_LIGHT = (0.0, 0.0, 0.0)


def _v1_hash(d: dict) -> str:
    """sha256 of every field; floats rounded to 1e-4 so that a libm with other last bits (another
    CPU) does not break it, while any change of the world's sampling or rendering does."""
    m = hashlib.sha256()
    for k in world.FIELDS:
        a = d[k]
        if a.dtype.kind == "f":
            a = np.round(a.astype(np.float64), 4)
        m.update(k.encode())
        m.update(np.ascontiguousarray(a).tobytes())
    m.update("\n".join(d["captions"]).encode())
    return m.hexdigest()


# Computed with the renderer as it was before World v2 (commit fae95a3), default arguments.
V1_HASHES = {
    (0, 4, 3): "91df088329604a2ae619120c487f8f7f45e7292fadeacd04f51de550ab4f4eeb",
    (20260, 3, 1): "b694445f3bef6b4eb93bb9ba43e21308eaf05aadd4a1f4bfc32dd1ea66d4791d",
    (5, 3, 3): "858b9f112d2416f37875dd3cb66ad48250506b08e729870a7dd76a14c5fe1b02",
}


@pytest.mark.parametrize("seed,n,max_objects", sorted(V1_HASHES))
def test_v1_renders_unchanged(seed, n, max_objects):
    assert _v1_hash(render_many(n, seed, max_objects=max_objects)) == V1_HASHES[seed, n, max_objects]
    explicit = render_many(n, seed, max_objects=max_objects, world=V1)
    assert _v1_hash(explicit) == V1_HASHES[seed, n, max_objects]
    assert scene_for(seed, 0, max_objects) == scene_for(seed, 0, max_objects, "v1")


def test_world_config_rejects_what_its_sampler_ignores():
    with pytest.raises(ValueError, match="ignores.*roll"):
        WorldConfig(name="x", version=1, elevation=(20.0, 40.0), roll=(0.0, 90.0))
    with pytest.raises(ValueError, match="version"):
        WorldConfig(name="x", version=3, elevation=(20.0, 40.0))
    with pytest.raises(ValueError, match="unknown world 'v9'"):
        scene_for(0, 0, world="v9")


# --- roll ---------------------------------------------------------------------------------------

def _rotate_clockwise(col: float, row: float, roll: float, size: float) -> tuple[float, float]:
    """Turn an image point clockwise by ``roll`` degrees about the image centre (rows go down)."""
    c, s = np.cos(np.radians(roll)), np.sin(np.radians(roll))
    dc, dr = col - size / 2, row - size / 2
    return size / 2 + c * dc - s * dr, size / 2 + s * dc + c * dr


@pytest.mark.parametrize("roll", [37.0, 90.0, 200.0, 311.0])
def test_roll_projects_a_world_point_to_the_rotated_pixel(roll):
    for point in [(0.7, 0.0, -0.4), (-1.1, 1.3, 0.6), (0.2, 0.5, 1.5)]:
        base = Camera(33.0, 57.0, 6.2, 36.0)
        col0, row0 = base.project(point, 64)
        col, row = replace(base, roll=roll).project(point, 64)
        np.testing.assert_allclose((col, row), _rotate_clockwise(col0, row0, roll, 64), atol=1e-9)


@pytest.mark.parametrize("roll", [25.0, 140.0, 270.0])
def test_rolled_render_depth_matches_closed_form(roll):
    # An empty room: each pixel's depth is the nearer of ground and wall along the unrolled
    # camera's ray through the pixel turned back (counter-clockwise) by the roll.
    size, cam = 48, Camera(28.0, 110.0, 6.0, 36.0, roll)
    r = render(Scene((), cam, light=(0.0, 0.6, 0.0), ambient=0.2), size)
    origin, right, up, forward = replace(cam, roll=0.0).frame()
    f = 0.5 * size / np.tan(np.radians(cam.fov) / 2)
    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    c0, r0 = _rotate_clockwise(cols, rows, -roll, size)
    d = forward + ((c0 - size / 2)[..., None] * right - (r0 - size / 2)[..., None] * up) / f
    fh = np.array([forward[0], 0.0, forward[2]]) / np.hypot(forward[0], forward[2])
    t_ground = np.where(d[..., 1] < 0, -origin[1] / np.minimum(d[..., 1], -1e-12), np.inf)
    t_wall = np.where(d @ fh > 0, (world.WALL_OFFSET - origin @ fh) / np.maximum(d @ fh, 1e-12), np.inf)
    # d has unit length along forward, so the ray parameter is the z-buffer depth itself
    np.testing.assert_allclose(r.depth, np.minimum(t_ground, t_wall), rtol=1e-6)


@pytest.mark.parametrize("roll,turn", [(180.0, 2), (90.0, -1), (270.0, 1)])
def test_roll_by_right_angles_turns_every_label(roll, turn):
    objects = (SceneObject("cube", "blue", 0.6, -0.3, 0.6, 20.0),
               SceneObject("sphere", "red", -0.7, 0.4, 0.5, 0.0, y=0.8))
    lamps = (Lamp((3.0, 6.0, 4.0), 0.7, 16.0, True),)
    scene = Scene(objects, Camera(30.0, 15.0, 6.0, 36.0), NO_LIGHT, 0.2, lamps)
    a, b = render(scene), render(replace(scene, camera=replace(scene.camera, roll=roll)))
    same = np.rot90(a.instances, turn) == b.instances
    assert same.mean() > 0.999                  # a pixel centre exactly on an edge may flip
    for k in ("depth", "shading"):
        np.testing.assert_allclose(np.rot90(getattr(a, k), turn)[same], getattr(b, k)[same], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.rot90(a.shadow, turn)[same], b.shadow[same])
    assert b.shadow.sum() > 30


# --- lamps and shadows --------------------------------------------------------------------------

def _pixel_ray(cam: Camera, col: int, row: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    origin, right, up, forward = cam.frame()
    half = np.tan(np.radians(cam.fov) / 2)
    u, v = ((col + 0.5) / size * 2 - 1) * half, -((row + 0.5) / size * 2 - 1) * half
    d = forward + u * right + v * up
    return origin, d / np.linalg.norm(d)


def _lamp_term(lamp: Lamp, p: np.ndarray, n: np.ndarray) -> float:
    rel = np.asarray(lamp.position) - p
    dist = np.linalg.norm(rel)
    return lamp.intensity * max(0.0, n @ rel / dist) * lamp.reach**2 / (lamp.reach**2 + dist**2)


@pytest.mark.parametrize("position", [(1.0, 4.0, 2.0), (-3.0, 1.2, 0.5), (0.0, 9.0, -1.0)])
def test_point_lamp_shading_at_known_points(position):
    # Odd size: the centre pixel's ray is the optical axis, which passes TARGET and meets the
    # ground at a known point; a pixel near the top sees the wall.
    lamp = Lamp(position, 0.6, 5.0, False)
    cam = Camera(30.0, 0.0, 6.0, 36.0)
    r = render(Scene((), cam, NO_LIGHT, 0.1, (lamp,)), size=65)
    origin, _, _, forward = cam.frame()
    ground = origin + origin[1] / -forward[1] * forward
    rel = np.asarray(position) - ground
    dist = np.linalg.norm(rel)
    expected = 0.1 + 0.6 * (position[1] / dist) * 25.0 / (25.0 + dist**2)
    assert r.shading[32, 32] == pytest.approx(expected, rel=1e-6)
    o, d = _pixel_ray(cam, 10, 2, 65)                                    # the wall, normal +z
    wall = o + (o[2] + world.WALL_OFFSET) / -d[2] * d
    assert r.normals[2, 10] == pytest.approx([0.0, 0.0, 1.0])
    assert r.shading[2, 10] == pytest.approx(0.1 + _lamp_term(lamp, wall, np.array([0.0, 0.0, 1.0])), rel=1e-6)


def test_floating_cube_casts_its_closed_form_shadow():
    # A lamp straight above a floating, unturned cube: the shadow on the ground is the cube's
    # top face (the nearest to the lamp) projected from it, a square of half-side
    # r * Ly / (Ly - top).
    base, ly, size = 1.2, 8.0, 0.6
    cube = SceneObject("cube", "green", 0.0, 0.0, size, 0.0, y=base)
    key = Lamp((0.0, ly, 0.0), 0.6, 16.0, True)
    fill = Lamp((5.0, 4.0, 5.0), 0.25, 16.0, False)
    cam = Camera(25.0, 0.0, 6.0, 36.0)
    r = render(Scene((cube,), cam, NO_LIGHT, 0.1, (key, fill)), size=64)
    half = world._RADIUS["cube"] * size * ly / (ly - base - cube.height())
    inside = outside = 0
    for row, col in zip(*np.nonzero(r.normals[..., 1] > 0.999)):
        if r.instances[row, col]:
            continue                                   # the cube's top face
        origin, d = _pixel_ray(cam, col, row, 64)
        p = origin + origin[1] / -d[1] * d
        reach = max(abs(p[0]), abs(p[2]))
        unlit = 0.1 + _lamp_term(fill, p, np.array([0.0, 1.0, 0.0]))
        if reach < half - 0.02:                        # under the floating cube: shadowed
            inside += 1
            assert r.shadow[row, col]
            assert r.shading[row, col] == pytest.approx(unlit, rel=1e-6)
        elif reach > half + 0.02:
            outside += 1
            assert not r.shadow[row, col]
            lit = unlit + _lamp_term(key, p, np.array([0.0, 1.0, 0.0]))
            assert r.shading[row, col] == pytest.approx(lit, rel=1e-6)
    assert inside > 40 and outside > 1000
    # In the shadow the fill still varies: no tied plateau
    assert len(np.unique(r.shading[r.shadow])) > 0.9 * r.shadow.sum()


def test_floating_bases_are_seen_from_below_and_face_the_camera():
    cam = Camera(5.0, 0.0, 6.0, 36.0)                  # low camera: it sees under the objects
    for shape in ("cylinder", "cone"):
        obj = SceneObject(shape, "red", 0.0, 1.0, 0.6, 0.0, y=1.4)
        r = render(Scene((obj,), cam, NO_LIGHT, 0.2, (Lamp((0.0, 9.0, 3.0), 0.7, 16.0, True),)))
        bottom = (r.instances == 1) & (r.normals[..., 1] < -0.999)
        assert bottom.sum() > 5, shape
        assert r.shading[bottom] == pytest.approx(0.2)  # faces away from the lamp above


def test_rgb_is_albedo_times_shading_and_never_clips():
    d = render_many(24, seed=3, world=V2)
    assert d["shading"].max() <= 1.0 + 1e-6 and d["albedo"].max() <= 1.0
    expected = np.rint(255 * d["albedo"].astype(np.float64) * d["shading"][..., None].astype(np.float64))
    diff = np.abs(d["rgb"].astype(float) - expected)
    assert diff.max() <= 1                             # float32 storage of the two factors
    assert (diff > 0).mean() < 1e-3
    assert d["rgb"].max() < 255                        # not even the brightest pixel clips


def test_texture_is_tiled_albedo_on_ground_and_wall_only():
    tex = Texture(tile=0.5, angle=0.0, offset=(0.0, 0.0), contrast=0.1, seed=7)
    obj = SceneObject("sphere", "yellow", 0.0, 0.0, 0.5, 0.0)
    cam = Camera(30.0, 0.0, 6.0, 36.0)
    plain = render(Scene((obj,), cam, (0.0, 0.6, 0.0), 0.3))
    tiled = render(Scene((obj,), cam, (0.0, 0.6, 0.0), 0.3, texture=tex))
    np.testing.assert_array_equal(tiled.shading, plain.shading)
    fg = plain.foreground
    np.testing.assert_array_equal(tiled.albedo[fg], plain.albedo[fg])
    ratio = tiled.albedo[~fg] / plain.albedo[~fg]
    assert np.all(np.abs(ratio - 1) <= 0.1 + 1e-6) and ratio.std() > 0.02
    np.testing.assert_allclose(ratio[:, 0], ratio[:, 2], rtol=1e-6)         # a tone, no tint
    # One tone per tile: ground pixels whose hit points share a tile index share the tone
    ground = ~fg & (plain.normals[..., 1] > 0.999)
    tones: dict[tuple[int, int], set[float]] = {}
    for row, col in zip(*np.nonzero(ground)):
        o, dvec = _pixel_ray(cam, col, row, 64)
        p = o + o[1] / -dvec[1] * dvec
        key = (int(np.floor(p[0] / 0.5)), int(np.floor(p[2] / 0.5)))
        tones.setdefault(key, set()).add(round(float(tiled.albedo[row, col, 0] / plain.albedo[row, col, 0]), 5))
    assert len(tones) > 10 and all(len(v) == 1 for v in tones.values())


# --- captions -----------------------------------------------------------------------------------

def test_captions_follow_image_columns_under_roll():
    left = SceneObject("sphere", "red", -1.0, 0.0, 0.5, 0.0)
    right = SceneObject("cube", "blue", 1.0, 0.0, 0.5, 0.0, y=0.9)
    lamps = (Lamp((2.0, 7.0, 5.0), 0.7, 16.0, True),)

    def scene(roll: float) -> Scene:
        return Scene((right, left), Camera(30.0, 0.0, 6.0, 36.0, roll), NO_LIGHT, 0.2, lamps)

    assert scene(0).caption() == "a red sphere to the left of a blue cube"
    assert scene(180).caption() == "a blue cube to the left of a red sphere"
    assert scene(160).caption() == "a blue cube to the left of a red sphere"
    for roll in (0.0, 20.0, 160.0, 200.0, 340.0):
        r = render(scene(roll))
        cols = {k: np.nonzero(r.instances == k)[1].mean() for k in (1, 2)}    # 1 cube, 2 sphere
        first = "a red sphere" if cols[2] < cols[1] else "a blue cube"
        assert scene(roll).caption().startswith(first), roll


def test_v2_captions_name_objects_a_clear_gap_apart():
    for i in range(40):
        s = scene_for(8, i, world=V2)
        cols = sorted(s.camera.project(o.centre(), 1)[0] for o in s.objects)
        assert all(b - a >= V2.caption_gap for a, b in zip(cols, cols[1:]))
        names = s.caption().split(" to the left of ")
        assert len(names) == len(s.objects)


# --- sampled v2 scenes --------------------------------------------------------------------------

def test_v2_scenes_are_well_formed():
    modes = {"ground": 0, "floating": 0, "stacked": 0}
    rolls, elevations, key_elevations = [], [], []
    for i in range(80):
        s = scene_for(2, i, world=V2)
        assert 1 <= len(s.objects) <= 3
        rolls.append(s.camera.roll)
        elevations.append(s.camera.elevation)
        for o in s.objects:
            assert world._clear_of(o, [q for q in s.objects if q is not o])
            tops = [q for q in s.objects if q is not o and q.shape in ("cube", "cylinder")
                    and abs(q.y + q.height() - o.y) < 1e-12 and np.hypot(q.x - o.x, q.z - o.z) < q.size]
            modes["ground" if o.y == 0 else "stacked" if tops else "floating"] += 1
        key, fill = s.lamps
        assert key.shadows and not fill.shadows
        assert s.ambient + key.intensity + fill.intensity == pytest.approx(1.0)
        rel = np.asarray(key.position) - np.asarray(world.TARGET)
        key_elevations.append(np.degrees(np.arcsin(rel[1] / np.linalg.norm(rel))))
        fh = -np.array([np.sin(np.radians(s.camera.azimuth)), 0.0, np.cos(np.radians(s.camera.azimuth))])
        for lamp in s.lamps:
            assert np.asarray(lamp.position) @ fh < world.WALL_OFFSET          # in front of the wall
            assert all(np.hypot(lamp.position[0] - o.x, lamp.position[2] - o.z) > o.footprint()
                       or lamp.position[1] > o.y + o.height() for o in s.objects)
        r = render(s)
        assert np.all(np.isfinite(r.depth)) and np.all(r.depth > 0)
        for k in range(1, len(s.objects) + 1):
            assert (r.instances == k).sum() >= 10, (i, k)   # no object the caption names is hidden
    assert min(modes.values()) >= 3, modes
    assert max(rolls) - min(rolls) > 300 and min(elevations) < 20 and max(elevations) > 50
    assert min(key_elevations) < 20 and max(key_elevations) > 70


def test_v2_visible_surfaces_face_the_camera():
    for i in range(12):
        scene = scene_for(5, i, world=V2)
        r = render(scene)
        _, d, _ = world._rays(scene.camera, 64)
        assert (r.normals.reshape(-1, 3) * d).sum(1).max() < 1e-4, f"scene {i}"


def test_v2_culled_rays_match_exhaustive_rays():
    # V2 tests camera and shadow rays against bounding spheres first; dropping the lamps'
    # culling shortcut (as V1's path does for camera rays) must change nothing.
    for i in range(6):
        s = scene_for(4, i, world=V2)
        fast = render(s)
        origin, d, _ = world._rays(s.camera, 64)
        for k, obj in enumerate(s.objects, start=1):
            t, _ = world._hit_object(obj, origin, d)
            hit = np.isfinite(t).reshape(64, 64)
            assert np.all(hit[fast.instances == k])
            assert np.all(world._may_hit(obj, origin, d).reshape(64, 64)[hit])


def test_v2_determinism_and_extra_fields():
    a = render_many(3, seed=9, world="v2", fields=("rgb", "shadow"))
    b = render_many(3, seed=9, world=V2, fields=("rgb", "shadow"))
    np.testing.assert_array_equal(a["rgb"], b["rgb"])
    np.testing.assert_array_equal(a["shadow"], b["shadow"])
    assert a["shadow"].dtype == bool
    assert set(render_many(1, seed=9)) == {*world.FIELDS, "captions"}
    with pytest.raises(ValueError, match="unknown fields"):
        render_many(1, seed=9, fields=("depht",))
