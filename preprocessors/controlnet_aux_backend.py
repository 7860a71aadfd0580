"""controlnet_aux as an optional backend: any of its detectors behind this toolkit's preprocessor contract.

controlnet_aux imports torchvision and timm when it is imported, which needs a CUDA build of torch; it is not a
dependency of this toolkit (`pip install controlnet_aux` where torch has CUDA). Its detectors are built with
`Cls.from_pretrained(weights_dir)` from a local folder holding the files of `lllyasviel/Annotators` (or a hub id,
fetched only when given explicitly), and their output (PIL or numpy, at their own `image_resolution`) is brought
to the contract: RGB uint8, resized back to the input size.

    >>> hed = get_preprocessor("aux:hed", weights_dir="models/Annotators")          # same as detector="hed"
    >>> depth = get_preprocessor("aux", detector="zoe", weights_dir="models/Annotators")

DWPose is not offered: its controlnet_aux constructor takes mmpose configs rather than a weights folder.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import numpy as np

from controlkit.errors import ControlkitError, MissingDependencyError
from controlkit.image import load_image
from controlkit.weights import looks_like_hub_id, resolve_weights
from preprocessors.base import Preprocessor

#: Our detector name -> (controlnet_aux class, whether it loads weights with `from_pretrained`).
DETECTORS: dict[str, tuple[str, bool]] = {
    "anyline": ("AnylineDetector", True),
    "canny": ("CannyDetector", False),
    "content_shuffle": ("ContentShuffleDetector", False),
    "hed": ("HEDdetector", True),
    "leres": ("LeresDetector", True),
    "lineart": ("LineartDetector", True),
    "lineart_anime": ("LineartAnimeDetector", True),
    "lineart_standard": ("LineartStandardDetector", False),
    "mediapipe_face": ("MediapipeFaceDetector", False),
    "midas": ("MidasDetector", True),
    "mlsd": ("MLSDdetector", True),
    "normalbae": ("NormalBaeDetector", True),
    "openpose": ("OpenposeDetector", True),
    "pidinet": ("PidiNetDetector", True),
    "sam": ("SamDetector", True),
    "teed": ("TEEDdetector", True),
    "zoe": ("ZoeDetector", True),
}
WEIGHTS_FOLDER = "Annotators"
_INSTALL_HINT = (
    "controlnet_aux is an optional backend that needs a CUDA build of torch (it imports torchvision and timm): "
    "pip install controlnet_aux where torch has CUDA, or use this toolkit's own preprocessors"
)


def detector_class_name(detector: str) -> str:
    """The controlnet_aux class behind one of our detector names; unknown names list the valid ones."""
    if detector not in DETECTORS:
        raise ValueError(f"Unknown controlnet_aux detector {detector!r}. Available: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[detector][0]


def import_controlnet_aux() -> Any:
    """Import controlnet_aux, or raise one `ControlkitError` saying how to get a working one."""
    try:
        return importlib.import_module("controlnet_aux")
    except ImportError as error:  # not installed, or its torchvision/timm cannot load with this torch
        raise MissingDependencyError(f"cannot import controlnet_aux ({error}). {_INSTALL_HINT}") from None


class AuxPreprocessor(Preprocessor):
    """A controlnet_aux detector as a preprocessor.

    Args:
        detector: a ready controlnet_aux detector (any callable taking an RGB uint8 image and keyword arguments,
            returning a PIL image or an array); `create(detector=NAME, ...)` builds one by name.
        name_in_backend: our name of the detector, for messages.
        params: keyword arguments passed on every call (e.g. {"detect_resolution": 512, "safe": True}).
    """

    name = "aux"

    def __init__(self, detector: Any, *, name_in_backend: str = "", params: dict[str, Any] | None = None):
        if not callable(detector):
            raise TypeError(f"`detector` must be a callable controlnet_aux detector, got {type(detector).__name__}")
        self.detector = detector
        self.name_in_backend = name_in_backend or type(detector).__name__
        self.params = dict(params or {})

    @classmethod
    def create(
        cls, *, detector: str | None = None, weights_dir: str | None = None, params: dict[str, Any] | None = None
    ) -> AuxPreprocessor:
        """Build controlnet_aux's detector `detector` (see `DETECTORS`).

        Args:
            detector: our name of the detector, e.g. "hed", "zoe", "openpose"; `aux:NAME` in the registry.
            weights_dir: local folder with the detector's files (default $CONTROLKIT_MODELS/Annotators), or a
                hub id such as lllyasviel/Annotators (then controlnet_aux downloads the one file it needs).
            params: keyword arguments for every call of the detector.
        """
        if detector is None:
            raise ValueError(f"`detector` is required, e.g. aux:hed. Available: {', '.join(sorted(DETECTORS))}")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"`params` must be a dict of detector keyword arguments, got {type(params).__name__}")
        class_name = detector_class_name(detector)
        backend_class = getattr(import_controlnet_aux(), class_name, None)
        if backend_class is None:
            raise ControlkitError(f"this controlnet_aux has no {class_name}; update it: pip install -U controlnet_aux")
        if not DETECTORS[detector][1]:
            return cls(backend_class(), name_in_backend=detector, params=params)
        if weights_dir is not None and looks_like_hub_id(str(weights_dir)):
            source = str(weights_dir)
        else:
            source = str(resolve_weights(
                f"controlnet_aux {detector}", weights_dir, local_names=(WEIGHTS_FOLDER,),
                hint=f"Pass `weights_dir` (--set weights_dir=FOLDER), a folder with the lllyasviel/Annotators files, "
                f"or save them as $CONTROLKIT_MODELS/{WEIGHTS_FOLDER}",
            ))
        try:
            return cls(backend_class.from_pretrained(source), name_in_backend=detector, params=params)
        except (OSError, RuntimeError, ValueError, KeyError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ControlkitError(f"controlnet_aux {class_name} could not load from {source} ({reason})") from None

    @classmethod
    def check_ready(cls) -> str | None:
        if importlib.util.find_spec("controlnet_aux") is None:
            return f"controlnet_aux, not installed. {_INSTALL_HINT}"
        try:
            import_controlnet_aux()
        except ControlkitError as error:
            return str(error)
        return None

    def to(self, device: Any) -> AuxPreprocessor:
        if hasattr(self.detector, "to"):
            self.detector.to(device)
        return self

    def detect(self, image: np.ndarray) -> np.ndarray:
        output = self.detector(image, **self.params)
        if isinstance(output, (tuple, list)):  # e.g. MidasDetector(depth_and_normal=True): the first map
            output = output[0]
        try:
            return load_image(output)
        except ControlkitError as error:
            raise ControlkitError(f"controlnet_aux {self.name_in_backend} returned no image ({error})") from None
