"""A small depth-and-normal estimator for toy-world images: how the demo measures its depth and normal ControlNets.

Controllability re-annotates each generated image with the condition's own annotator (training/metrics.py), but
no monocular depth or normal weights ship offline. So the demo's depth and normal images are re-annotated by a
network trained here on the renderer's exact ground truth: diffusers' `UNet2DModel`, used at the fixed timestep 0
as a plain convolutional encoder-decoder, maps a 64 x 64 RGB image in [-1, 1] to four channels: relative inverse
depth in [0, 1] (min-max normalised, as `training.toyworld.depth_map` draws it) and the camera-space unit
normal. `GeometryAnnotator` turns its prediction into maps in the conventions of the ControlNets' inputs
(`depth_map`, `normal_map`). Its own error on held-out renders, the floor of both metrics, is written next to it
(metrics.json) and reported by `python -m training.demo_recipe geometry`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    pass

#: The estimator's input side (it is trained on the demo's 64 x 64 renders).
SIDE = 64
#: Training renders: (toy-world kind, count); held-out renders use another seed.
TRAINING_RENDERS = (("scene", 3000), ("figure", 1000))
HELD_OUT = 64


def build_estimator(seed: int = 0) -> Any:
    """The estimator's network with seeded random weights (about 1 M parameters)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=SIDE, in_channels=3, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=16,
    )


def predict(model: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 images -> (inverse depth (N, H, W) in [0, 1], unit normals (N, H, W, 3)), float32."""
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
    normals = torch.nn.functional.normalize(output[:, 1:], dim=1).permute(0, 2, 3, 1)
    depth, normals = depth.cpu().numpy(), normals.cpu().numpy()
    if (height, width) != (SIDE, SIDE):
        depth = np.stack([cv2.resize(d, (width, height), interpolation=cv2.INTER_LINEAR) for d in depth])
        normals = np.stack([cv2.resize(n, (width, height), interpolation=cv2.INTER_LINEAR) for n in normals])
    return depth, normals


class GeometryAnnotator:
    """A depth or normal annotator for toy-world images: `annotator(image) -> (H, W, 3) uint8` map, drawn as the
    demo ControlNets' inputs are (near bright; normals in `normal_map`'s channel order).

    Args:
        model: the estimator (`load_estimator` or `build_estimator`).
        kind: "depth" or "normal".
    """

    def __init__(self, model: Any, kind: str):
        if kind not in ("depth", "normal"):
            raise ValueError(f"`kind` must be 'depth' or 'normal', got {kind!r}")
        self.model, self.kind = model.eval(), kind

    def __call__(self, image: Any) -> np.ndarray:
        from controlkit.image import load_image
        from training.toyworld import normal_map

        depth, normals = predict(self.model, load_image(image)[None])
        if self.kind == "normal":
            return normal_map(normals[0])
        grey = (depth[0] * 255.0).round().astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)


def load_estimator(folder: str | Path) -> Any:
    """The estimator saved in `folder`, in float32 on the CPU."""
    import torch
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()


def render_truth(kind: str, seeds: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, 64, 64, 3) uint8, relative inverse depth (N, 64, 64) and normals (N, 64, 64, 3), float32."""
    from training.toyworld import render_figure, render_scene

    render = render_scene if kind == "scene" else render_figure
    images, depths, normals = [], [], []
    for seed in seeds:
        sample = render(seed, size=SIDE)
        inverse = 1.0 / sample.depth.astype(np.float64)
        depths.append(((inverse - inverse.min()) / max(inverse.max() - inverse.min(), 1e-12)).astype(np.float32))
        images.append(sample.image)
        normals.append(sample.normals.astype(np.float32))
    return np.stack(images), np.stack(depths), np.stack(normals)


def train_geometry(output: str | Path = "runs/demo/geometry", *, steps: int = 1200, batch_size: int = 16,
                   learning_rate: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Train the estimator on fresh renders (seed 0) and measure it on held-out ones (seed 1).

    Loss: L1 of the inverse depth plus L1 of the normal vector, per pixel. Returns the held-out errors (also in
    OUTPUT/metrics.json): depth RMSE in grey levels and normal angle in degrees, both as training/metrics.py
    computes them against the ground-truth maps.
    """
    import torch

    from diffusers.optimization import get_scheduler

    start = time.perf_counter()
    parts = [render_truth(kind, [(seed, index) for index in range(count)]) for kind, count in TRAINING_RENDERS]
    images, depths, normals = (np.concatenate(arrays) for arrays in zip(*parts))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    targets = torch.cat([torch.from_numpy(depths)[:, None], torch.from_numpy(normals).permute(0, 3, 1, 2)], dim=1)
    model = build_estimator(seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=100, num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        loss = (model(pixels[rows], 0).sample - targets[rows]).abs().mean()
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
    """Mean depth RMSE and normal angle of the estimator's maps against the ground-truth maps of new scenes."""
    from training.metrics import angular_error, rmse
    from training.toyworld import depth_map, normal_map, render_scene

    scenes = [render_scene((seed, index), size=SIDE) for index in range(HELD_OUT)]
    depth, normal = GeometryAnnotator(model, "depth"), GeometryAnnotator(model, "normal")
    return {
        "depth_rmse": round(float(np.mean([rmse(depth(s.image), depth_map(s.depth)) for s in scenes])), 2),
        "normal_angle": round(float(np.mean([angular_error(normal(s.image), normal_map(s.normals))
                                             for s in scenes])), 2),
    }
