"""The embedded demo's models, shipped inside the package (controlkit/demo/weights/, float16 safetensors).

    base/                     a tiny text-to-image latent diffusion model (diffusers folder: U-Net, x4 VAE, CLIP
                              text encoder, its own word-level tokenizer), trained on the toy world
    controlnets/<condition>/  one ControlNet per condition (canny, lineart, softedge, pose, depth, normal), with
                              its condition metadata (the preprocessor and parameters its maps came from)
    geometry/                 the toy-world depth, normal and body-keypoint estimator that measures the depth,
                              normal and pose ControlNets (controlkit/demo/estimator.py)

base/controlkit.json records the settings the demo generates with (20 steps, guidance 2). Every loader also takes
the models by short name: "demo" (the base) and "demo:CONDITION" (`controlkit.weights.resolve_model_name`). They
work at 64 x 64 pixels on toy-world images (controlkit/demo/toyworld/world.py); docs/demo.md says how they were
trained and how to reproduce them. Example:

    >>> from controlkit.control import Control
    >>> from controlkit.demo.models import load_demo_base, load_demo_controlnet
    >>> from controlkit.pipeline import generate
    >>> base = load_demo_base()
    >>> controlnet, metadata = load_demo_controlnet("depth", unet=base.unet)
    >>> image = generate(base, "a red sphere on a grey floor with a white background",
    ...                  [Control(depth_map, controlnet)], seed=0).images[0]
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.errors import ConfigError, WeightsNotFoundError
from controlkit.weights import DEMO_CONTROLNETS, DEMO_NAME, DEMO_WEIGHTS_DIR, resolve_model_name

if TYPE_CHECKING:
    import torch
    from diffusers import ControlNetModel, StableDiffusionPipeline

    from controlkit.controlnet import ConditionMetadata

#: The demo's folder inside the installed package (the core's table: `controlkit.weights` resolves the short names
#: "demo" and "demo:CONDITION" to the folders below it for every loader).
DEMO_DIR = DEMO_WEIGHTS_DIR
#: The conditions with a demo ControlNet, in the order the demo shows them.
DEMO_CONDITIONS = DEMO_CONTROLNETS
#: The side of the demo's images in pixels.
DEMO_SIZE = 64
_REBUILD = "reinstall controlkit, or rebuild the demo models: python -m controlkit.demo.recipe all (docs/demo.md)"


def base_path() -> Path:
    """The demo base model's diffusers folder (what the short name "demo" stands for)."""
    return Path(resolve_model_name(DEMO_NAME, "base"))


def controlnet_path(condition: str) -> Path:
    """The diffusers folder of the demo ControlNet for `condition` (one of `DEMO_CONDITIONS`; "demo:CONDITION")."""
    if condition not in DEMO_CONDITIONS:
        raise ConfigError(f"no demo ControlNet for {condition!r}; the demo has {', '.join(DEMO_CONDITIONS)}")
    return Path(resolve_model_name(f"{DEMO_NAME}:{condition}", "controlnet"))


def geometry_path() -> Path:
    """The folder of the toy-world depth, normal and keypoint estimator (a diffusers `UNet2DModel`)."""
    return _existing(DEMO_DIR / "geometry", "config.json", "demo geometry estimator")


def _existing(folder: Path, marker: str, what: str) -> Path:
    if not (folder / marker).is_file():
        raise WeightsNotFoundError(f"{what}: {folder / marker} is missing; {_REBUILD}")
    return folder


def load_demo_base(*, device: str | torch.device | None = None) -> StableDiffusionPipeline:
    """The demo base model in float32 (it is stored in float16), ready for `controlkit.pipeline.generate`."""
    import torch

    from controlkit.pipeline import load_base

    return load_base(base_path(), torch_dtype=torch.float32, device=device)


def load_demo_controlnet(condition: str, *, unet: Any = None) -> tuple[ControlNetModel, ConditionMetadata]:
    """The demo ControlNet for `condition` in float32 (or `unet`'s dtype) and its condition metadata."""
    import torch

    from controlkit.checkpoint import load_controlnet

    dtype = unet.dtype if unet is not None else torch.float32
    return load_controlnet(controlnet_path(condition), unet=unet, torch_dtype=dtype)
