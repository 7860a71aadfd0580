"""A small estimator of depth, normals and body keypoints for toy-world images: how the demo measures its depth,
normal and pose ControlNets.

Controllability re-annotates each generated image with the condition's own annotator (training/metrics.py), but
no monocular depth or normal weights ship offline, and mediapipe's pose model, tuned for photos of people, finds
the toy world's 64-pixel capsule figures in only about half of the clean renders. So the demo re-annotates its
depth, normal and pose images with a network trained here on the renderer's exact ground truth: diffusers'
`UNet2DModel`, used at the fixed timestep 0 as a plain convolutional encoder-decoder, maps a 64 x 64 RGB image in
[-1, 1] to 22 channels: relative inverse depth in [0, 1] (min-max normalised, as `controlkit.demo.toyworld.world.depth_map`
draws it), the camera-space unit normal, and one heatmap per OpenPose body keypoint (a spatial softmax whose peak
is the keypoint). `GeometryAnnotator` turns its prediction into maps in the conventions of the ControlNets'
inputs (`depth_map`, `normal_map`) and into OpenPose keypoints. Its own error on held-out renders, the floor of
the three metrics, is written next to it (metrics.json) and reported by `python -m controlkit.demo.recipe geometry`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

#: The estimator's input side (it is trained on the demo's 64 x 64 renders).
SIDE = 64
#: Body keypoints (OpenPose's 18) and the output channels: inverse depth, normal (3), one heatmap per keypoint.
KEYPOINTS = 18
CHANNELS = 4 + KEYPOINTS
#: Training renders: (toy-world kind, count); held-out renders use another seed.
TRAINING_RENDERS = (("scene", 3000), ("figure", 3000))
HELD_OUT = 64
#: Standard deviation in pixels of the Gaussian each keypoint's heatmap is trained towards.
HEATMAP_SIGMA = 1.5
#: Weight of the heatmaps' cross-entropy (about 3 to 8 nats) against the depth and normal L1 (about 0.05 to 0.5).
HEATMAP_WEIGHT = 0.05


def build_estimator(seed: int = 0) -> Any:
    """The estimator's network with seeded random weights (about 1 M parameters)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=SIDE, in_channels=3, out_channels=CHANNELS, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=16,
    )


def predict(model: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 images -> inverse depth (N, H, W) in [0, 1], unit normals (N, H, W, 3) and body keypoints
    (N, 18, 2) as x, y pixels of the input (pixel centres at integers), all float32."""
    import cv2
    import torch

    count, height, width = images.shape[:3]
    if (height, width) != (SIDE, SIDE):
        images = np.stack([cv2.resize(image, (SIDE, SIDE), interpolation=cv2.INTER_AREA) for image in images])
    parameter = next(model.parameters())
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).to(parameter.device, parameter.dtype) / 127.5 - 1.0
    with torch.inference_mode():
        output = model(pixels, 0).sample.float()
    depth = output[:, 0].clamp(0, 1)
    normals = torch.nn.functional.normalize(output[:, 1:4], dim=1).permute(0, 2, 3, 1)
    keypoints = heatmap_peaks(output[:, 4:]) * torch.tensor([width / SIDE, height / SIDE])
    depth, normals = depth.cpu().numpy(), normals.cpu().numpy()
    if (height, width) != (SIDE, SIDE):
        depth = np.stack([cv2.resize(d, (width, height), interpolation=cv2.INTER_LINEAR) for d in depth])
        normals = np.stack([cv2.resize(n, (width, height), interpolation=cv2.INTER_LINEAR) for n in normals])
    return depth, normals, keypoints.numpy().astype(np.float32)


def heatmap_peaks(logits: Any) -> Any:
    """(N, K, S, S) heatmap logits -> (N, K, 2) x, y: the softmax-weighted mean over the 3 x 3 pixels around each
    map's highest logit (sub-pixel, and robust to a second, weaker peak elsewhere)."""
    import torch

    count, keypoints, side, _ = logits.shape
    flat = logits.flatten(2)
    peak = flat.argmax(dim=2)
    rows, columns = peak // side, peak % side
    offsets = torch.arange(-1, 2)
    near_rows = (rows[..., None, None] + offsets[:, None]).clamp(0, side - 1).expand(count, keypoints, 3, 3)
    near_columns = (columns[..., None, None] + offsets[None, :]).clamp(0, side - 1).expand(count, keypoints, 3, 3)
    near = torch.gather(flat, 2, (near_rows * side + near_columns).flatten(2)).softmax(dim=2)
    x = (near * near_columns.flatten(2).float()).sum(dim=2)
    y = (near * near_rows.flatten(2).float()).sum(dim=2)
    return torch.stack([x, y], dim=2)


class GeometryAnnotator:
    """A depth, normal or pose annotator for toy-world images: `annotator(image) -> (H, W, 3) uint8` map, drawn as
    the demo ControlNets' inputs are (near bright; normals in `normal_map`'s channel order; OpenPose's body drawing),
    and for pose `annotator.keypoints(image)` -> an OpenPose JSON dict of one person with all 18 body keypoints.

    Args:
        model: the estimator (`load_estimator` or `build_estimator`).
        kind: "depth", "normal" or "pose".
    """

    def __init__(self, model: Any, kind: str):
        if kind not in ("depth", "normal", "pose"):
            raise ValueError(f"`kind` must be 'depth', 'normal' or 'pose', got {kind!r}")
        self.model, self.kind = model.eval(), kind

    def __call__(self, image: Any) -> np.ndarray:
        from controlkit.demo.toyworld.world import normal_map
        from controlkit.image import load_image
        from preprocessors.openpose import draw_openpose

        pixels = load_image(image)
        if self.kind == "pose":
            return draw_openpose(self.keypoints(pixels))
        depth, normals, _ = predict(self.model, pixels[None])
        if self.kind == "normal":
            return normal_map(normals[0])
        grey = (depth[0] * 255.0).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)

    def keypoints(self, image: Any) -> dict[str, Any]:
        """The 18 body keypoints of the figure in `image` as an OpenPose JSON dict (confidence 1 each)."""
        from controlkit.image import load_image
        from preprocessors.openpose import empty_pose, flatten_keypoints

        pixels = load_image(image)
        _, _, keypoints = predict(self.model, pixels[None])
        pose = empty_pose(pixels.shape[1], pixels.shape[0])
        points = np.concatenate([keypoints[0], np.ones((KEYPOINTS, 1), np.float32)], axis=1)
        pose["people"] = [{"pose_keypoints_2d": flatten_keypoints(points), "hand_left_keypoints_2d": [],
                           "hand_right_keypoints_2d": [], "face_keypoints_2d": []}]  # fmt: skip
        return pose


def load_estimator(folder: str | Path) -> Any:
    """The estimator saved in `folder`, in float32 on the CPU."""
    import torch
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()


def render_truth(kind: str, seeds: list[Any]) -> dict[str, np.ndarray]:
    """Training targets of `kind` renders: "images" (N, 64, 64, 3) uint8, "depth" (N, 64, 64) relative inverse
    depth, "normals" (N, 64, 64, 3), "heatmaps" (N, 18, 64, 64) Gaussians summing to 1 and "visible" (N, 18)
    0/1 (all 0 for scenes, which have no figure), float32."""
    from controlkit.demo.toyworld.world import render_figure, render_scene

    render = render_scene if kind == "scene" else render_figure
    columns: dict[str, list[np.ndarray]] = {"images": [], "depth": [], "normals": [], "heatmaps": [], "visible": []}
    grid = np.arange(SIDE, dtype=np.float32)
    for seed in seeds:
        sample = render(seed, size=SIDE)
        inverse = 1.0 / sample.depth.astype(np.float64)
        columns["depth"].append(((inverse - inverse.min()) / max(inverse.max() - inverse.min(), 1e-12)))
        columns["images"].append(sample.image)
        columns["normals"].append(sample.normals)
        points = sample.keypoints if sample.keypoints is not None else np.zeros((KEYPOINTS, 3), np.float32)
        x = np.exp(-((grid[None, :] - points[:, :1]) ** 2) / (2 * HEATMAP_SIGMA**2))
        y = np.exp(-((grid[None, :] - points[:, 1:2]) ** 2) / (2 * HEATMAP_SIGMA**2))
        heatmaps = y[:, :, None] * x[:, None, :]
        columns["heatmaps"].append(heatmaps / np.maximum(heatmaps.sum(axis=(1, 2), keepdims=True), 1e-12))
        columns["visible"].append((points[:, 2] > 0).astype(np.float32))
    return {name: np.stack(values).astype(np.float32) if name != "images" else np.stack(values)
            for name, values in columns.items()}


def estimator_loss(output: Any, batch: dict[str, Any]) -> Any:
    """L1 of inverse depth and normal vector per pixel, plus the heatmaps' cross-entropy over pixels against their
    Gaussians, for visible keypoints only (weighted by `HEATMAP_WEIGHT`)."""
    geometry = (output[:, :4] - batch["geometry"]).abs().mean()
    log_probabilities = output[:, 4:].flatten(2).log_softmax(dim=2)
    cross_entropy = -(batch["heatmaps"].flatten(2) * log_probabilities).sum(dim=2)
    visible = batch["visible"]
    heatmaps = (cross_entropy * visible).sum() / visible.sum().clamp(min=1.0)
    return geometry + HEATMAP_WEIGHT * heatmaps


def train_geometry(output: str | Path = "runs/demo/geometry", *, steps: int = 2000, batch_size: int = 16,
                   learning_rate: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Train the estimator on fresh renders (seed 0) and measure it on held-out ones (seed 1).

    Returns the held-out errors (also in OUTPUT/metrics.json): depth RMSE in grey levels, normal angle in degrees
    and keypoint distance over the image diagonal, each as training/metrics.py computes it against ground truth.
    """
    import torch
    from diffusers.optimization import get_scheduler

    start = time.perf_counter()
    parts = [render_truth(kind, [(seed, index) for index in range(count)]) for kind, count in TRAINING_RENDERS]
    truth = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    pixels = torch.from_numpy(truth["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    geometry = torch.cat([torch.from_numpy(truth["depth"])[:, None],
                          torch.from_numpy(truth["normals"]).permute(0, 3, 1, 2)], dim=1)
    heatmaps, visible = torch.from_numpy(truth["heatmaps"]), torch.from_numpy(truth["visible"])
    model = build_estimator(seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=100, num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        batch = {"geometry": geometry[rows], "heatmaps": heatmaps[rows], "visible": visible[rows]}
        loss = estimator_loss(model(pixels[rows], 0).sample, batch)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 200 == 0:
            print(f"geometry step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    model.eval()
    errors = held_out_errors(model, seed + 1)
    errors["train_seconds"] = round(time.perf_counter() - start, 1)
    Path(output).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    (Path(output) / "metrics.json").write_text(json.dumps(errors, indent=2))
    print(f"geometry estimator -> {output}: {errors}")
    return errors


def held_out_errors(model: Any, seed: int) -> dict[str, float]:
    """The estimator against the ground truth of new renders: mean depth RMSE, normal angle (scenes) and keypoint
    distance (figures)."""
    from controlkit.demo.toyworld.world import depth_map, normal_map, pose_json, render_figure, render_scene
    from training.metrics import angular_error, keypoint_distance, rmse

    scenes = [render_scene((seed, index), size=SIDE) for index in range(HELD_OUT)]
    figures = [render_figure((seed, index), size=SIDE) for index in range(HELD_OUT)]
    depth, normal, pose = (GeometryAnnotator(model, kind) for kind in ("depth", "normal", "pose"))
    return {
        "depth_rmse": round(float(np.mean([rmse(depth(s.image), depth_map(s.depth)) for s in scenes])), 2),
        "normal_angle": round(float(np.mean([angular_error(normal(s.image), normal_map(s.normals))
                                             for s in scenes])), 2),
        "keypoint_distance": round(float(np.mean([keypoint_distance(pose.keypoints(f.image), pose_json(f))[0]
                                                  for f in figures])), 4),
    }
