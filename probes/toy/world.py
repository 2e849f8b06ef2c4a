"""Procedural 3D scenes with exact per-pixel ground truth, ray cast in numpy.

Why: Stable Diffusion's real pseudo-labels (TRACER, MiDaS, Intrinsic) are only estimates, and
neither they nor SD can be downloaded on every machine. This world renders simple shapes on a
ground plane in front of a wall, so a tiny diffusion model can be trained on its images and every
label a probe needs (foreground, depth, shading, classes) is known exactly.

Two worlds draw scenes (:class:`WorldConfig`, presets :data:`V1` and :data:`V2`); one renderer
draws both. **V1** is the original world, kept bit for bit because the first toy model and labelers
were trained on it (the shipped ones are V2's: :data:`SHIPPED_WORLD`): the camera never rolls and looks down 22-42 degrees, objects stand on the
ground, one directional light without shadows, untextured ground and wall. In V1 position alone
explains most labels (the ground's depth rises row by row, ground and wall have one shading value
each). **V2** removes that: the camera rolls over the full circle and looks down 10-60 degrees;
objects stand, float or rest on a flat top of another, at varied depths, often partly occluding
each other; a key point light 2-88 degrees high casts shadows and a fill point light keeps every
shadow's shading varying; ground and wall carry a tiled albedo texture.

Conventions (all tested in ``tests/unit/test_toy_world*.py``):

* World frame: y is up, the ground is the plane y = 0. Every angle is in **degrees**. The camera
  looks at :data:`TARGET` from ``elevation`` above the ground plane and ``azimuth`` about the y
  axis (azimuth 0 puts the camera on +z, looking towards -z, with +x to the right of the image),
  then turns by ``roll`` counter-clockwise about its optical axis, so the picture turns clockwise
  by ``roll`` about the image centre (roll 180 flips it both ways). Labels stay exact under roll:
  the rays themselves are rolled, nothing is resampled.
* The backdrop wall is perpendicular to the camera's horizontal viewing direction,
  :data:`WALL_OFFSET` beyond the world origin, and has no top. A ray with a forward horizontal
  component hits the wall, one going down hits the ground; every ray of a camera with
  ``5 <= elevation <= 85`` and a 36 degree field of view does one or the other under any roll
  (the image corner is 24.7 degrees off axis), so depth is finite.
* An object's base is at height ``y`` (0: on the ground; > 0: floating, or resting on the flat top
  of a cube or cylinder below it). Objects never interpenetrate.
* ``depth`` is the distance along the camera's optical axis (z-buffer depth, not ray length);
  ``inv_depth = 1 / depth`` (MiDaS's convention: near is large).
* ``normals`` are unit vectors in the **world** frame. Shading is Lambertian, with no
  interreflection: ``shading = ambient + max(0, n . light) + sum over lamps of
  intensity * visible * max(0, n . l(p)) * falloff(|L - p|)`` where ``light`` is V1's directional
  light (world direction scaled by its intensity; zero in V2), ``l(p)`` the unit direction from
  the surface point to the lamp at ``L`` (per pixel), and ``falloff(d) = reach**2 /
  (reach**2 + d**2)``: the inverse-square law with its singularity at the lamp softened (it is
  ``~ reach**2 / d**2`` far away and never exceeds 1). ``visible`` is 0 where a shadow ray from
  the point to a shadow-casting lamp hits an object, else 1 (ground and wall cast none: lamps are
  above the ground and in front of the wall, so they could not shade a visible point anyway).
  Intensities satisfy ``ambient + |light| + sum(intensity) <= 1``, so ``shading <= 1``,
  ``albedo * shading <= 1`` and the image never clips.
* ``rgb = round(255 * albedo * shading)``: albedo is taken as display-referred (no gamma step).
* One ray per pixel through the pixel centre, **no antialiasing**, so every label is exact and
  all maps agree pixel for pixel (the object a pixel's depth comes from is the object its
  instance, class, colour, normal and shading come from).

Speed of V1 (measured with ``render_many`` on the shared 2-core machine under ``nice -n 19`` while
other jobs kept the load average at ~4, one thread, 64 px, up to 3 objects): ~195 scenes/s
with every field, ~245 scenes/s with the five fields training needs (10,000 renders in ~40 s,
a 20,000-scene dataset in under two minutes), i.e. 4-5 ms per scene. V2 (shadow rays, two
lamps, texture, a pickier sampler) costs ~5.5 ms of CPU per scene with every field, ~175-200
scenes per CPU-second (V1 on the same run: 255-335), one thread, 64 px, measured under
``nice -n 19`` with the load average at 3.5-4.4 on the 2 shared cores (wall rate 87-136/s).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 40),
    "green": (45, 165, 60),
    "blue": (45, 80, 210),
    "yellow": (225, 205, 45),
    "purple": (135, 55, 175),
    "orange": (235, 125, 35),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
GROUND_ALBEDO = (0.50, 0.50, 0.50)
WALL_ALBEDO = (0.78, 0.78, 0.76)
TARGET = (0.0, 0.5, 0.0)
WALL_OFFSET = 3.0
FIELDS: tuple[str, ...] = ("rgb", "depth", "inv_depth", "foreground", "instances", "classes",
                           "colours", "shading", "albedo", "normals")
#: maps :func:`render_many` also gives on request (not by default, so V1 datasets keep their keys)
EXTRA_FIELDS: tuple[str, ...] = ("shadow",)

# Half-extents of each shape relative to ``SceneObject.size``: (footprint radius, height).
# Tuned so that one object covers roughly 5-30 % of a 64 px image.
_RADIUS = {"sphere": 1.0, "cube": 0.82, "cylinder": 0.85, "cone": 1.0}
_HEIGHT = {"sphere": 2.0, "cube": 1.64, "cylinder": 1.8, "cone": 2.2}
_FLAT_TOP = ("cube", "cylinder")          # shapes another object can rest on
_EPS = 1e-9


@dataclass(frozen=True)
class SceneObject:
    """One shape with its base centre at (x, y, z), turned by ``yaw`` degrees about y.

    ``y`` is 0 for an object on the ground; V2 lifts objects (floating, or stacked on a flat top).
    """

    shape: str
    colour: str
    x: float
    z: float
    size: float
    yaw: float
    y: float = 0.0

    def footprint(self) -> float:
        """Radius of the circle the object covers on the ground (cube: its corners)."""
        r = _RADIUS[self.shape] * self.size
        return r * np.sqrt(2.0) if self.shape == "cube" else r

    def height(self) -> float:
        return _HEIGHT[self.shape] * self.size

    def centre(self) -> tuple[float, float, float]:
        """Mid-height point on the object's axis: where captions place it in the image."""
        return (self.x, self.y + self.height() / 2, self.z)


@dataclass(frozen=True)
class Camera:
    """A pinhole camera orbiting :data:`TARGET`; ``fov`` is the full field of view (square image),
    ``roll`` turns the camera counter-clockwise about its optical axis (the picture clockwise)."""

    elevation: float
    azimuth: float
    distance: float
    fov: float
    roll: float = 0.0

    def frame(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(origin, right, up, forward) in world coordinates, each forward/right/up unit."""
        el, az = np.radians(self.elevation), np.radians(self.azimuth)
        back = np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
        origin = np.asarray(TARGET) + self.distance * back
        forward = -back
        right = np.array([-forward[2], 0.0, forward[0]]) / np.hypot(forward[0], forward[2])
        up = np.array([-right[2] * forward[1], right[2] * forward[0] - right[0] * forward[2],
                       right[0] * forward[1]])                 # right x forward, right_y = 0
        if self.roll:                                          # roll 0 keeps V1's bits
            c, s = np.cos(np.radians(self.roll)), np.sin(np.radians(self.roll))
            right, up = c * right + s * up, c * up - s * right
        return origin, right, up, forward

    def project(self, point: Sequence[float], size: int) -> tuple[float, float]:
        """(column, row) in pixels of a world point, pixel centres at integer + 0.5."""
        origin, right, up, forward = self.frame()
        rel = np.asarray(point, dtype=float) - origin
        f = 0.5 * size / np.tan(np.radians(self.fov) / 2)
        zc = rel @ forward
        return 0.5 * size + f * (rel @ right) / zc, 0.5 * size - f * (rel @ up) / zc


@dataclass(frozen=True)
class Lamp:
    """A point light at ``position``; see the module docstring for its shading and falloff."""

    position: tuple[float, float, float]
    intensity: float
    reach: float
    shadows: bool


@dataclass(frozen=True)
class Texture:
    """Tiled albedo of ground and wall: each square tile (side ``tile`` world units, grid turned
    by ``angle`` degrees on the ground and shifted by ``offset`` tiles) multiplies the base albedo
    by one tone drawn from ``1 +- contrast`` by an integer hash of its index and ``seed``.

    Why tiles: piecewise-constant albedo with sharp edges is what a shading labeler can tell from
    shading (smooth, edges only at occlusions and shadow borders), while the random tones give
    the background an albedo that position cannot predict.
    """

    tile: float
    angle: float
    offset: tuple[float, float]
    contrast: float
    seed: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    camera: Camera
    light: tuple[float, float, float]
    ambient: float
    lamps: tuple[Lamp, ...] = ()
    texture: Texture | None = None

    def caption(self) -> str:
        """Objects named left to right as the image shows them (by the columns of their projected
        centres in the rolled image), because a text-to-image model is prompted with, and probed
        against, this order."""
        def column(o: SceneObject) -> float:
            return self.camera.project(o.centre(), 64)[0]

        names = [f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {o.shape}"
                 for o in sorted(self.objects, key=column)]
        return " to the left of ".join(names)


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are drawn. ``version`` picks the sampler: 1 is the original one, kept so that
    :data:`V1` draws exactly the scenes it always drew (it reads only the fields marked V1);
    2 reads every field. Ranges are ``(low, high)`` of uniform draws; angles in degrees.

    :param elevation: camera elevation (V1).
    :param distance: camera distance from :data:`TARGET` (V1).
    :param fov: camera field of view (V1).
    :param roll: camera roll.
    :param size: object size factor (V1).
    :param spread: half-widths in x and z of the square object bases are drawn in (V1).
    :param float_share: chance an object floats (its base at ``float_height``).
    :param stack_share: chance an object rests on the flat top of a cube or cylinder already
        placed (if there is none it stands on the ground).
    :param float_height: base height of floating objects.
    :param light_elevation: key light elevation seen from :data:`TARGET` (V1: the directional light's).
    :param ambient: ambient term (V1).
    :param lamp_distance: distance of V2's lamps from :data:`TARGET`.
    :param reach: the lamps' falloff distance (module docstring).
    :param key_share: the key lamp's share of ``1 - ambient``; the fill lamp gets the rest.
    :param fill_elevation: fill lamp elevation; its azimuth is the key's + 180 +- 60.
    :param texture_contrast: half-range of the tiles' tones (0: no texture).
    :param tile: tile side range, world units.
    :param caption_gap: least column gap between two objects' projected centres, as a share of
        the image width, so that "to the left of" is never a coin toss.
    """

    name: str
    version: int
    elevation: tuple[float, float]
    distance: tuple[float, float] = (5.6, 6.6)
    fov: float = 36.0
    roll: tuple[float, float] = (0.0, 0.0)
    size: tuple[float, float] = (0.5, 0.78)
    spread: tuple[float, float] = (1.2, 1.1)
    float_share: float = 0.0
    stack_share: float = 0.0
    float_height: tuple[float, float] = (0.0, 0.0)
    light_elevation: tuple[float, float] = (25.0, 80.0)
    ambient: tuple[float, float] = (0.2, 0.4)
    lamp_distance: tuple[float, float] = (0.0, 0.0)
    reach: float = 0.0
    key_share: tuple[float, float] = (1.0, 1.0)
    fill_elevation: tuple[float, float] = (0.0, 0.0)
    texture_contrast: float = 0.0
    tile: tuple[float, float] = (0.0, 0.0)
    caption_gap: float = 0.0

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"WorldConfig.version must be 1 or 2, got {self.version}")
        if self.version == 1:
            v1_fields = {"name", "version", "elevation", "distance", "fov", "size", "spread",
                         "light_elevation", "ambient"}
            ignored = [f.name for f in fields(self)
                       if f.name not in v1_fields and getattr(self, f.name) != f.default]
            if ignored:
                raise ValueError(f"the version-1 sampler ignores {ignored}; use version=2 for them")


#: the original world (the first shipped model and labelers were trained on it)
V1 = WorldConfig(name="v1", version=1, elevation=(22.0, 42.0))

#: the world position cannot explain (issue 20): on exact labels of 200 held-out renders the
#: prior map (per-pixel mean of 600 train renders) scores per-image Spearman 0.10 on depth and
#: 0.15 on shading (V1: 0.90 and 0.59), the shading tie ceiling is 1.000 (V1: 0.873); measured
#: by ``python -m probes.toy.world_bars``. Roll does most of it. Objects are drawn large, bright and
#: seen from at most 60 degrees up, so that a 64 px model can draw them and a classifier can tell a
#: cone from a cylinder (from 80 degrees both are discs); the first draft (elevation 5-80, smaller
#: objects, ambient 0.06-0.14, finer tiles) scored 0.04 / 0.05.
V2 = WorldConfig(
    name="v2", version=2, elevation=(10.0, 60.0), distance=(5.2, 6.2), roll=(0.0, 360.0),
    size=(0.55, 0.8), spread=(1.5, 1.5), float_share=0.25, stack_share=0.45,
    float_height=(0.3, 1.2), light_elevation=(2.0, 88.0), ambient=(0.15, 0.25),
    lamp_distance=(6.5, 9.0), reach=16.0, key_share=(0.65, 0.8), fill_elevation=(10.0, 60.0),
    texture_contrast=0.08, tile=(0.6, 1.2), caption_gap=0.06)

WORLDS: dict[str, WorldConfig] = {"v1": V1, "v2": V2}

#: the world the shipped toy model and labelers (``data/toy``) were trained on: the default of
#: everything that prompts, feeds or scores them (prompt sets, the lens's scenes); tests check it
#: against their recipes. The renderer's own functions keep V1 as their default (V1 stays selectable
#: everywhere with ``world="v1"``).
SHIPPED_WORLD = "v2"


def world_config(name: str | WorldConfig) -> WorldConfig:
    """A preset by name (``v1``, ``v2``), or the config itself."""
    if isinstance(name, WorldConfig):
        return name
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; choose one of {', '.join(WORLDS)}")
    return WORLDS[name]


def sample_scene(rng: np.random.Generator, max_objects: int = 3, world: WorldConfig | str = V1) -> Scene:
    """A random scene of 1..max_objects objects drawn as ``world`` (a config or preset name) says."""
    world = world_config(world)
    if world.version == 1:
        return _sample_v1(rng, max_objects, world)
    return _sample_v2(rng, max_objects, world)


def _sample_v1(rng: np.random.Generator, max_objects: int, world: WorldConfig) -> Scene:
    """Objects on the ground whose footprints do not overlap, one directional light, no shadow."""
    camera = Camera(elevation=float(rng.uniform(*world.elevation)), azimuth=float(rng.uniform(0, 360)),
                    distance=float(rng.uniform(*world.distance)), fov=world.fov)
    n = int(rng.integers(1, max_objects + 1))
    objects: list[SceneObject] = []
    for _ in range(200):                      # rejection sampling; 3 objects fit easily
        if len(objects) == n:
            break
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        obj = SceneObject(shape=shape, colour=COLOURS[int(rng.integers(len(COLOURS)))],
                          x=float(rng.uniform(-world.spread[0], world.spread[0])),
                          z=float(rng.uniform(-world.spread[1], world.spread[1])),
                          size=float(rng.uniform(*world.size)), yaw=float(rng.uniform(0, 90)))
        if all(np.hypot(obj.x - o.x, obj.z - o.z) > obj.footprint() + o.footprint() + 0.05
               for o in objects):
            objects.append(obj)
    # Light from above: elevation 25-80 degrees, any azimuth; intensity leaves room for ambient.
    ambient = float(rng.uniform(*world.ambient))
    lel, laz = np.radians(rng.uniform(*world.light_elevation)), np.radians(rng.uniform(0, 360))
    direction = np.array([np.cos(lel) * np.sin(laz), np.sin(lel), np.cos(lel) * np.cos(laz)])
    light = tuple(float(v) for v in (1.0 - ambient) * direction)
    return Scene(objects=tuple(objects), camera=camera, light=light, ambient=ambient)


def _clear_of(obj: SceneObject, others: Sequence[SceneObject]) -> bool:
    """No interpenetration: footprints apart, or height intervals apart (touching is allowed,
    which is how a stacked object rests on its support)."""
    for o in others:
        apart = np.hypot(obj.x - o.x, obj.z - o.z) > obj.footprint() + o.footprint() + 0.05
        above = obj.y >= o.y + o.height() - 1e-9 or o.y >= obj.y + obj.height() - 1e-9
        if not (apart or above):
            return False
    return True


def _placement(obj: SceneObject, frame: tuple[np.ndarray, ...], fov: float) -> tuple[float, bool]:
    """Column of the object's projected centre (unit square) and whether its bounding sphere
    projects inside the image but for a margin of 30 % of its radius (so the caption never names
    an object the picture cuts off: the bounding sphere is wider than every silhouette)."""
    origin, right, up, forward = frame
    rel = np.asarray(obj.centre()) - origin
    zc = rel @ forward
    f = 0.5 / np.tan(np.radians(fov) / 2)
    col, row = 0.5 + f * (rel @ right) / zc, 0.5 - f * (rel @ up) / zc
    radius = float(np.hypot(obj.footprint(), obj.height() / 2))
    if zc <= radius:
        return float(col), False
    rho = 0.7 * f * radius / np.sqrt(zc * zc - radius * radius)
    return float(col), bool(rho <= col <= 1 - rho and rho <= row <= 1 - rho)


def _seen(objects: Sequence[SceneObject], origin: np.ndarray) -> bool:
    """Each object is what the camera's ray to its centre, or to the middle of its lower half,
    meets first, so no object the caption names is hidden behind another (partial occlusion
    stays common; the second ray lets a support show its sides under the object it carries)."""
    aims = np.array([p for o in objects for p in (o.centre(), (o.x, o.y + o.height() / 4, o.z))])
    d = aims - origin
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    t = np.stack([_hit_object(o, origin, d, normals=False)[0] for o in objects])   # [object, ray]
    first = np.argmin(t, axis=0)
    return all(first[2 * k] == k or first[2 * k + 1] == k for k in range(len(objects)))


def _lamp_at(camera: Camera, elevation: float, azimuth: float, distance: float
             ) -> tuple[float, float, float] | None:
    """A lamp position seen from TARGET, or None if it would stand behind the wall (or within
    half a unit of it)."""
    el, az = np.radians(elevation), np.radians(azimuth)
    pos = np.asarray(TARGET) + distance * np.array(
        [np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
    cam_az = np.radians(camera.azimuth)
    beyond = -(pos[0] * np.sin(cam_az) + pos[2] * np.cos(cam_az))      # pos . horizontal forward
    return None if beyond > WALL_OFFSET - 0.5 else (float(pos[0]), float(pos[1]), float(pos[2]))


def _draw_lamp(rng: np.random.Generator, camera: Camera, world: WorldConfig,
               elevation: tuple[float, float], intensity: float, shadows: bool,
               opposite: float | None) -> tuple[Lamp, float]:
    """A lamp at any azimuth (the key) or at ``opposite + 180 +- 60`` degrees (the fill, so that
    what faces away from the key faces it), redrawn while it would stand behind the wall."""
    for _ in range(100):                      # most azimuths are in front of the wall
        azimuth = (float(rng.uniform(0, 360)) if opposite is None
                   else opposite + 180.0 + float(rng.uniform(-60, 60)))
        pos = _lamp_at(camera, float(rng.uniform(*elevation)), azimuth, float(rng.uniform(*world.lamp_distance)))
        if pos is not None:
            break
    else:                                     # not seen in practice: the camera's side is in front
        azimuth = camera.azimuth
        pos = _lamp_at(camera, float(np.mean(elevation)), azimuth, world.lamp_distance[0])
    assert pos is not None
    return Lamp(position=pos, intensity=float(intensity), reach=world.reach, shadows=shadows), azimuth


def _sample_v2(rng: np.random.Generator, max_objects: int, world: WorldConfig) -> Scene:
    """Rolled camera, objects standing / floating / stacked, key and fill lamps, textured room."""
    camera = Camera(elevation=float(rng.uniform(*world.elevation)), azimuth=float(rng.uniform(0, 360)),
                    distance=float(rng.uniform(*world.distance)), fov=world.fov,
                    roll=float(rng.uniform(*world.roll)))
    frame = camera.frame()
    n = int(rng.integers(1, max_objects + 1))
    objects: list[SceneObject] = []
    columns: list[float] = []
    for _ in range(400):                      # rejection sampling
        if len(objects) == n:
            break
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
        size, yaw = float(rng.uniform(*world.size)), float(rng.uniform(0, 90))
        mode = float(rng.uniform())
        x = float(rng.uniform(-world.spread[0], world.spread[0]))
        z = float(rng.uniform(-world.spread[1], world.spread[1]))
        y = 0.0
        supports = [o for o in objects if o.shape in _FLAT_TOP]
        if mode < world.stack_share:
            if supports:                                # else it stands on the ground
                s = supports[int(rng.integers(len(supports)))]
                r = _RADIUS[s.shape] * s.size * 0.35    # inside the top face for either shape
                ox, oz = rng.uniform(-r, r, 2) / np.sqrt(2)
                x, z, y = s.x + float(ox), s.z + float(oz), s.y + s.height()
        elif mode < world.stack_share + world.float_share:
            y = float(rng.uniform(*world.float_height))
        obj = SceneObject(shape=shape, colour=colour, x=x, z=z, size=size, yaw=yaw, y=y)
        column, inside = _placement(obj, frame, camera.fov)
        if not (inside and _clear_of(obj, objects)
                and all(abs(column - c) >= world.caption_gap for c in columns)
                and (not objects or _seen([*objects, obj], frame[0]))):
            continue
        objects.append(obj)
        columns.append(column)
    ambient = float(rng.uniform(*world.ambient))
    key = (1.0 - ambient) * float(rng.uniform(*world.key_share))
    key_lamp, key_azimuth = _draw_lamp(rng, camera, world, world.light_elevation, key, True, None)
    fill_lamp, _ = _draw_lamp(rng, camera, world, world.fill_elevation, 1.0 - ambient - key, False,
                              key_azimuth)
    texture = None
    if world.texture_contrast > 0:
        texture = Texture(tile=float(rng.uniform(*world.tile)), angle=float(rng.uniform(0, 90)),
                          offset=(float(rng.uniform()), float(rng.uniform())),
                          contrast=world.texture_contrast, seed=int(rng.integers(2**31)))
    return Scene(objects=tuple(objects), camera=camera, light=(0.0, 0.0, 0.0), ambient=ambient,
                 lamps=(key_lamp, fill_lamp), texture=texture)


def scene_for(seed: int, index: int, max_objects: int = 3, world: WorldConfig | str = V1) -> Scene:
    """The ``index``-th scene of a dataset: independent of how many scenes come before it."""
    return sample_scene(np.random.default_rng([seed, index]), max_objects, world)


@dataclass
class Render:
    rgb: np.ndarray          # (H, W, 3) uint8
    depth: np.ndarray        # (H, W) float32, along the optical axis
    inv_depth: np.ndarray    # (H, W) float32
    foreground: np.ndarray   # (H, W) bool, objects only
    instances: np.ndarray    # (H, W) int16, 0 background, k = scene.objects[k - 1]
    classes: np.ndarray      # (H, W) int16, -1 background, else SHAPES index
    colours: np.ndarray      # (H, W) int16, -1 background, else COLOURS index
    shading: np.ndarray      # (H, W) float32, see the module docstring
    albedo: np.ndarray       # (H, W, 3) float32 in [0, 1]
    normals: np.ndarray      # (H, W, 3) float32, unit, world frame
    shadow: np.ndarray       # (H, W) bool, an object blocks a shadow-casting lamp
    caption: str


def _rays(camera: Camera, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    origin, right, up, forward = camera.frame()
    half = np.tan(np.radians(camera.fov) / 2)
    c = ((np.arange(size) + 0.5) / size * 2 - 1) * half
    u, v = np.meshgrid(c, -c)                                  # row 0 is the top of the image
    d = forward + u[..., None] * right + v[..., None] * up
    d = d.reshape(-1, 3)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return origin, d, forward


def _positive(t: np.ndarray) -> np.ndarray:
    return np.where(t > 1e-6, t, np.inf)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot of [N, 3] rays with one vector (V1's matrix product, bit for bit) or with
    one vector per ray (shadow rays start at every pixel's surface point)."""
    return a @ b if b.ndim == 1 else np.einsum("ij,ij->i", a, b)


def _may_hit(obj: SceneObject, origin: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Rays (unit ``d``) that pass through the object's bounding sphere ahead of ``origin``:
    the only ones worth the exact test, which costs ten times more."""
    centre = np.asarray(obj.centre())
    radius = float(np.hypot(obj.footprint(), obj.height() / 2)) + 1e-6
    rel = centre - origin
    along = _dot(d, rel)
    off2 = (rel @ rel if rel.ndim == 1 else _dot(rel, rel)) - along * along
    return (off2 <= radius * radius) & (along > -radius)


def _hit_object(obj: SceneObject, origin: np.ndarray, d: np.ndarray, normals: bool = True
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Ray parameter (inf on a miss) and world normal (None unless ``normals``) of every ray
    against one object.

    ``origin`` is one point (camera rays) or one point per ray ([N, 3], shadow rays).
    """
    yaw = np.radians(obj.yaw)
    cy, sy = np.cos(yaw), np.sin(yaw)
    rot = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])   # local -> world
    base = np.array([obj.x, obj.y, obj.z])
    o = rot.T @ (origin - base) if origin.ndim == 1 else (origin - base) @ rot
    dl = d @ rot                                                     # = (rot.T @ d.T).T
    r, h = _RADIUS[obj.shape] * obj.size, obj.height()
    ox, oy, oz = o.T
    dx, dy, dz = dl[:, 0], dl[:, 1], dl[:, 2]
    n = np.zeros_like(dl)
    with np.errstate(invalid="ignore", divide="ignore"):
        if obj.shape == "sphere":
            oc = o - np.array([0.0, r, 0.0])
            b = _dot(dl, oc)
            disc = b * b - (_dot(oc, oc) - r * r)
            t = _positive(np.where(disc >= 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf))
            p = o + t[:, None] * dl
            n = (p - np.array([0.0, r, 0.0])) / r
        elif obj.shape == "cube":
            lo, hi = np.array([-r, 0.0, -r]), np.array([r, h, r])
            ds = np.where(np.abs(dl) < _EPS, _EPS, dl)
            t1, t2 = (lo - o) / ds, (hi - o) / ds
            tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
            axis = np.argmax(tmin, axis=1)
            tnear, tfar = tmin.max(axis=1), tmax.min(axis=1)
            t = _positive(np.where(tnear <= tfar, tnear, np.inf))
            rows = np.arange(len(dl))
            n[rows, axis] = -np.sign(ds[rows, axis])
        else:
            k = r / h if obj.shape == "cone" else 0.0
            w0 = h - oy
            a = dx * dx + dz * dz - k * k * dy * dy
            b = 2 * (ox * dx + oz * dz) + 2 * k * k * w0 * dy
            c = ox * ox + oz * oz - (r * r if obj.shape == "cylinder" else k * k * w0 * w0)
            disc = b * b - 4 * a * c
            sq = np.sqrt(np.maximum(disc, 0))
            a_safe = np.where(np.abs(a) < _EPS, _EPS, a)
            best = np.full(len(dl), np.inf)
            for root in ((-b - sq) / (2 * a_safe), (-b + sq) / (2 * a_safe)):
                y = oy + root * dy
                ok = (disc >= 0) & (root > 1e-6) & (y >= 0) & (y <= h)
                best = np.where(ok & (root < best), root, best)
            t_side = best
            p = o + t_side[:, None] * dl
            dy_safe = np.where(np.abs(dy) < _EPS, _EPS, dy)
            if obj.shape == "cylinder":
                n_side = np.stack([p[:, 0], np.zeros_like(dx), p[:, 2]], axis=1)
                t_cap = _positive((h - oy) / dy_safe)
                pc = o + t_cap[:, None] * dl
                t_cap = np.where(pc[:, 0] ** 2 + pc[:, 2] ** 2 <= r * r, t_cap, np.inf)
            else:
                n_side = np.stack([p[:, 0], k * k * (h - p[:, 1]) + 0 * dx, p[:, 2]], axis=1)
                t_cap = np.full(len(dl), np.inf)        # the tip has no cap
            cap = t_cap < t_side
            t = np.where(cap, t_cap, t_side)
            n = np.where(cap[:, None], np.array([0.0, 1.0, 0.0]), n_side)
            if obj.y > 0:                               # a lifted base can be seen and shade
                t_base = _positive(-oy / dy_safe)
                pb = o + t_base[:, None] * dl
                t_base = np.where(pb[:, 0] ** 2 + pb[:, 2] ** 2 <= r * r, t_base, np.inf)
                under = t_base < t
                t = np.where(under, t_base, t)
                n = np.where(under[:, None], np.array([0.0, -1.0, 0.0]), n)
        if not normals:                                 # shadow rays need only t
            return t, None
        norm = np.linalg.norm(n, axis=1, keepdims=True)
        n = np.where(norm > 0, n / np.where(norm > 0, norm, 1), np.array([0.0, 1.0, 0.0]))
    return t, n @ rot.T


_MASK32 = np.uint64(0xFFFFFFFF)


def _tile_tone(u: np.ndarray, v: np.ndarray, texture: Texture, salt: int) -> np.ndarray:
    """``1 +- contrast``, one value per tile, from an integer hash of the tile's index (exact
    and cheap: no interpolation, no table)."""
    i = np.floor(u / texture.tile + texture.offset[0]).astype(np.int64).astype(np.uint64)
    j = np.floor(v / texture.tile + texture.offset[1]).astype(np.int64).astype(np.uint64)
    h = (i * np.uint64(0x9E3779B1) + j * np.uint64(0x85EBCA77) + np.uint64(2 * texture.seed + salt)) & _MASK32
    for mult in (0x2C1B3C6D, 0x297A2D39):
        h ^= h >> np.uint64(15)
        h = (h * np.uint64(mult)) & _MASK32
    h ^= h >> np.uint64(15)
    return 1.0 + texture.contrast * (2.0 * h.astype(np.float64) / 2.0**32 - 1.0)


def _background_tone(texture: Texture, point: np.ndarray, which: np.ndarray, wall_normal: np.ndarray
                     ) -> np.ndarray:
    """Albedo factor per pixel: tiles on the ground (grid turned by ``angle``) and on the wall
    (grid along the wall and up), 1 on objects."""
    a = np.radians(texture.angle)
    ground = _tile_tone(point[:, 0] * np.cos(a) + point[:, 2] * np.sin(a),
                        point[:, 2] * np.cos(a) - point[:, 0] * np.sin(a), texture, 0)
    along = np.array([-wall_normal[2], 0.0, wall_normal[0]])
    wall = _tile_tone(point @ along, point[:, 1], texture, 1)
    return np.where(which == 0, ground, np.where(which == 1, wall, 1.0))


def _lamp_light(lamp: Lamp, point: np.ndarray, normal: np.ndarray, which: np.ndarray,
                objects: Sequence[SceneObject]) -> tuple[np.ndarray, np.ndarray]:
    """The lamp's shading term per pixel, and where an object casts a shadow from it.

    Shadow rays go from each surface point that faces the lamp towards it and are tested against
    every object but the point's own: the shapes are convex, so an object never shadows its own
    lit side (and skipping it avoids self-intersection noise).
    """
    rel = np.asarray(lamp.position) - point
    dist = np.sqrt(_dot(rel, rel))
    towards = rel / dist[:, None]
    cos = np.maximum(0.0, _dot(normal, towards))
    falloff = lamp.reach**2 / (lamp.reach**2 + dist * dist)
    blocked = np.zeros(len(point), bool)
    if lamp.shadows:
        lit = np.nonzero(cos > 0)[0]
        for k, obj in enumerate(objects):
            rays = lit[which[lit] != k + 2]
            rays = rays[_may_hit(obj, point[rays], towards[rays])]
            if len(rays):
                t, _ = _hit_object(obj, point[rays], towards[rays], normals=False)
                blocked[rays] |= t < dist[rays]
    return lamp.intensity * np.where(blocked, 0.0, cos * falloff), blocked


def render(scene: Scene, size: int = 64) -> Render:
    """Ray cast one scene: every surface is intersected with every pixel's ray, nearest wins."""
    origin, d, forward = _rays(scene.camera, size)
    npx = len(d)
    ts, normals, albedos = [], [], []
    with np.errstate(divide="ignore"):
        ts.append(_positive(np.where(d[:, 1] < 0, -origin[1] / d[:, 1], np.inf)))   # ground
    normals.append(np.broadcast_to([0.0, 1.0, 0.0], (npx, 3)))
    albedos.append(GROUND_ALBEDO)
    fh = forward * np.array([1.0, 0.0, 1.0])
    fh /= np.linalg.norm(fh)
    along = d @ fh                                     # > 0 for every ray of a sane camera
    with np.errstate(divide="ignore", invalid="ignore"):
        ts.append(_positive(np.where(along > 0, (WALL_OFFSET - origin @ fh) / along, np.inf)))
    normals.append(np.broadcast_to(-fh, (npx, 3)))
    albedos.append(WALL_ALBEDO)
    for obj in scene.objects:
        if scene.lamps:                  # V2: exact test only where the bounding sphere is hit
            t, n = np.full(npx, np.inf), np.zeros((npx, 3))
            near = np.nonzero(_may_hit(obj, origin, d))[0]
            t[near], n[near] = _hit_object(obj, origin, d[near])
        else:                            # V1's original path, bit for bit
            t, n = _hit_object(obj, origin, d)
        ts.append(t)
        normals.append(n)
        albedos.append(tuple(v / 255.0 for v in PALETTE[obj.colour]))
    t_all = np.stack(ts)
    which = np.argmin(t_all, axis=0)                   # 0 ground, 1 wall, 2+k object k
    rows = np.arange(npx)
    t = t_all[which, rows]
    if not np.all(np.isfinite(t)):
        raise ValueError("a ray escaped the scene: keep the camera elevation within 5..85 degrees "
                         "(and elevation + the image corner's angle off axis below 90 without roll)")
    normal = np.stack(normals)[which, rows]
    albedo = np.asarray(albedos)[which]
    shading = scene.ambient + np.maximum(0.0, normal @ np.asarray(scene.light))
    shadow = np.zeros(npx, bool)
    if scene.lamps or scene.texture is not None:
        point = origin + t[:, None] * d
        if scene.texture is not None:
            albedo = albedo * _background_tone(scene.texture, point, which, -fh)[:, None]
        for lamp in scene.lamps:
            term, blocked = _lamp_light(lamp, point, normal, which, scene.objects)
            shading = shading + term
            shadow |= blocked
    depth = t * (d @ forward)
    inst = np.where(which >= 2, which - 1, 0)
    shape_idx = np.array([-1] + [SHAPES.index(o.shape) for o in scene.objects])
    colour_idx = np.array([-1] + [COLOURS.index(o.colour) for o in scene.objects])
    rgb = np.clip(np.rint(albedo * shading[:, None] * 255), 0, 255)
    hw = (size, size)
    return Render(
        rgb=rgb.reshape(*hw, 3).astype(np.uint8),
        depth=depth.reshape(hw).astype(np.float32),
        inv_depth=(1.0 / depth).reshape(hw).astype(np.float32),
        foreground=(inst > 0).reshape(hw),
        instances=inst.reshape(hw).astype(np.int16),
        classes=shape_idx[inst].reshape(hw).astype(np.int16),
        colours=colour_idx[inst].reshape(hw).astype(np.int16),
        shading=shading.reshape(hw).astype(np.float32),
        albedo=albedo.reshape(*hw, 3).astype(np.float32),
        normals=normal.reshape(*hw, 3).astype(np.float32),
        shadow=shadow.reshape(hw),
        caption=scene.caption(),
    )


def render_many(n: int, seed: int, size: int = 64, start: int = 0, max_objects: int = 3,
                fields: Sequence[str] | None = None, world: WorldConfig | str = V1
                ) -> dict[str, np.ndarray | list[str]]:
    """Stacked renders of scenes ``scene_for(seed, start .. start + n - 1, max_objects, world)``.

    ``fields`` keeps only some maps (default: all of :data:`FIELDS`; :data:`EXTRA_FIELDS` on
    request), because 20,000 scenes of every float map take gigabytes while a training set
    usually needs two or three of them.
    """
    world = world_config(world)
    keep = FIELDS if fields is None else tuple(fields)
    unknown = set(keep) - set(FIELDS) - set(EXTRA_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; choose from {FIELDS + EXTRA_FIELDS}")
    out: dict[str, list] = {k: [] for k in keep}
    captions: list[str] = []
    for i in range(start, start + n):
        r = render(scene_for(seed, i, max_objects, world), size)
        for k in keep:
            out[k].append(getattr(r, k))
        captions.append(r.caption)
    result: dict[str, np.ndarray | list[str]] = {
        k: np.stack(v) if v else np.zeros((0, size, size), np.float32) for k, v in out.items()}
    result["captions"] = captions
    return result
