"""Ray casting for the toy world: a pinhole camera, analytic solids on a floor in front of a wall, Lambert shading.

World frame: metres, y up, the floor is the plane y = 0 and the wall the plane z = `Backdrop.wall_z` facing +z.
Every pixel gets one ray through its centre; the nearest hit gives the colour, the depth, the normal and the
instance id, so the four outputs agree exactly. Solids are tested only on rays that hit their bounding sphere,
which keeps a 64x64 frame at a few milliseconds in numpy.

Camera space (the frame of `RenderBuffers.normals`): x to the image's right, y to the image's top, z towards the
viewer (out of the screen), so a surface facing the camera has the normal (0, 0, 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from controlkit.demo.toyworld.solids import Solid, dot, unit

#: Shadow rays start this far (metres) off the surface they leave, so they do not hit it again.
SHADOW_OFFSET = 1e-3


@dataclass(frozen=True)
class Camera:
    """Pinhole camera. `focal` is in pixels; pixel (row r, column c) has its centre at image point (c, r)."""

    position: np.ndarray
    right: np.ndarray
    up: np.ndarray
    forward: np.ndarray
    focal: float
    width: int
    height: int

    @classmethod
    def look_at(cls, position, target, *, fov_degrees: float, width: int, height: int) -> Camera:
        """A level camera (no roll) at `position` looking at `target`; `fov_degrees` spans the image width."""
        position = np.asarray(position, dtype=np.float64)
        forward = unit(np.asarray(target, dtype=np.float64) - position)
        right = unit(np.cross(forward, [0.0, 1.0, 0.0]))
        up = np.cross(right, forward)
        focal = (width / 2) / np.tan(np.radians(fov_degrees) / 2)
        return cls(position, right, up, forward, float(focal), width, height)

    def rays(self) -> np.ndarray:
        """Unit ray directions through the pixel centres, (H * W, 3), row-major."""
        xs = (np.arange(self.width) - (self.width - 1) / 2) / self.focal
        ys = ((self.height - 1) / 2 - np.arange(self.height)) / self.focal
        directions = self.forward + xs[None, :, None] * self.right + ys[:, None, None] * self.up
        return unit(directions.reshape(-1, 3))

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points (N, 3) -> pixel coordinates (N, 2) as (x, y) and depth along the view axis (N,)."""
        relative = np.asarray(points, dtype=np.float64) - self.position
        depth = relative @ self.forward
        x = (self.width - 1) / 2 + self.focal * (relative @ self.right) / depth
        y = (self.height - 1) / 2 - self.focal * (relative @ self.up) / depth
        return np.stack([x, y], axis=-1), depth

    def to_camera(self, vectors: np.ndarray) -> np.ndarray:
        """World directions (..., 3) -> camera space (x right, y up, z towards the viewer)."""
        return np.stack([vectors @ self.right, vectors @ self.up, -(vectors @ self.forward)], axis=-1)


@dataclass(frozen=True)
class Backdrop:
    """The floor (y = 0, in front of the wall) and the wall (z = wall_z, above the floor), with albedos (3,)."""

    floor_albedo: np.ndarray
    wall_albedo: np.ndarray
    wall_z: float


@dataclass(frozen=True)
class Lighting:
    """A directional light: `direction` (3,) unit vector pointing towards the light, plus ambient light."""

    direction: np.ndarray
    intensity: float
    ambient: float
    shadow_blur: float = 0.6  # Gaussian sigma of the shadow edge on the backdrop, in pixels at 64 px


@dataclass
class RenderBuffers:
    """image uint8 (H, W, 3) RGB; depth float32 (H, W) metres along the view axis; normals float32 (H, W, 3)
    unit, camera space; masks int32 (H, W), 0 = floor or wall, else the solid's instance id."""

    image: np.ndarray
    depth: np.ndarray
    normals: np.ndarray
    masks: np.ndarray


def _backdrop_hits(origin, directions, backdrop: Backdrop) -> tuple[np.ndarray, np.ndarray]:
    """Ray parameter of the floor-or-wall hit (N,) and whether it is the floor (N,)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor = -origin[1] / directions[:, 1]
        t_wall = (backdrop.wall_z - origin[2]) / directions[:, 2]
    floor_ok = (t_floor > 0) & (origin[2] + t_floor * directions[:, 2] >= backdrop.wall_z)
    wall_ok = (t_wall > 0) & (origin[1] + t_wall * directions[:, 1] >= 0)
    t_floor = np.where(floor_ok, t_floor, np.inf)
    t_wall = np.where(wall_ok, t_wall, np.inf)
    return np.minimum(t_floor, t_wall), t_floor <= t_wall


def _shadowed(points: np.ndarray, normals: np.ndarray, light: np.ndarray, solids: Sequence[Solid]) -> np.ndarray:
    """Whether the path from each point towards the light meets a solid, (N,) bool."""
    origins = points + SHADOW_OFFSET * normals
    directions = np.broadcast_to(light, origins.shape)
    blocked = np.zeros(len(points), dtype=bool)
    for solid in solids:
        index = solid.candidates(origins, directions)
        if index.size:
            hit = np.isfinite(solid.intersect(origins[index], directions[index]))
            blocked[index[hit]] = True
    return blocked


def render(camera: Camera, solids: Sequence[Solid], backdrop: Backdrop, lighting: Lighting) -> RenderBuffers:
    """Ray-cast the solids (a sequence of `Solid`) over the backdrop; one ray per pixel, hard shadow rays whose
    edge is softened on the backdrop."""
    import cv2

    height, width = camera.height, camera.width
    origin, directions = camera.position, camera.rays()
    t_best, owner = _backdrop_hits(origin, directions, backdrop)
    owner = np.where(owner, -1, -2)  # -1 floor, -2 wall, i >= 0 solid index
    for index, solid in enumerate(solids):
        rays = solid.candidates(origin, directions)
        if rays.size == 0:
            continue
        t = solid.intersect(origin, directions[rays])
        closer = t < t_best[rays]
        t_best[rays[closer]] = t[closer]
        owner[rays[closer]] = index
    t_best = np.where(np.isfinite(t_best), t_best, 1e3)  # unreachable with the cameras used, kept finite
    points = origin + directions * t_best[:, None]

    normals = np.zeros_like(points)
    normals[owner == -1] = [0.0, 1.0, 0.0]
    normals[owner == -2] = [0.0, 0.0, 1.0]
    albedos = np.empty_like(points)
    albedos[owner == -1] = backdrop.floor_albedo
    albedos[owner == -2] = backdrop.wall_albedo
    instances = np.zeros(len(points), dtype=np.int32)
    for index, solid in enumerate(solids):
        mine = owner == index
        if mine.any():
            normals[mine] = solid.normal(points[mine])
            albedos[mine] = solid.albedo
            instances[mine] = solid.instance
    # Grazing hits can return the inner side of a surface; a visible normal always faces the viewer.
    facing_away = dot(normals, directions) > 0
    normals[facing_away] *= -1

    lambert = np.maximum(normals @ lighting.direction, 0.0)
    shadow = np.zeros(len(points))
    lit = lambert > 0
    shadow[lit] = _shadowed(points[lit], normals[lit], lighting.direction, solids)
    shadow = shadow.reshape(height, width)
    sigma = lighting.shadow_blur * width / 64
    soft = cv2.GaussianBlur(shadow.astype(np.float32), (0, 0), sigma) if sigma > 0 else shadow
    on_backdrop = instances.reshape(height, width) == 0
    shadow = np.where(on_backdrop, soft, shadow).reshape(-1)

    light = lighting.ambient + lighting.intensity * lambert * (1.0 - shadow)
    image = np.clip(albedos * light[:, None] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    depth = t_best * (directions @ camera.forward)
    return RenderBuffers(
        image=image.reshape(height, width, 3),
        depth=depth.reshape(height, width).astype(np.float32),
        normals=camera.to_camera(normals).reshape(height, width, 3).astype(np.float32),
        masks=instances.reshape(height, width),
    )
