"""The toy world: procedural, seeded scenes with exact ground truth, for training and measuring ControlNets.

Three kinds of sample, each a pure function of a seed (the same seed gives the same sample, bit for bit):

- `render_scene`: one to four solids (sphere, cube, box, cylinder, cone) of named colours on a floor in front of
  a wall, with camera and light variation. Gives the RGB image, metric depth, camera-space normals, instance
  masks and a caption such as "a red sphere and a blue cube on a grey floor with a white background" (objects
  named left to right).
- `render_figure`: an articulated capsule figure (standing, walking or with raised arms), possibly with a few
  solids, plus its 18 OpenPose keypoints, known exactly.
- `render_circles`: the Fill50k exercise: a white circle outline on black (the condition), the filled circle on a
  background (the target), and a caption naming both colours ("a red circle on a blue background").

Condition maps in the reference conventions come from the ground truth: `depth_map` (MiDaS: relative inverse
depth, near is bright) and `normal_map` (the channel order the ControlNet 1.0 normal model was fed). Pose maps
are drawn from `ToyScene.keypoints` by the pose preprocessor's renderer. Caption words are all in
`controlkit.tiny.DEFAULT_WORDS`, so the demo's tokenizer reads each as one token.

    >>> from controlkit.demo.toyworld.world import render_scene, depth_map
    >>> scene = render_scene(7, size=64)
    >>> scene.caption, scene.image.shape, depth_map(scene.depth).dtype
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from controlkit.demo.toyworld.figure import ACTIONS, build_figure, figure_keypoints, sample_pose
from controlkit.demo.toyworld.render import Backdrop, Camera, Lighting, render
from controlkit.demo.toyworld.solids import Box, Cone, Cylinder, Sphere
from controlkit.errors import ConfigError

#: Named colours (sRGB 0..255); the names are the caption words.
COLOURS = {
    "red": (200, 30, 35), "green": (40, 160, 60), "blue": (35, 70, 200), "yellow": (235, 210, 40),
    "orange": (240, 130, 30), "purple": (120, 50, 160), "pink": (240, 130, 180), "cyan": (40, 200, 210),
    "white": (235, 235, 235), "black": (30, 30, 30), "grey": (128, 128, 128), "brown": (120, 75, 40),
}  # fmt: skip
SHAPES = ("sphere", "cube", "box", "cylinder", "cone")
#: An object covering fewer pixels than this fraction of the image is left out of the scene (and the caption).
MIN_VISIBLE_FRACTION = 0.006

Seed = int | Sequence[int]


@dataclass(frozen=True)
class ToyObject:
    """One named thing in a scene: shape ("sphere", "cube", "box", "cylinder", "cone" or "person"), colour word,
    its instance id in `ToyScene.masks`, its base centre on the floor (x, y, z) in metres, height in metres,
    and yaw in radians."""

    shape: str
    colour: str
    instance: int
    position: tuple[float, float, float]
    height: float
    yaw: float = 0.0


@dataclass
class ToyScene:
    """A rendered scene and its ground truth.

    image: uint8 (H, W, 3) RGB. depth: float32 (H, W), metres along the camera's view axis (> 0).
    normals: float32 (H, W, 3) unit vectors in camera space (x right, y up, z towards the viewer).
    masks: int32 (H, W), 0 = floor or wall, k = the object with `instance` k. objects: left to right in the
    image. caption: names every object, the floor and the background. focal: the camera's focal length in
    pixels (the principal point is the image centre, pixel centres at integer coordinates). keypoints: float32
    (18, 3) OpenPose [x, y, visibility] in pixels for figure scenes, else None.
    """

    image: np.ndarray
    depth: np.ndarray
    normals: np.ndarray
    masks: np.ndarray
    objects: list[ToyObject]
    caption: str
    focal: float
    keypoints: np.ndarray | None = None


@dataclass
class CircleSample:
    """A Fill50k-style pair. image: uint8 (H, W, 3), the filled circle on its background (the target).
    outline: uint8 (H, W, 3), the circle's outline, white on black, max(1, H // 64) pixels wide (the condition).
    mask: bool (H, W), the filled disc. centre (x, y) and radius in pixels."""

    image: np.ndarray
    outline: np.ndarray
    mask: np.ndarray
    caption: str
    colour: str
    background: str
    centre: tuple[float, float]
    radius: float


def check_size(size: int) -> int:
    """`size` (the side of the square image) as an int; it must be a multiple of 8 and at least 16."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16 or size % 8:
        raise ConfigError(f"`size` must be a multiple of 8 and at least 16 (got {size!r}); use 64 or 128")
    return int(size)


def _albedo(rng: np.random.Generator, colour: str) -> np.ndarray:
    """The named colour as RGB in [0, 1], jittered by up to 12/255 per channel so that no two objects of one
    colour are identical (the caption still names them right)."""
    jitter = rng.uniform(-12, 12, size=3)
    return np.clip((np.array(COLOURS[colour]) + jitter) / 255.0, 0.0, 1.0)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _names(phrases: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _caption(first: list[str], objects: list[ToyObject], floor: str, wall: str) -> str:
    """'<first phrases>, a red sphere and a blue cube on a grey floor with a white background'."""
    phrases = first + [f"{_article(thing.colour)} {thing.colour} {thing.shape}" for thing in objects]
    return f"{_names(phrases)} on {_article(floor)} {floor} floor with {_article(wall)} {wall} background"


def _sample_object(rng: np.random.Generator, colour: str) -> dict:
    """Shape and size of one solid, as keyword arguments of `_make_solid` without placement."""
    shape = str(rng.choice(SHAPES))
    if shape == "sphere":
        radius = rng.uniform(0.35, 0.65)
        return dict(shape=shape, colour=colour, dims=(radius,), height=2 * radius, footprint=radius)
    if shape in ("cube", "box"):
        half = np.full(3, rng.uniform(0.3, 0.55))
        if shape == "box":  # clearly not a cube: one side 1.7-2.5 times the others
            half = np.full(3, rng.uniform(0.22, 0.4))
            half[rng.integers(3)] *= rng.uniform(1.7, 2.5)
        return dict(shape=shape, colour=colour, dims=tuple(half), height=2 * half[1],
                    footprint=float(np.hypot(half[0], half[2])))  # fmt: skip
    radius = rng.uniform(0.28, 0.5) if shape == "cylinder" else rng.uniform(0.35, 0.6)
    height = rng.uniform(0.6, 1.4) if shape == "cylinder" else rng.uniform(0.8, 1.5)
    return dict(shape=shape, colour=colour, dims=(radius, height), height=height, footprint=radius)


def _make_solid(spec: dict, instance: int, albedo: np.ndarray):
    x, z, yaw, dims = spec["x"], spec["z"], spec["yaw"], spec["dims"]
    if spec["shape"] == "sphere":
        return Sphere(instance, albedo, np.array([x, dims[0], z]), dims[0])
    if spec["shape"] in ("cube", "box"):
        return Box(instance, albedo, np.array([x, dims[1], z]), np.array(dims), yaw)
    kind = Cylinder if spec["shape"] == "cylinder" else Cone
    return kind(instance, albedo, np.array([x, 0.0, z]), dims[0], dims[1])


def _place(rng, specs: list[dict], region: tuple[float, float, float, float], taken: list) -> list[dict]:
    """Give each spec a floor position inside region (x0, x1, z0, z1) whose footprint circle keeps 0.1 m from
    the others and from `taken` [(x, z, radius)]; specs that find no room in 60 tries are dropped."""
    placed = []
    for spec in specs:
        for _ in range(60):
            x, z = rng.uniform(region[0], region[1]), rng.uniform(region[2], region[3])
            if all(np.hypot(x - ox, z - oz) > spec["footprint"] + radius + 0.1 for ox, oz, radius in taken):
                taken.append((x, z, spec["footprint"]))
                placed.append({**spec, "x": float(x), "z": float(z), "yaw": float(rng.uniform(0, np.pi / 2))})
                break
    return placed


def _camera(target, distance: float, size: int, azimuth: float, elevation_degrees: float, fov: float) -> Camera:
    elevation = np.radians(elevation_degrees)
    direction = np.array([np.sin(azimuth) * np.cos(elevation), np.sin(elevation), np.cos(azimuth) * np.cos(elevation)])
    target = np.asarray(target, dtype=np.float64)
    return Camera.look_at(target + distance * direction, target, fov_degrees=fov, width=size, height=size)


def _lighting(rng, azimuth: float) -> Lighting:
    """A light on the camera's side of the wall, 30-70 degrees above the floor."""
    around = azimuth + rng.uniform(-1.75, 1.75)
    elevation = rng.uniform(np.radians(30), np.radians(70))
    direction = np.array([np.sin(around) * np.cos(elevation), np.sin(elevation), np.cos(around) * np.cos(elevation)])
    ambient = rng.uniform(0.25, 0.4)
    return Lighting(direction, intensity=1.0 - ambient + rng.uniform(0.0, 0.15), ambient=ambient)


def _render_objects(rng, camera, specs, extra_solids, backdrop, lighting, first_instance: int):
    """Render specs (ordered left to right, instance ids from `first_instance`) and drop those that end up
    smaller than MIN_VISIBLE_FRACTION of the image, re-rendering without them. Returns (buffers, kept specs)."""
    xs, _ = camera.project(np.array([[s["x"], s["height"] / 2, s["z"]] for s in specs]).reshape(-1, 3))
    specs = [specs[i] for i in np.argsort(xs[:, 0], kind="stable")]
    albedos = [_albedo(rng, s["colour"]) for s in specs]
    while True:
        solids = [_make_solid(s, first_instance + i, a) for i, (s, a) in enumerate(zip(specs, albedos))]
        buffers = render(camera, extra_solids + solids, backdrop, lighting)
        counts = np.bincount(buffers.masks.ravel(), minlength=first_instance + len(specs))
        keep = [counts[first_instance + i] >= MIN_VISIBLE_FRACTION * buffers.masks.size for i in range(len(specs))]
        if all(keep):
            return buffers, specs
        specs = [s for s, k in zip(specs, keep) if k]
        albedos = [a for a, k in zip(albedos, keep) if k]


def _to_objects(specs: list[dict], first_instance: int) -> list[ToyObject]:
    return [
        ToyObject(s["shape"], s["colour"], first_instance + i, (s["x"], 0.0, s["z"]), float(s["height"]), s["yaw"])
        for i, s in enumerate(specs)
    ]


def render_scene(seed: Seed, *, size: int = 64, n_objects: int | None = None) -> ToyScene:
    """A scene of 1-4 solids (or exactly `n_objects`) of distinct colours on a floor in front of a wall.

    Objects too hidden to name (under MIN_VISIBLE_FRACTION of the image) are re-drawn, so every object in the
    caption is visible. Returns a `ToyScene` with keypoints None.
    """
    size = check_size(size)
    if n_objects is not None and not 1 <= n_objects <= 4:
        raise ConfigError(f"`n_objects` must be between 1 and 4 (got {n_objects})")
    rng = np.random.default_rng(seed)
    count = int(n_objects or rng.integers(1, 5))
    while True:
        colours = [str(c) for c in rng.choice(list(COLOURS), size=count + 2, replace=False)]
        floor, wall = colours[:2]
        specs = _place(rng, [_sample_object(rng, c) for c in colours[2:]], (-1.6, 1.6, -1.3, 1.3), [])
        azimuth = rng.uniform(-0.45, 0.45)
        target = (rng.uniform(-0.3, 0.3), 0.35, rng.uniform(-0.3, 0.3))
        camera = _camera(target, rng.uniform(4.0, 5.5), size, azimuth, rng.uniform(15, 40), rng.uniform(40, 55))
        backdrop = Backdrop(_albedo(rng, floor), _albedo(rng, wall), wall_z=rng.uniform(-4.5, -2.6))
        buffers, specs = _render_objects(rng, camera, specs, [], backdrop, _lighting(rng, azimuth), 1)
        if len(specs) == count:
            break
    objects = _to_objects(specs, 1)
    caption = _caption([], objects, floor, wall)
    return ToyScene(buffers.image, buffers.depth, buffers.normals, buffers.masks, objects, caption, camera.focal)


def _frame_figure(rng, figure, size: int, azimuth: float, anywhere: bool = False) -> Camera:
    """A camera on `azimuth` aimed at the middle of the figure, at the nearest distance (found by bisection) at
    which every joint and the top of the head lie inside the image with a random margin of 4-18% of its side.

    `anywhere`: a margin of 4-30% instead, and the camera then moves sideways and up or down (without turning) so
    that the figure lands at a random place in the image, still whole."""
    head = figure.solids[0]
    points = np.vstack([figure.joints, head.centre + [0.0, head.radius, 0.0]])
    target = np.array([figure.position[0], (points[:, 1].min() + points[:, 1].max()) / 2, figure.position[2]])
    elevation, fov, margin = rng.uniform(0, 20), rng.uniform(40, 55), rng.uniform(0.04, 0.18) * size
    if anywhere:
        margin = rng.uniform(0.04, 0.30) * size

    def framed(distance: float) -> Camera | None:
        camera = _camera(target, distance, size, azimuth, elevation, fov)
        xy, depth = camera.project(points)
        fits = depth.min() > 0 and xy.min() >= margin and xy.max() <= size - 1 - margin
        return camera if fits else None

    near, far = 0.5, 3.0
    while framed(far) is None:
        near, far = far, far * 1.5
    for _ in range(8):
        middle = (near + far) / 2
        near, far = (near, middle) if framed(middle) is not None else (middle, far)
    camera = framed(far)
    return _shift_anywhere(rng, camera, points, size) if anywhere else camera


def _shift_anywhere(rng, camera: Camera, points: np.ndarray, size: int) -> Camera:
    """`camera` moved along its right and up axes so that `points` move by a random shift that keeps them inside
    the image (a camera translation shifts a point by focal x offset / depth pixels)."""
    xy, depth = camera.project(points)
    low, high = 1.0 - xy.min(axis=0), size - 2.0 - xy.max(axis=0)
    shift = rng.uniform(np.minimum(low, 0.0), np.maximum(high, 0.0))  # (dx, dy) in pixels
    distance = float(depth.mean())
    for _ in range(6):
        world = shift * distance / camera.focal
        offset = camera.up * world[1] - camera.right * world[0]
        moved = replace(camera, position=camera.position + offset)
        moved_xy, _ = moved.project(points)
        if moved_xy.min() >= 0 and moved_xy.max() <= size - 1:
            return moved
        shift = shift * 0.7
    return camera


def render_figure(seed: Seed, *, size: int = 64, action: str | None = None, anywhere: bool = False) -> ToyScene:
    """A capsule figure (`action` "standing", "walking" or "raised_arms"; random if None) facing within 60
    degrees of the camera, with up to two solids beside or behind it. Returns a `ToyScene` whose `keypoints` are
    the figure's OpenPose keypoints (18, 3); `objects[0]` is the figure (shape "person", instance 1), the
    solids follow left to right.

    The figure fills most of the image's height in its middle; with `anywhere` it is 40-92% of the height at a
    random place (pose data in which the keypoints also say where the figure stands and how large it is)."""
    size = check_size(size)
    rng = np.random.default_rng(seed)
    pose = sample_pose(rng, action)
    colours = [str(c) for c in rng.choice(list(COLOURS), size=5, replace=False)]
    floor, wall, body = colours[:3]
    azimuth = rng.uniform(-0.45, 0.45)
    position = np.array([rng.uniform(-0.5, 0.5), 0.0, rng.uniform(-0.5, 0.5)])
    figure = build_figure(pose, position, azimuth + rng.uniform(-1.05, 1.05), instance=1, albedo=_albedo(rng, body))
    camera = _frame_figure(rng, figure, size, azimuth, anywhere)
    specs = [_sample_object(rng, c) for c in colours[3 : 3 + int(rng.choice(3, p=[0.4, 0.4, 0.2]))]]
    # Objects stand behind the figure or well to its side, so they rarely hide a limb.
    region = (position[0] - 2.2, position[0] + 2.2, position[2] - 2.2, position[2] + 0.3)
    specs = _place(rng, specs, region, [(position[0], position[2], 0.6)])
    wall_z = min([rng.uniform(-4.0, -2.6)] + [s["z"] - s["footprint"] - 0.3 for s in specs])
    backdrop = Backdrop(_albedo(rng, floor), _albedo(rng, wall), wall_z=wall_z)
    buffers, specs = _render_objects(rng, camera, specs, figure.solids, backdrop, _lighting(rng, azimuth), 2)
    keypoints = figure_keypoints(figure, camera, buffers.depth, buffers.masks, instance=1)

    person = ToyObject("person", body, 1, (float(position[0]), 0.0, float(position[2])), figure.top, figure.yaw)
    things = _to_objects(specs, 2)
    caption = _caption([f"{_article(body)} {body} person {ACTIONS[pose.action]}"], things, floor, wall)
    objects = [person] + things
    return ToyScene(
        buffers.image, buffers.depth, buffers.normals, buffers.masks, objects, caption, camera.focal, keypoints
    )


def render_circles(seed: Seed, *, size: int = 64) -> CircleSample:
    """The Fill50k pair: outline (white on black) -> filled circle of one colour on a background of another."""
    import cv2

    size = check_size(size)
    rng = np.random.default_rng(seed)
    colour, background = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    radius = rng.uniform(size / 10, size / 3)
    centre = rng.uniform(radius + 2, size - 3 - radius, size=2)
    shift = 4  # cv2 draws with 1/16 pixel precision from fixed-point coordinates
    point = tuple(int(round(c * 2**shift)) for c in centre)
    fixed_radius = int(round(radius * 2**shift))
    image = np.empty((size, size, 3), np.uint8)
    image[:] = COLOURS[background]
    cv2.circle(image, point, fixed_radius, COLOURS[colour], -1, cv2.LINE_AA, shift)
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, point, fixed_radius, 1, -1, cv2.LINE_8, shift)
    outline = np.zeros((size, size, 3), np.uint8)
    cv2.circle(outline, point, fixed_radius, (255, 255, 255), max(1, size // 64), cv2.LINE_8, shift)
    caption = f"{_article(colour)} {colour} circle on {_article(background)} {background} background"
    return CircleSample(image, outline, mask.astype(bool), caption, colour, background,
                        (float(centre[0]), float(centre[1])), float(radius))  # fmt: skip


def depth_map(depth: np.ndarray) -> np.ndarray:
    """The MiDaS annotator's depth map from metric depth (H, W) > 0: relative inverse depth, min-max normalised,
    near is bright; uint8 (H, W, 3), three equal channels (the depth preprocessor's own mapping)."""
    from preprocessors.depth import depth_to_map

    grey = depth_to_map(1.0 / np.asarray(depth, dtype=np.float64))
    return np.repeat(grey[:, :, None], 3, axis=2)


def pose_json(scene: ToyScene) -> dict:
    """The figure's keypoints as an OpenPose JSON dict (one person; points not visible are 0, 0, 0)."""
    from preprocessors.openpose import empty_pose, flatten_keypoints

    if scene.keypoints is None:
        raise ConfigError("this scene has no figure, so no pose; render it with `render_figure`")
    height, width = scene.masks.shape
    pose = empty_pose(width, height)
    points = np.where(scene.keypoints[:, 2:] > 0, scene.keypoints, 0.0)
    pose["people"] = [{"pose_keypoints_2d": flatten_keypoints(points), "hand_left_keypoints_2d": [],
                       "hand_right_keypoints_2d": [], "face_keypoints_2d": []}]  # fmt: skip
    return pose


def pose_map(scene: ToyScene) -> np.ndarray:
    """The figure's pose drawn as the OpenPose annotator draws it (strokes scaled from the reference's 512 px),
    uint8 (H, W, 3)."""
    from preprocessors.openpose import draw_openpose

    return draw_openpose(pose_json(scene))


def normal_map(normals: np.ndarray, depth: np.ndarray | None = None, *, bg_threshold: float = 0.0) -> np.ndarray:
    """Camera-space unit normals (H, W, 3) -> the normal map the ControlNet 1.0 normal model was fed, uint8.

    Channels, each n * 127.5 + 127.5 (truncated): R = towards the viewer, G = up, B = left. This is the MiDaS
    normal annotator's (x, y, z) = (left, up, front) reversed, as its app feeds `map[:, :, ::-1]`, and the
    default "zyx" order of `preprocessors.normal`: a surface facing the camera is (255, 127, 127), one facing
    left has B > 127, one facing up has G > 127.

    Args:
        normals: (H, W, 3) unit normals, x right, y up, z towards the viewer.
        depth: (H, W) metric depth, needed only with `bg_threshold`.
        bg_threshold: like the annotator's `bg_th`, pixels whose min-max normalised inverse depth is below this
            are drawn facing the camera (0.4 reproduces the normal app's flat background; 0 keeps every normal).
    """
    normals = np.asarray(normals, dtype=np.float64)
    ordered = np.stack([normals[..., 2], normals[..., 1], -normals[..., 0]], axis=-1)
    if bg_threshold > 0:
        if depth is None:
            raise ConfigError("`bg_threshold` needs the `depth` map (far pixels are found from inverse depth)")
        inverse = 1.0 / np.asarray(depth, dtype=np.float64)
        relative = (inverse - inverse.min()) / max(inverse.max() - inverse.min(), 1e-12)
        ordered[relative < bg_threshold] = (1.0, 0.0, 0.0)
    return (ordered * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
