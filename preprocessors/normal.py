"""Surface normal maps: ControlNet 1.0's normals from depth, or ControlNet 1.1's NormalBAE network.

**model="depth"** (default; what `control_sd15_normal` was trained on, ControlNet `annotator/midas`): on the raw
relative inverse depth `d` (near = large) at the detect resolution (384 in the 1.0 normal app),

    x = Sobel_x(d), y = Sobel_y(d) (ksize 3), z = alpha (2 pi);
    x = y = 0 where the min-max normalised depth < bg_threshold (0.4 in the normal app; the detector's own
    default is 0.1), so the far background faces the camera;
    n = (x, y, z) / |(x, y, z)|, stored as n * 127.5 + 127.5 (truncated to uint8).

The 1.0 normal app displays that (x, y, z) image but feeds the model `map[:, :, ::-1]`, i.e. (z, y, x) as RGB.
The default `channel_order="zyx"` returns exactly what the model was fed (a flat, camera-facing surface is
(255, 127, 127)); "xyz" gives the displayed map. `d` is the depth model's raw output, so `alpha` is relative to its
scale; the reference values belong to MiDaS DPT-Hybrid (`Intel/dpt-hybrid-midas`). With `from_depth=True` the input
image is itself a depth map (near bright, e.g. from the `depth` preprocessor); its grey levels (0..255) are `d`.

**model="bae"** (ControlNet 1.1 `control_v11p_sd15_normalbae`): NormalBAE (Bae et al., ICCV 2021), the
released `scannet.pt` from lllyasviel/Annotators read into this toolkit's own port of its network
(`preprocessors.nets.normalbae`: EfficientNet-B5 encoder with TF "SAME" padding, the uncertainty-aware decoder),
without timm/geffnet. As the reference annotator: the image at the detect resolution (512) / 255 with ImageNet
mean/std, the full-resolution prediction `out[0][-1][:, :3]` mapped (n + 1) / 2 to RGB, which is ScanNet's colour
protocol (blue faces the camera, red points left, green up). Sides that are not multiples of 32 (only possible
with `detect_resolution=None`) are padded with edge pixels and the map cropped back.
`weights` may also be an export of the reference NNET made where timm runs: a `torch.export` archive
(`torch.export.save(torch.export.export(nnet.eval(), (torch.zeros(1, 3, 512, 512),), dynamic_shapes=...),
"normalbae.pt2")`; declare dynamic height and width to take other sizes) or a TorchScript file
(`torch.jit.trace(nnet.eval(), torch.zeros(1, 3, 512, 512)).save("normalbae.ts")`, which only takes the size it
was traced at); exports are recognised by content. A TorchScript file runs its own code: load only exports you
made or trust; `scannet.pt` itself is read with `weights_only=True`.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from controlkit.errors import CheckpointError, ControlkitError, UnsafeCheckpointError, WeightsNotFoundError
from controlkit.weights import models_dir, resolve_weights
from preprocessors.base import Preprocessor, check_detect_resolution
from preprocessors.depth import DEFAULT_MODEL_DIRS, DepthPreprocessor, load_depth_model

if TYPE_CHECKING:
    import torch

CHANNEL_ORDERS = ("zyx", "xyz")
METHODS = ("depth", "bae")
#: Default detect resolutions: the ControlNet 1.0 normal app (384) and the 1.1 NormalBAE app (512).
REFERENCE_RESOLUTIONS = {"depth": 384, "bae": 512}
#: Looked for in $CONTROLKIT_MODELS (or in a folder given as `weights`): the released file, then exports.
BAE_FILE_NAMES = ("scannet.pt", "normalbae.pt2", "normalbae.ts")
#: NormalBAE's total stride: the network needs sides that are multiples of it.
_BAE_MULTIPLE = 32
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_BAE_HINT = (
    "Pass `weights` (command line: --set weights=PATH) as NormalBAE's scannet.pt (from lllyasviel/Annotators) "
    "or an export of its NNET network (.pt2 / TorchScript), or put scannet.pt in $CONTROLKIT_MODELS"
)


def normals_from_depth(
    depth: np.ndarray, *, alpha: float = 2.0 * math.pi, bg_threshold: float = 0.4, channel_order: str = "zyx"
) -> np.ndarray:
    """ControlNet 1.0's normal map from a depth map (see the module docstring).

    Args:
        depth: (H, W) float, near = large (relative inverse depth or grey levels of a near-bright depth map).
        alpha: the z component before normalisation; larger flattens the normals.
        bg_threshold: x and y are zeroed where (depth - min) / (max - min) is below this (0..1).
        channel_order: "zyx" (what `control_sd15_normal` was fed) or "xyz" (the map the reference displays).

    Returns:
        (H, W, 3) uint8 normal map.
    """
    import cv2

    depth = np.asarray(depth, dtype=np.float32)
    x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    z = np.full_like(x, alpha)
    span = float(depth.max() - depth.min())
    relative = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    x[relative < bg_threshold] = 0
    y[relative < bg_threshold] = 0
    normal = np.stack([x, y, z], axis=2)
    normal /= np.sum(normal**2.0, axis=2, keepdims=True) ** 0.5
    image = (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(image[:, :, ::-1]) if channel_order == "zyx" else image


def load_bae_module(weights: str | os.PathLike | None) -> Any:
    """NormalBAE on the CPU, in eval mode: the released `scannet.pt` in this toolkit's network, or an export.

    Args:
        weights: `scannet.pt` (or the same state dict as safetensors), a folder holding it, a `torch.export`
            archive (.pt2) or a TorchScript file (recognised by content), or a hub id holding `scannet.pt`
            (e.g. lllyasviel/Annotators; only when given explicitly); None looks for `BAE_FILE_NAMES` in
            $CONTROLKIT_MODELS.

    Raises:
        WeightsNotFoundError: no file given or found.
        CheckpointError: neither an export nor a NormalBAE state dict (the message lists mismatched keys).
        UnsafeCheckpointError: a pickle that would need code outside the weights-only allowlist.
    """
    import torch

    path = _bae_file(resolve_weights("NormalBAE", weights, local_names=BAE_FILE_NAMES,
                                     hub_filename=BAE_FILE_NAMES[0], hint=_BAE_HINT))
    kind = _export_kind(path)
    if kind is None:
        return _load_released_bae(path)
    try:
        if kind == "export":
            return torch.export.load(str(path)).module()
        return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: cannot load the {kind} file ({str(error).splitlines()[0]})") from None


def _bae_file(path: Path) -> Path:
    """A folder given as `weights` stands for the first of `BAE_FILE_NAMES` inside it."""
    if not path.is_dir():
        return path
    for name in BAE_FILE_NAMES:
        if (path / name).is_file():
            return path / name
    raise WeightsNotFoundError(f"NormalBAE weights: {path} holds none of {', '.join(BAE_FILE_NAMES)}")


def _load_released_bae(path: Path) -> Any:
    from preprocessors.nets.normalbae import load_normalbae

    try:
        return load_normalbae(path).requires_grad_(False)
    except UnsafeCheckpointError:
        raise
    except CheckpointError as error:
        raise CheckpointError(f"{error}; it is not a torch.export or TorchScript export either") from None


def _export_kind(path: Path) -> str | None:
    """The format of an export: torch.export archive, TorchScript (it has a `code/` folder), or None."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(name.endswith("/archive_format") for name in names):
        return "export"
    if any("/code/" in name for name in names):
        return "TorchScript"
    return None


class NormalPreprocessor(Preprocessor):
    """Surface normal maps (see the module docstring for both methods).

    Args:
        depth_estimator: the depth model for photos (model="depth"); not needed with `from_depth` or `bae`.
        bae: a loaded NormalBAE network (`load_bae_module`, or any module with NNET's output); selects "bae".
        from_depth: the input image is a depth map (near bright), not a photo.
        alpha: z before normalisation (reference `a` = 2 pi; the 1.0 annotator app's slider uses 6.2).
        bg_threshold: relative depth below which the surface is taken to face the camera (0..1).
        channel_order: "zyx" (what the 1.0 normal model was fed) or "xyz" (the displayed map).
        detect_resolution: the depth (or NormalBAE) network runs on the image resized to this short side by the
            reference `resize_image`; Sobel gradients are per pixel at this size. None: the input as given.

    Example:
        >>> normal = NormalPreprocessor.create(depth_model="Intel/dpt-hybrid-midas")
        >>> normal_map = normal("room.jpg")
        >>> normal_from_map = NormalPreprocessor(from_depth=True)("room_depth.png")
    """

    name = "normal"

    def __init__(
        self,
        depth_estimator: DepthPreprocessor | None = None,
        *,
        bae: Any = None,
        from_depth: bool = False,
        alpha: float = 2.0 * math.pi,
        bg_threshold: float = 0.4,
        channel_order: str = "zyx",
        detect_resolution: int | None = REFERENCE_RESOLUTIONS["depth"],
    ):
        if channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"`channel_order` must be one of {', '.join(CHANNEL_ORDERS)}, got {channel_order!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"`alpha` must be a positive number, got {alpha!r}")
        if isinstance(bg_threshold, bool) or not isinstance(bg_threshold, (int, float)) or not 0 <= bg_threshold <= 1:
            raise ValueError(f"`bg_threshold` must be a number in [0, 1], got {bg_threshold!r}")
        sources = (depth_estimator is not None) + (bae is not None) + bool(from_depth)
        if sources != 1:
            raise ValueError("give exactly one of `depth_estimator`, `bae` or `from_depth=True`")
        self.depth_estimator = depth_estimator
        self.bae = bae
        self.from_depth = bool(from_depth)
        self.alpha = float(alpha)
        self.bg_threshold = float(bg_threshold)
        self.channel_order = channel_order
        self.detect_resolution = check_detect_resolution(detect_resolution)

    @classmethod
    def create(
        cls,
        *,
        model: str = "depth",
        depth_model: str | None = None,
        weights: str | None = None,
        from_depth: bool = False,
        alpha: float = 2.0 * math.pi,
        bg_threshold: float = 0.4,
        channel_order: str = "zyx",
        detect_resolution: int | str | None = "auto",
    ) -> NormalPreprocessor:
        """Build from parameters, loading the networks.

        Args:
            model: "depth" (ControlNet 1.0 normals from depth) or "bae" (NormalBAE).
            depth_model: a transformers depth-estimation folder or hub id (model="depth" on photos).
            weights: NormalBAE's scannet.pt, or an export of its network (model="bae"; see `load_bae_module`).
            detect_resolution: "auto" is the reference's for the method (384 for depth, 512 for bae).
            from_depth, alpha, bg_threshold, channel_order: as the constructor.
        """
        if model not in METHODS:
            raise ValueError(f"`model` must be one of {', '.join(METHODS)}, got {model!r}")
        resolution = REFERENCE_RESOLUTIONS[model] if detect_resolution == "auto" else detect_resolution
        options = dict(alpha=alpha, bg_threshold=bg_threshold, channel_order=channel_order,
                       detect_resolution=resolution)
        if model == "bae":
            if from_depth or depth_model is not None:
                raise ValueError("`from_depth` and `depth_model` belong to model='depth'; NormalBAE reads photos")
            return cls(bae=load_bae_module(weights), **options)
        if weights is not None:
            raise ValueError("`weights` is the NormalBAE file (model='bae'); give model='depth' a `depth_model`")
        if from_depth:
            if depth_model is not None:
                raise ValueError("`from_depth=True` reads the depth map given as the image; drop `depth_model`")
            return cls(from_depth=True, **options)
        try:
            network, processor = load_depth_model(depth_model, parameter="depth_model")
        except WeightsNotFoundError as error:
            raise WeightsNotFoundError(f"{error}. Or set from_depth=true and pass a depth map (near bright)") from None
        return cls(DepthPreprocessor(network, processor, detect_resolution=None), **options)

    @classmethod
    def check_ready(cls) -> str | None:
        if any((models_dir() / name).is_dir() for name in DEFAULT_MODEL_DIRS):
            return None
        return (
            "a depth model for photos (--set depth_model=PATH_OR_HUB_ID, e.g. Intel/dpt-hybrid-midas, or "
            "$CONTROLKIT_MODELS/depth), or --set from_depth=true with a depth map as input; NormalBAE: "
            "--set model=bae --set weights=PATH/scannet.pt (lllyasviel/Annotators)"
        )

    def to(self, device: Any) -> NormalPreprocessor:
        if self.depth_estimator is not None:
            self.depth_estimator.to(device)
        if self.bae is not None:
            self.bae.to(device)
        return self

    def detect(self, image: np.ndarray) -> np.ndarray:
        small = self.at_detect_resolution(image)
        if self.bae is not None:
            return self._bae_normals(small)
        return normals_from_depth(self.inverse_depth(small), alpha=self.alpha, bg_threshold=self.bg_threshold,
                                  channel_order=self.channel_order)

    def inverse_depth(self, image: np.ndarray) -> np.ndarray:
        """(H, W) float32 near-large depth of an RGB uint8 image as given: the depth model's raw relative inverse
        depth (1 / depth for metric models), or the grey levels of a depth map with `from_depth`."""
        if self.from_depth:
            return image.astype(np.float32).mean(axis=2)
        depth = self.depth_estimator.predict(image)
        return 1.0 / np.maximum(depth, 1e-6) if self.depth_estimator.metric else depth

    def _bae_normals(self, image: np.ndarray) -> np.ndarray:
        import torch

        from controlkit.image import crop_to, pad_to_multiple

        padded = pad_to_multiple(image, _BAE_MULTIPLE)
        normalised = (padded.astype(np.float32) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
        tensor = torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))[None]
        try:
            with torch.inference_mode():
                output = self.bae(tensor.to(_module_device(self.bae)))
        except RuntimeError as error:
            raise ControlkitError(
                f"the NormalBAE module failed on a {padded.shape[1]}x{padded.shape[0]} input "
                f"({str(error).splitlines()[0]}); a traced or static-shape export only takes the size it was made at"
            ) from None
        normal = _bae_prediction(output)[0, :3]
        normal = ((normal.float() + 1.0) * 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        return crop_to((normal * 255.0).clip(0, 255).astype(np.uint8), image.shape[:2])


def _bae_prediction(output: Any) -> torch.Tensor:
    """NNET returns (per-level predictions, ...) with the finest level last; a plain tensor is taken as is."""
    if isinstance(output, (tuple, list)):
        output = output[0][-1] if isinstance(output[0], (tuple, list)) else output[0]
    if not hasattr(output, "ndim") or output.ndim != 4 or output.shape[1] < 3:
        raise ControlkitError("the NormalBAE module must return (1, 3+, H, W) normals or NNET's (levels, ...) tuple")
    return output


def _module_device(module: Any) -> Any:
    parameter = next(iter(module.parameters()), None)
    return parameter.device if parameter is not None else "cpu"
