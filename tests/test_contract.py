"""One contract test over every registry entry (and every learned variant, with randomly initialised networks
of the real architecture injected through the constructor).

The contract (preprocessors/base.py): PIL RGB uint8 out (RGBA for a masked inpaint map), the size of the input unless asked otherwise, a list in
gives a list out, deterministic, PIL and numpy inputs give the same map.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from preprocessors import PREPROCESSORS, Preprocessor, get_preprocessor


def _dpt():
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(0)
    config = DPTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=64,
        patch_size=16, backbone_out_indices=[0, 1], neck_hidden_sizes=[16, 32], fusion_hidden_size=16,
        reassemble_factors=[4, 2],
    )
    return DPTForDepthEstimation(config).eval()


def _depth() -> Preprocessor:
    from preprocessors.depth import DepthPreprocessor

    return DepthPreprocessor(_dpt(), detect_resolution=64)


def _lineart(model: str) -> Callable[[], Preprocessor]:
    def build() -> Preprocessor:
        from preprocessors.lineart import LineartPreprocessor
        from preprocessors.nets.lineart_nets import AnimeUnet, LineartGenerator

        torch.manual_seed(0)
        network = AnimeUnet(3, 1, levels=3, base_channels=8) if model == "anime" else LineartGenerator(3, 1, 1)
        return LineartPreprocessor(model=model, network=network.eval(), detect_resolution=64)

    return build


def _pidinet() -> Preprocessor:
    from preprocessors.nets.pidinet import PiDiNet
    from preprocessors.softedge import SoftedgePreprocessor

    torch.manual_seed(0)
    return SoftedgePreprocessor(model="pidinet", network=PiDiNet().eval(), detect_resolution=64)


def _normal_from_photo() -> Preprocessor:
    from preprocessors.normal import NormalPreprocessor

    return NormalPreprocessor(_depth(), detect_resolution=64)


def _normal_bae() -> Preprocessor:
    from preprocessors.nets.normalbae import NormalBAE
    from preprocessors.normal import NormalPreprocessor

    torch.manual_seed(0)
    return NormalPreprocessor(bae=NormalBAE().eval(), detect_resolution=64)


def _mlsd_network() -> Preprocessor:
    from preprocessors.mlsd import MlsdPreprocessor
    from preprocessors.nets.mlsd import MLSDLarge

    torch.manual_seed(0)
    return MlsdPreprocessor(model="mlsd", network=MLSDLarge().eval(), detect_resolution=128)


#: (entry, variant) -> a ready instance. Every registry entry that can run here appears at least once.
FACTORIES: dict[tuple[str, str], Callable[[], Preprocessor]] = {
    ("canny", "default"): lambda: get_preprocessor("canny"),
    ("canny", "detect_resolution"): lambda: get_preprocessor("canny", detect_resolution=128),
    ("lineart", "standard"): lambda: get_preprocessor("lineart"),
    ("lineart", "realistic"): _lineart("realistic"),
    ("lineart", "coarse"): _lineart("coarse"),
    ("lineart", "anime"): _lineart("anime"),
    ("softedge", "hed"): lambda: get_preprocessor("softedge", detect_resolution=128),
    ("softedge", "hed_safe"): lambda: get_preprocessor("softedge", safe=True, detect_resolution=128),
    ("softedge", "scribble"): lambda: get_preprocessor("softedge", scribble=True, detect_resolution=128),
    ("softedge", "pidinet"): _pidinet,
    ("pose", "body"): lambda: get_preprocessor("pose"),
    ("depth", "dpt"): _depth,
    ("normal", "from_photo"): _normal_from_photo,
    ("normal", "from_depth"): lambda: get_preprocessor("normal", from_depth=True),
    ("normal", "bae"): _normal_bae,
    ("shuffle", "default"): lambda: get_preprocessor("shuffle", seed=3, detect_resolution=128),
    ("tile", "resample"): lambda: get_preprocessor("tile", down_sampling_rate=2.5),
    ("tile", "colorfix"): lambda: get_preprocessor("tile", mode="colorfix"),
    ("scribble", "xdog"): lambda: get_preprocessor("scribble", detect_resolution=128),
    ("scribble", "hed"): lambda: get_preprocessor("scribble", method="hed", detect_resolution=128),
    ("mlsd", "default"): lambda: get_preprocessor("mlsd", detect_resolution=128),
    ("mlsd", "network"): _mlsd_network,
    ("inpaint", "unmasked"): lambda: get_preprocessor("inpaint"),
    ("inpaint", "random_mask"): lambda: get_preprocessor("inpaint", random_mask=4),
}
#: Entries that cannot run on a CPU-only machine, and why.
NOT_RUNNABLE_HERE = {"aux": "controlnet_aux needs torchvision/timm, i.e. a CUDA torch"}


def test_every_entry_is_covered():
    covered = {name for name, _ in FACTORIES} | set(NOT_RUNNABLE_HERE)
    assert covered == set(PREPROCESSORS)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()[40:190, 100:300].copy()  # (150, 200, 3): not a multiple of 64 on purpose


@pytest.fixture(scope="module")
def instances() -> dict:
    return {}


def _instance(instances: dict, key: tuple[str, str]) -> Preprocessor:
    if key not in instances:
        instances[key] = FACTORIES[key]()
    return instances[key]


@pytest.mark.parametrize("key", sorted(FACTORIES), ids=lambda key: "-".join(key))
def test_contract(key, photo, instances):
    preprocessor = _instance(instances, key)
    assert preprocessor.name == key[0]
    condition = preprocessor(photo)
    # RGBA only for a map with a masked region, from an entry that makes them (inpaint)
    assert isinstance(condition, Image.Image)
    assert condition.mode == "RGB" or (condition.mode == "RGBA" and preprocessor.takes_mask)
    assert condition.size == (photo.shape[1], photo.shape[0])
    array = np.asarray(condition)
    assert array.dtype == np.uint8
    np.testing.assert_array_equal(array, np.asarray(preprocessor(photo)))  # deterministic
    np.testing.assert_array_equal(array, np.asarray(preprocessor(Image.fromarray(photo))))  # PIL == numpy


@pytest.mark.parametrize("key", sorted(FACTORIES), ids=lambda key: "-".join(key))
def test_lists_and_output_size(key, photo, instances):
    preprocessor = _instance(instances, key)
    small = photo[:64, :96]
    maps = preprocessor([photo, small])
    assert isinstance(maps, list) and [m.size for m in maps] == [(200, 150), (96, 64)]
    assert preprocessor(photo, output_size=(128, 96)).size == (128, 96)


def test_edge_maps_are_white_on_black(photo):
    """Polarity: on a photo most pixels of an edge or line map are background, and the background is black."""
    for name in ("canny", "lineart", "softedge"):
        array = np.asarray(get_preprocessor(name)(photo))
        assert np.median(array) < 40, name
        assert array.max() > 200, name


def test_unknown_names_and_parameters_list_the_valid_ones():
    with pytest.raises(ValueError, match="Available: aux, canny, depth, inpaint, lineart, mlsd, normal, pose, scribble, shuffle, softedge, tile"):
        get_preprocessor("hed")
    with pytest.raises(ValueError, match="Valid: .*detect_resolution.*safe.*scribble"):
        get_preprocessor("softedge", sharp=True)


def test_every_entry_records_weights_and_license():
    for spec in PREPROCESSORS.values():
        assert spec.weights and spec.license and spec.summary
    assert not PREPROCESSORS["canny"].needs_weights and PREPROCESSORS["depth"].needs_weights


@pytest.mark.parametrize("key", sorted(FACTORIES), ids=lambda key: "-".join(key))
def test_a_thin_strip_is_refused_before_allocating(key, tmp_path, instances):
    """A 2048x1 PNG (a few dozen bytes) at a detect resolution of 64..512 would be a working image of millions to
    half a billion pixels; every entry refuses it with one line naming the file, or (no detect resolution)
    maps it at its own size."""
    from controlkit.errors import ImageError

    preprocessor = _instance(instances, key)
    path = tmp_path / "strip.png"
    Image.new("RGB", (2048, 1), (200, 30, 30)).save(path)
    if preprocessor.detect_resolution is None:
        assert preprocessor(path).size == (2048, 1)
        return
    with pytest.raises(ImageError, match="more elongated than the limit of 16:1") as info:
        preprocessor(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "detect_resolution" in message and "\n" not in message


def test_an_output_size_out_of_bounds_is_refused_before_drawing(photo):
    from controlkit.errors import ImageError

    with pytest.raises(ImageError, match=r"output_size\) would be 100000x100000 = 10000000000 pixels"):
        get_preprocessor("canny")(photo, output_size=(100000, 100000))
