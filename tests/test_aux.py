"""controlnet_aux backend: name mapping, the `aux:NAME` registry form, the error where controlnet_aux cannot import,
and the output contract for a detector that returns its own size."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from controlkit.errors import ControlkitError
from preprocessors.controlnet_aux_backend import DETECTORS, AuxPreprocessor, detector_class_name
from preprocessors.registry import PREPROCESSORS, get_preprocessor

AUX_MISSING = importlib.util.find_spec("controlnet_aux") is None


def test_name_mapping():
    assert detector_class_name("hed") == "HEDdetector"
    assert detector_class_name("zoe") == "ZoeDetector"
    assert detector_class_name("openpose") == "OpenposeDetector"
    assert detector_class_name("normalbae") == "NormalBaeDetector"
    assert {name for name, (_, needs_weights) in DETECTORS.items() if not needs_weights} == {
        "canny", "content_shuffle", "lineart_standard", "mediapipe_face"
    }
    with pytest.raises(ValueError, match="Available: anyline, canny"):
        detector_class_name("dwpose")


def test_registry_name_form():
    assert PREPROCESSORS["aux"].parameters() == {"detector": None, "weights_dir": None, "params": None}
    with pytest.raises(ValueError, match="Unknown controlnet_aux detector 'nope'"):
        get_preprocessor("aux:nope")  # the name is checked before controlnet_aux is imported
    with pytest.raises(ValueError, match="already names the detector"):
        get_preprocessor("aux:hed", detector="zoe")
    with pytest.raises(ValueError, match="`detector` is required"):
        get_preprocessor("aux")


@pytest.mark.skipif(not AUX_MISSING, reason="controlnet_aux is installed here")
def test_missing_controlnet_aux_is_one_clear_error(tmp_path):
    with pytest.raises(ControlkitError, match=r"cannot import controlnet_aux .*CUDA build of torch"):
        get_preprocessor("aux:hed", weights_dir=str(tmp_path))
    with pytest.raises(ControlkitError, match="cannot import controlnet_aux"):
        get_preprocessor("aux", detector="canny")
    message = AuxPreprocessor.check_ready()
    assert "controlnet_aux" in message and "CUDA" in message
    assert PREPROCESSORS["aux"].check_ready() == message


def _canny_like_detector(image: np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """Behaves like controlnet_aux's CannyDetector: grey PIL output at its own resolution (short side 512, x64)."""
    import cv2

    from controlkit.image import resize_image

    return Image.fromarray(cv2.Canny(resize_image(image, 512), low_threshold, high_threshold))


def test_detector_output_is_brought_to_the_contract():
    image = np.zeros((120, 200, 3), dtype=np.uint8)
    image[30:90, 50:150] = 255
    preprocessor = AuxPreprocessor(_canny_like_detector, name_in_backend="canny", params={"low_threshold": 50})
    output = preprocessor(image)
    assert output.mode == "RGB" and output.size == (200, 120)
    array = np.asarray(output)
    rows, cols = np.nonzero(array[..., 0])
    assert len(rows) > 0 and (array[..., 0] == array[..., 2]).all()  # grey edges, three channels
    near_outline = (np.minimum(np.abs(rows[:, None] - [30, 89]).min(1), np.abs(cols[:, None] - [50, 149]).min(1)))
    assert near_outline.max() <= 3  # only at the square's outline; black elsewhere
    with pytest.raises(TypeError, match="callable"):
        AuxPreprocessor("hed")
