"""Analytic solids of the toy world, intersected with many rays at once in numpy.

Each solid gives a bounding sphere (rays that miss it are never tested exactly), the ray parameter of the first
hit along unit directions (inf where missed), and outward unit normals at surface points. Origins are one point
(3,) for camera rays or one per ray (N, 3) for shadow rays. World frame: metres, y up, the floor at y = 0.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np

#: Smallest ray parameter counted as a hit (metres); shadow rays start off the surface they leave.
HIT_EPSILON = 1e-6


def dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot products over the last axis: (N, 3) . (3,) -> (N,), (N, 3) . (N, 3) -> (N,), (3,) . (3,) -> ()."""
    if a.ndim == 1 or b.ndim == 1:
        return a @ b if b.ndim == 1 else b @ a  # a matrix-vector product: much faster than multiply-and-sum
    return np.einsum("...i,...i->...", a, b)


def unit(vectors: np.ndarray) -> np.ndarray:
    """Vectors (..., 3) scaled to unit length (zero vectors stay zero)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def rotation_y(angle: float) -> np.ndarray:
    """(3, 3) rotation about the world's up axis by `angle` radians (right-handed: +x turns towards -z)."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _sphere_hit(origin: np.ndarray, directions: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """Ray parameter of the first hit in front of the origin, inf where missed. Directions are unit vectors."""
    offset = origin - centre
    half_b = dot(offset, directions)
    discriminant = half_b * half_b - (dot(offset, offset) - radius * radius)
    root = np.sqrt(np.maximum(discriminant, 0.0))
    near, far = -half_b - root, -half_b + root
    t = np.where(near > HIT_EPSILON, near, np.where(far > HIT_EPSILON, far, np.inf))
    return np.where(discriminant >= 0, t, np.inf)


def _nearest_valid(*candidates: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Per ray, the smallest t among (t, valid) pairs whose valid flag is set and t > HIT_EPSILON."""
    best = None
    for t, valid in candidates:
        t = np.where(valid & (t > HIT_EPSILON), t, np.inf)
        best = t if best is None else np.minimum(best, t)
    return best


def _quadratic_roots(a, half_b, c):
    """Both roots of a t^2 + 2 half_b t + c = 0 (nan where there are none; a may be ~0 for grazing rays)."""
    discriminant = half_b * half_b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.sqrt(np.where(discriminant >= 0, discriminant, np.nan))
        return (-half_b - root) / a, (-half_b + root) / a


@dataclass(frozen=True)
class Solid(abc.ABC):
    """Base of the analytic solids: the instance id written to the mask and the albedo (3,) RGB in [0, 1].

    Subclasses give a bounding sphere, the first hit along unit rays (t, inf where missed) and the outward
    unit normal at surface points; `origin` is one point (3,) or one per ray (N, 3).
    """

    instance: int
    albedo: np.ndarray

    @abc.abstractmethod
    def bound(self) -> tuple[np.ndarray, float]:
        """Centre (3,) and radius of a sphere that contains the solid."""

    @abc.abstractmethod
    def intersect(self, origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Ray parameter (N,) of the first hit in front of the origin along unit `directions` (N, 3)."""

    @abc.abstractmethod
    def normal(self, points: np.ndarray) -> np.ndarray:
        """Outward unit normals (N, 3) at surface points (N, 3)."""

    def candidates(self, origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Indices of the rays that reach the bounding sphere (the only ones worth an exact test)."""
        centre, radius = self.bound()
        offset = origin - centre
        half_b = dot(offset, directions)
        discriminant = half_b * half_b - (dot(offset, offset) - radius * radius)
        far = -half_b + np.sqrt(np.maximum(discriminant, 0.0))
        return np.flatnonzero((discriminant >= 0) & (far > 0))


@dataclass(frozen=True)
class Sphere(Solid):
    centre: np.ndarray
    radius: float

    def bound(self):
        return self.centre, self.radius

    def intersect(self, origin, directions):
        return _sphere_hit(origin, directions, self.centre, self.radius)

    def normal(self, points):
        return unit(points - self.centre)


@dataclass(frozen=True)
class Box(Solid):
    """A box with half extents (3,) around `centre`, turned by `yaw` radians about the vertical axis."""

    centre: np.ndarray
    half_extents: np.ndarray
    yaw: float = 0.0
    to_local: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "to_local", rotation_y(self.yaw).T)

    def bound(self):
        return self.centre, float(np.linalg.norm(self.half_extents))

    def intersect(self, origin, directions):
        local_origin = (origin - self.centre) @ self.to_local.T
        local_directions = directions @ self.to_local.T
        tiny = np.where(local_directions >= 0, 1e-12, -1e-12)
        inverse = 1.0 / np.where(np.abs(local_directions) < 1e-12, tiny, local_directions)
        t1 = (-self.half_extents - local_origin) * inverse
        t2 = (self.half_extents - local_origin) * inverse
        near = np.minimum(t1, t2).max(-1)
        far = np.maximum(t1, t2).min(-1)
        t = np.where(near > HIT_EPSILON, near, far)
        return np.where((far >= near) & (far > HIT_EPSILON), t, np.inf)

    def normal(self, points):
        local = (points - self.centre) @ self.to_local.T
        axis = np.argmax(np.abs(local) / self.half_extents, axis=-1)
        rows = np.arange(len(local))
        local_normal = np.zeros_like(local)
        local_normal[rows, axis] = np.sign(local[rows, axis])
        return local_normal @ self.to_local


@dataclass(frozen=True)
class Cylinder(Solid):
    """Upright cylinder standing on `base` (its bottom centre)."""

    base: np.ndarray
    radius: float
    height: float

    def bound(self):
        return self.base + [0.0, self.height / 2, 0.0], float(np.hypot(self.radius, self.height / 2))

    def intersect(self, origin, directions):
        o = np.broadcast_to(origin - self.base, directions.shape)
        ox, oy, oz = o[:, 0], o[:, 1], o[:, 2]
        dx, dy, dz = directions[:, 0], directions[:, 1], directions[:, 2]
        near, far = _quadratic_roots(dx * dx + dz * dz, ox * dx + oz * dz, ox * ox + oz * oz - self.radius**2)
        candidates = []
        for t in (near, far):
            y = oy + t * dy
            candidates.append((t, (y >= 0) & (y <= self.height)))
        with np.errstate(divide="ignore", invalid="ignore"):
            for level in (0.0, self.height):
                t = (level - oy) / dy
                candidates.append((t, (ox + t * dx) ** 2 + (oz + t * dz) ** 2 <= self.radius**2))
        return _nearest_valid(*candidates)

    def normal(self, points):
        local = points - self.base
        radial = np.hypot(local[:, 0], local[:, 2])
        side = np.abs(radial - self.radius)
        on_top = np.abs(local[:, 1] - self.height) < side
        on_bottom = np.abs(local[:, 1]) < side
        normals = unit(np.stack([local[:, 0], np.zeros(len(local)), local[:, 2]], axis=-1))
        normals[on_top] = [0.0, 1.0, 0.0]
        normals[on_bottom] = [0.0, -1.0, 0.0]
        return normals


@dataclass(frozen=True)
class Cone(Solid):
    """Upright cone with its base disc (centre `base`, `radius`) on the floor and the apex `height` above."""

    base: np.ndarray
    radius: float
    height: float

    def bound(self):
        return self.base + [0.0, self.height / 2, 0.0], float(np.hypot(self.radius, self.height / 2))

    def intersect(self, origin, directions):
        o = np.broadcast_to(origin - self.base, directions.shape)
        ox, oy, oz = o[:, 0], o[:, 1], o[:, 2]
        dx, dy, dz = directions[:, 0], directions[:, 1], directions[:, 2]
        slope2 = (self.radius / self.height) ** 2
        below_apex = self.height - oy  # distance below the apex along -y, the cone's own axis
        a = dx * dx + dz * dz - slope2 * dy * dy
        half_b = ox * dx + oz * dz + slope2 * below_apex * dy
        c = ox * ox + oz * oz - slope2 * below_apex * below_apex
        candidates = []
        for t in _quadratic_roots(a, half_b, c):
            y = oy + t * dy
            candidates.append((t, (y >= 0) & (y <= self.height)))
        with np.errstate(divide="ignore", invalid="ignore"):
            t = -oy / dy
            candidates.append((t, (ox + t * dx) ** 2 + (oz + t * dz) ** 2 <= self.radius**2))
        return _nearest_valid(*candidates)

    def normal(self, points):
        local = points - self.base
        slope = self.radius / self.height
        below_apex = self.height - local[:, 1]
        radial = np.hypot(local[:, 0], local[:, 2])
        # Gradient of x^2 + z^2 - slope^2 (h - y)^2: the outward normal tilts upwards by the cone's slope.
        normals = unit(np.stack([local[:, 0], slope * slope * below_apex, local[:, 2]], axis=-1))
        on_base = np.abs(local[:, 1]) < np.abs(radial - slope * below_apex)
        normals[on_base] = [0.0, -1.0, 0.0]
        return normals


@dataclass(frozen=True)
class Capsule(Solid):
    """All points within `radius` of the segment start-end (a limb of the articulated figure)."""

    start: np.ndarray
    end: np.ndarray
    radius: float

    def bound(self):
        return (self.start + self.end) / 2, float(np.linalg.norm(self.end - self.start) / 2 + self.radius)

    def intersect(self, origin, directions):
        axis = self.end - self.start
        offset = origin - self.start
        axis2 = dot(axis, axis)
        axis_dir = directions @ axis
        axis_off = dot(offset, axis)
        # The side is the infinite cylinder around the axis, kept where the hit projects inside the segment;
        # the two end spheres cover everything else.
        a = axis2 - axis_dir * axis_dir
        half_b = axis2 * dot(offset, directions) - axis_off * axis_dir
        c = axis2 * dot(offset, offset) - axis_off * axis_off - self.radius**2 * axis2
        near, _ = _quadratic_roots(a, half_b, c)
        along = axis_off + near * axis_dir
        side = _nearest_valid((near, (along > 0) & (along < axis2)))
        ends = np.minimum(
            _sphere_hit(origin, directions, self.start, self.radius),
            _sphere_hit(origin, directions, self.end, self.radius),
        )
        return np.minimum(side, ends)

    def normal(self, points):
        axis = self.end - self.start
        along = np.clip(((points - self.start) @ axis) / dot(axis, axis), 0.0, 1.0)
        return unit(points - self.start - along[:, None] * axis)
