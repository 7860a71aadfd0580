"""Depth maps from transformers depth-estimation models (DPT/MiDaS, Depth Anything, any
`AutoModelForDepthEstimation`), post-processed as the ControlNet annotators did.

Reference (ControlNet `annotator/midas`): the detector is fed the image resized by `resize_image` to the detect
resolution (512 in ControlNet 1.1) and normalised to [-1, 1], without MiDaS's own 384 transform; its relative
inverse depth (near = large) is min-max normalised to 0..255, so near is bright. The released depth ControlNets
were trained on such maps (MiDaS DPT-Hybrid, `Intel/dpt-hybrid-midas` in transformers).

Here the model's own image processor supplies the normalisation (mean/std; DPT-Hybrid's is the reference's
[-1, 1]) and sizes are rounded to the network's patch size (14 for Depth Anything). Two transformers ports cannot
take the reference's input: plain-ViT DPT (e.g. Intel/dpt-large) accepts only square inputs, so it gets a square
resize of the detect image, and DPT-Hybrid accepts only its configured size (384 x 384), so the detect image is
resized to that; the prediction is resized back to the detect image. With `Intel/dpt-hybrid-midas` the map thus
comes from a 384 x 384 view of the image rather than the reference's aspect-preserving 512.

Metric models (ZoeDepth, GLPN, Depth Pro, Depth Anything metric) are mapped as the ControlNet 1.1 Zoe annotator
did: `1 - (d - P2) / (P85 - P2)`, clipped, near bright.

No weights ship with the toolkit: pass `model=` a local folder or a hub id (`--set model=...` on the command line),
or keep one at $CONTROLKIT_MODELS/depth.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from controlkit.errors import CheckpointError
from controlkit.weights import models_dir, resolve_weights
from preprocessors.base import Preprocessor, check_detect_resolution

if TYPE_CHECKING:
    import torch

#: Folder names looked up in $CONTROLKIT_MODELS when no `model` is given.
DEFAULT_MODEL_DIRS = ("depth", "dpt-hybrid-midas")
#: The network of the ControlNet depth annotator, as a transformers checkpoint.
REFERENCE_MODEL = "Intel/dpt-hybrid-midas"


def supply_hint(parameter: str = "model") -> str:
    """How to give a depth model, naming the preprocessor's parameter."""
    return (
        f"Pass `{parameter}` (command line: --set {parameter}=PATH_OR_HUB_ID) as a transformers depth-estimation "
        f"folder or hub id, e.g. {REFERENCE_MODEL} (the ControlNet depth annotator's network) or "
        "LiheYoung/depth-anything-small-hf, or save one as $CONTROLKIT_MODELS/depth"
    )


#: Model types whose output is metric depth (far = large) rather than relative inverse depth.
_METRIC_MODEL_TYPES = ("zoedepth", "glpn", "depth_pro")
# Zoe annotator (ControlNet 1.1): the percentiles that map metric depth to 0..1.
_ZOE_LOW_PERCENTILE, _ZOE_HIGH_PERCENTILE = 2, 85


def load_depth_model(
    source: str | os.PathLike | None, *, what: str = "depth-estimation model", parameter: str = "model"
) -> tuple[Any, Any]:
    """Resolve and load a transformers depth-estimation model and its image processor.

    Args:
        source: a local folder (config.json + weights), a hub id 'org/name', or None for the first of
            `DEFAULT_MODEL_DIRS` that exists in $CONTROLKIT_MODELS.
        what: the name used in messages.
        parameter: the preprocessor parameter that takes the model, named in the message when none is found.

    Returns:
        (model in eval mode on the CPU, image processor or None when the folder has none).

    Raises:
        WeightsNotFoundError: nothing found; the message says how to supply a model.
        CheckpointError: the path exists but is not a transformers depth-estimation model.
    """
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    path = resolve_weights(what, source, local_names=DEFAULT_MODEL_DIRS, hint=supply_hint(parameter))
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: a single file; the {what} must be a transformers folder (config.json + weights), "
            f"e.g. a download of {REFERENCE_MODEL}"
        )
    try:
        model = AutoModelForDepthEstimation.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: not a transformers depth-estimation model ({reason})") from None
    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError):
        processor = None  # the reference normalisation ([-1, 1]) is used
    return model.eval(), processor


def is_metric(config: Any) -> bool:
    """True for models that predict metric depth (far = large), False for relative inverse depth (near = large)."""
    return getattr(config, "depth_estimation_type", None) == "metric" or config.model_type in _METRIC_MODEL_TYPES


def depth_to_map(depth: np.ndarray, *, metric: bool = False) -> np.ndarray:
    """Raw model output to the annotators' uint8 depth map, near bright.

    Args:
        depth: (H, W) float. Relative inverse depth (near = large; MiDaS, DPT, Depth Anything) or metric depth.
        metric: treat `depth` as metric (far = large), mapped as the ControlNet 1.1 Zoe annotator.

    Returns:
        (H, W) uint8. Relative: min-max to 0..255 (values truncated, as the reference). A constant prediction
        gives a black map.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if metric:
        low, high = np.percentile(depth, _ZOE_LOW_PERCENTILE), np.percentile(depth, _ZOE_HIGH_PERCENTILE)
        unit = 1.0 - (depth - low) / max(high - low, 1e-12)
    else:
        span = depth.max() - depth.min()
        if not np.isfinite(span) or span <= 0:
            return np.zeros(depth.shape, dtype=np.uint8)
        unit = (depth - depth.min()) / span
    return (unit * 255.0).clip(0, 255).astype(np.uint8)


class DepthPreprocessor(Preprocessor):
    """Depth maps, near bright, from a transformers depth-estimation model.

    Args:
        model: a ready `*ForDepthEstimation` model (e.g. `DPTForDepthEstimation`,
            `DepthAnythingForDepthEstimation`); `create(model=PATH_OR_HUB_ID)` loads one.
        image_processor: its image processor, for the input mean/std; None uses the reference's [-1, 1].
        detect_resolution: the model runs on the image resized by the reference `resize_image` to this short
            side (ControlNet 1.1: 512; 1.0: 384); the map is resized back bilinearly. None: the input as given.
        metric: the model predicts metric depth (see `depth_to_map`); None reads it from the model's config.

    Example:
        >>> depth = DepthPreprocessor.create(model="Intel/dpt-hybrid-midas")
        >>> depth_map = depth("room.jpg")   # PIL RGB, grey, near bright
    """

    name = "depth"

    def __init__(
        self,
        model: Any,
        image_processor: Any = None,
        *,
        detect_resolution: int | None = 512,
        metric: bool | None = None,
    ):
        self.model = model.eval()
        self.detect_resolution = check_detect_resolution(detect_resolution)
        self.metric = is_metric(model.config) if metric is None else bool(metric)
        self.mean = np.asarray(getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5), dtype=np.float32)
        self.std = np.asarray(getattr(image_processor, "image_std", None) or (0.5, 0.5, 0.5), dtype=np.float32)
        self.multiple = _size_multiple(model.config)

    @classmethod
    def create(
        cls, *, model: str | None = None, detect_resolution: int | None = 512, metric: bool | None = None
    ) -> DepthPreprocessor:
        """Load `model` (a local folder or hub id; default $CONTROLKIT_MODELS/depth) and build the preprocessor."""
        network, processor = load_depth_model(model)
        return cls(network, processor, detect_resolution=detect_resolution, metric=metric)

    @classmethod
    def check_ready(cls) -> str | None:
        if any((models_dir() / name).is_dir() for name in DEFAULT_MODEL_DIRS):
            return None
        return f"a depth model. {supply_hint()}"

    def to(self, device: Any) -> DepthPreprocessor:
        self.model.to(device)
        return self

    def detect(self, image: np.ndarray) -> np.ndarray:
        return depth_to_map(self.estimate(image), metric=self.metric)

    def estimate(self, image: np.ndarray) -> np.ndarray:
        """The model's raw prediction for an RGB uint8 (H, W, 3) image at its detect-resolution size.

        Returns:
            (h, w) float32, (h, w) the size of `resize_image(image, detect_resolution)` (the input size when
            `detect_resolution` is None): relative inverse depth (near = large), or metric depth if `self.metric`.
        """
        return self.predict(self.at_detect_resolution(image))

    def predict(self, image: np.ndarray) -> np.ndarray:
        """The model's raw prediction for an RGB uint8 (H, W, 3) image as given: (H, W) float32."""
        import cv2
        import torch

        height, width = image.shape[:2]
        with torch.inference_mode():
            predicted = self.model(pixel_values=self.pixel_values_of(image)).predicted_depth
        depth = predicted.reshape(predicted.shape[-2:]).float().cpu().numpy()
        if depth.shape != (height, width):
            depth = cv2.resize(depth, (width, height), interpolation=cv2.INTER_LINEAR)
        return depth

    def pixel_values_of(self, image: np.ndarray) -> torch.Tensor:
        """(1, 3, h, w) normalised input at the size the network takes (`_network_input_size`)."""
        import cv2
        import torch

        size = _network_input_size(self.model.config, image.shape[0], image.shape[1], self.multiple)
        if size != (image.shape[1], image.shape[0]):
            image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
        normalised = (image.astype(np.float32) / 255.0 - self.mean) / self.std
        parameter = next(self.model.parameters())
        tensor = torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))[None]
        return tensor.to(device=parameter.device, dtype=parameter.dtype)


def _size_multiple(config: Any) -> int:
    """Input sides must be multiples of the ViT patch size (14 for DINOv2, 16 for DPT); 32 for other networks."""
    backbone = getattr(config, "backbone_config", None)
    patch = getattr(backbone, "patch_size", None) or getattr(config, "patch_size", None)
    return int(patch) if patch else 32


def _network_input_size(config: Any, height: int, width: int, multiple: int) -> tuple[int, int]:
    """(width, height) the network is fed for an image of `height` x `width` (see the module docstring)."""
    if config.model_type == "dpt" and config.is_hybrid:
        side = config.image_size  # the hybrid embeddings refuse any other input size
        return (side, side) if isinstance(side, int) else (side[1], side[0])
    if config.model_type == "dpt" and getattr(config, "backbone_config", None) is None:
        side = _round_to(min(height, width), multiple)  # plain ViT DPT reshapes its tokens to a square grid
        return side, side
    return _round_to(width, multiple), _round_to(height, multiple)


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)

