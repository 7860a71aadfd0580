"""The toy world's articulated figure: a capsule body whose 18 OpenPose keypoints are known exactly.

The figure is built in its own frame (metres; +x is the figure's own left, +y up, +z the way it faces), from a
`FigurePose` of joint angles, then placed on the floor. Keypoints follow the OpenPose COCO-18 order
(`preprocessors.openpose.BODY_PARTS`; "right" is the figure's own right) and sit where OpenPose puts them: joint
centres inside the limbs, the neck halfway between the shoulders, and nose, eyes and ears on the surface of the
head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controlkit.demo.toyworld.render import Camera
from controlkit.demo.toyworld.solids import Capsule, Solid, Sphere, rotation_y, unit
from preprocessors.openpose import BODY_PARTS

FACE_KEYPOINTS = ("nose", "right_eye", "left_eye", "right_ear", "left_ear")
#: What each action is called in captions.
ACTIONS = {"standing": "standing", "walking": "walking", "raised_arms": "with raised arms"}

# Body measurements (metres) of a figure about 1.8 m tall.
SPINE, SHOULDER_HALF, HIP_HALF, NECK = 0.52, 0.18, 0.095, 0.2
UPPER_ARM, FOREARM, THIGH, SHIN, FOOT = 0.3, 0.27, 0.45, 0.43, 0.13
HEAD_RADIUS, ANKLE_HEIGHT = 0.115, 0.08
RADII = {"torso": 0.13, "shoulders": 0.065, "hips": 0.085, "neck": 0.05, "upper_arm": 0.05, "forearm": 0.042,
         "thigh": 0.075, "shin": 0.058, "foot": 0.045}  # fmt: skip
# Directions from the head's centre to the face keypoints, in the head's frame (left, up, forward).
FACE_DIRECTIONS = {"nose": (0.0, -0.1, 1.0), "right_eye": (-0.45, 0.25, 1.0), "left_eye": (0.45, 0.25, 1.0),
                   "right_ear": (-1.0, 0.05, -0.1), "left_ear": (1.0, 0.05, -0.1)}  # fmt: skip
# A face keypoint counts as visible while its outward direction is no more than this far behind the silhouette
# (cosine to the viewer); ears stay visible in a frontal view, as OpenPose usually finds both.
FACE_VISIBLE_COSINE = {"nose": 0.1, "right_eye": 0.05, "left_eye": 0.05, "right_ear": -0.35, "left_ear": -0.35}


@dataclass(frozen=True)
class FigurePose:
    """Joint angles in radians; pairs are (left, right).

    arm_raise: 0 hangs down, pi/2 points sideways, pi straight up. arm_forward: swings the arm forwards.
    elbow: bend towards `elbow_target` ("forward" or "head"). hip_forward: swings the thigh forwards (negative:
    backwards). hip_out: spreads the legs. knee: bend (the shin folds backwards). lean: torso forwards;
    side_lean: torso to the figure's left. head_turn: to the figure's left; head_tilt: chin up.
    """

    action: str
    arm_raise: tuple[float, float]
    arm_forward: tuple[float, float]
    elbow: tuple[float, float]
    elbow_target: str
    hip_forward: tuple[float, float]
    hip_out: tuple[float, float]
    knee: tuple[float, float]
    lean: float = 0.0
    side_lean: float = 0.0
    head_turn: float = 0.0
    head_tilt: float = 0.0


def sample_pose(rng: np.random.Generator, action: str | None = None) -> FigurePose:
    """A random pose of `action` (one of `ACTIONS`; random if None)."""
    action = action or str(rng.choice(list(ACTIONS)))
    pair = lambda low, high: (float(rng.uniform(low, high)), float(rng.uniform(low, high)))  # noqa: E731
    common = dict(
        lean=float(rng.uniform(-0.1, 0.15)), side_lean=float(rng.uniform(-0.08, 0.08)),
        head_turn=float(rng.uniform(-0.4, 0.4)), head_tilt=float(rng.uniform(-0.2, 0.2)),
    )  # fmt: skip
    if action == "walking":
        stride = float(rng.uniform(0.25, 0.55))
        lead = 1.0 if rng.random() < 0.5 else -1.0  # +1: the left leg is in front
        hips = (lead * stride, -lead * stride * 0.8)
        swing = float(rng.uniform(0.6, 1.2))
        front, back = float(rng.uniform(0.0, 0.2)), float(rng.uniform(0.2, 0.7))
        return FigurePose(
            action, pair(0.05, 0.25), (-hips[0] * swing, -hips[1] * swing), pair(0.1, 0.8), "forward",
            hips, pair(0.0, 0.08), (front, back) if lead > 0 else (back, front), **common,
        )  # fmt: skip
    if action == "raised_arms":
        return FigurePose(
            action, pair(2.2, 3.0), pair(-0.3, 0.3), pair(0.0, 0.8), "head",
            pair(-0.1, 0.15), pair(0.0, 0.35), pair(0.0, 0.15), **common,
        )  # fmt: skip
    if action != "standing":
        raise ValueError(f"`action` must be one of {sorted(ACTIONS)}, got {action!r}")
    return FigurePose(
        action, pair(0.05, 1.5), pair(-0.2, 0.6), pair(0.0, 1.4), "forward",
        pair(-0.1, 0.15), pair(0.0, 0.15), pair(0.0, 0.15), **common,
    )  # fmt: skip


def _turn_towards(vector: np.ndarray, target: np.ndarray, angle: float) -> np.ndarray:
    """Rotate unit `vector` by `angle` in the plane it spans with `target`, towards `target`."""
    across = target - vector * float(vector @ target)
    if np.linalg.norm(across) < 1e-9:  # target parallel to vector: any perpendicular will do
        across = np.cross(vector, [1.0, 0.0, 0.0])
    return np.cos(angle) * vector + np.sin(angle) * unit(across)


def _limb_direction(sideways: float, raise_angle: float, forward_angle: float) -> np.ndarray:
    """Unit direction of an arm or thigh hanging down, raised `raise_angle` sideways (sideways = +1 to the
    figure's left, -1 to its right) and swung `forward_angle` forwards."""
    return np.array([
        sideways * np.sin(raise_angle),
        -np.cos(raise_angle) * np.cos(forward_angle),
        np.cos(raise_angle) * np.sin(forward_angle),
    ])  # fmt: skip


@dataclass(frozen=True)
class Figure:
    """A placed figure: its solids, keypoints (18, 3) in world space, and for the face keypoints their outward
    directions (world, unit), used to decide which ones face the camera."""

    solids: list[Solid]
    joints: np.ndarray
    face_outward: dict[str, np.ndarray]
    position: np.ndarray
    yaw: float
    top: float  # height of the figure's highest point (head or raised hands) above the floor


def build_figure(pose: FigurePose, position, yaw: float, *, instance: int, albedo: np.ndarray) -> Figure:
    """Place a figure in `pose` with its feet on the floor at `position` (x, 0, z), facing the world
    direction (sin yaw, 0, cos yaw)."""
    up, left, forward = np.eye(3)[1], np.eye(3)[0], np.eye(3)[2]
    spine = unit(np.array([np.sin(pose.side_lean), np.cos(pose.lean) * np.cos(pose.side_lean), np.sin(pose.lean)]))
    neck = spine * SPINE
    across = unit(np.cross(spine, forward))  # the figure's left, square to the spine
    joints: dict[str, np.ndarray] = {"neck": neck}
    limbs: list[tuple[str, str, str]] = []  # (from joint, to joint, radius key)
    for side, sign in (("left", 1.0), ("right", -1.0)):
        arm = 0 if side == "left" else 1
        shoulder = neck + sign * SHOULDER_HALF * across
        upper = _limb_direction(sign, pose.arm_raise[arm], pose.arm_forward[arm])
        elbow = shoulder + UPPER_ARM * upper
        target = forward if pose.elbow_target == "forward" else unit(up - sign * left)
        wrist = elbow + FOREARM * _turn_towards(upper, target, pose.elbow[arm])
        hip = sign * HIP_HALF * left
        thigh = _limb_direction(sign, pose.hip_out[arm], pose.hip_forward[arm])
        knee = hip + THIGH * thigh
        ankle = knee + SHIN * _turn_towards(thigh, -forward, pose.knee[arm])
        joints.update({f"{side}_shoulder": shoulder, f"{side}_elbow": elbow, f"{side}_wrist": wrist,
                       f"{side}_hip": hip, f"{side}_knee": knee, f"{side}_ankle": ankle,
                       f"{side}_toe": ankle + FOOT * unit(forward - 0.3 * up)})  # fmt: skip
        limbs += [(f"{side}_shoulder", f"{side}_elbow", "upper_arm"), (f"{side}_elbow", f"{side}_wrist", "forearm"),
                  (f"{side}_hip", f"{side}_knee", "thigh"), (f"{side}_knee", f"{side}_ankle", "shin"),
                  (f"{side}_ankle", f"{side}_toe", "foot")]  # fmt: skip
    head_turn = rotation_y(pose.head_turn)
    head_forward = _turn_towards(head_turn @ forward, up, pose.head_tilt)
    head_left = unit(np.cross(spine, head_forward))
    head_up = np.cross(head_forward, head_left)
    head = neck + NECK * spine
    outward = {name: unit(np.array(d) @ np.stack([head_left, head_up, head_forward])) for name, d in
               FACE_DIRECTIONS.items()}  # fmt: skip
    joints.update({name: head + HEAD_RADIUS * direction for name, direction in outward.items()})
    joints["head"], joints["pelvis"] = head, np.zeros(3)
    limbs += [("pelvis", "neck", "torso"), ("left_shoulder", "right_shoulder", "shoulders"),
              ("left_hip", "right_hip", "hips"), ("neck", "head", "neck")]  # fmt: skip

    turn = rotation_y(yaw)
    lift = ANKLE_HEIGHT - min(joints["left_ankle"][1], joints["right_ankle"][1])
    offset = np.array([position[0], lift, position[2]], dtype=np.float64)
    world = {name: turn @ point + offset for name, point in joints.items()}
    solids: list[Solid] = [Sphere(instance, albedo, world["head"], HEAD_RADIUS)]
    solids += [Capsule(instance, albedo, world[a], world[b], RADII[kind]) for a, b, kind in limbs]
    tops = [world["head"][1] + HEAD_RADIUS] + [max(world[a][1], world[b][1]) + RADII[kind] for a, b, kind in limbs]
    return Figure(
        solids=solids,
        joints=np.stack([world[name] for name in BODY_PARTS]),
        face_outward={name: turn @ direction for name, direction in outward.items()},
        position=offset,
        yaw=float(yaw),
        top=float(max(tops)),
    )


def figure_keypoints(
    figure: Figure, camera: Camera, depth: np.ndarray, masks: np.ndarray, instance: int
) -> np.ndarray:
    """The figure's OpenPose keypoints as seen by `camera`: (18, 3) float32 rows [x, y, visibility].

    x, y are pixels (pixel centres at integer coordinates), kept even where a point is not visible.
    visibility is 1.0 when the point is inside the image, not hidden behind another object (checked against the
    rendered `depth` and `masks`), and, for the face, its side of the head faces the camera; else 0.0.
    """
    xy, point_depth = camera.project(figure.joints)
    height, width = depth.shape
    inside = (xy[:, 0] >= 0) & (xy[:, 0] <= width - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= height - 1)
    visible = inside & (point_depth > 0)
    columns = np.clip(np.rint(xy[:, 0]).astype(int), 0, width - 1)
    rows = np.clip(np.rint(xy[:, 1]).astype(int), 0, height - 1)
    # A joint lies inside its limb, so the surface in front of it is up to a limb radius nearer; anything
    # nearer than that which is not the figure hides it.
    occluded = (masks[rows, columns] != instance) & (depth[rows, columns] < point_depth - RADII["torso"] - 0.05)
    visible &= ~occluded
    for name in FACE_KEYPOINTS:
        index = BODY_PARTS.index(name)
        to_camera = unit(camera.position - figure.joints[index])
        visible[index] &= float(figure.face_outward[name] @ to_camera) > FACE_VISIBLE_COSINE[name]
    return np.concatenate([xy, visible[:, None].astype(np.float64)], axis=1).astype(np.float32)
