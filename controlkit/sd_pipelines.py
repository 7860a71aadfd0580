"""The one way controlkit builds diffusers' Stable Diffusion pipeline objects.

Every pipeline is built without a safety checker or its feature extractor: the bases controlkit loads (diffusers
folders, single files, the tiny and demo models) often ship none, and a checker decides nothing about control.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

#: The options of every Stable Diffusion pipeline controlkit builds.
PIPELINE_OPTIONS: Mapping[str, Any] = {"safety_checker": None, "feature_extractor": None,
                                       "requires_safety_checker": False}
#: The components of a Stable Diffusion base.
BASE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def pipeline_from_components(components: Mapping[str, Any], *, img2img: bool = False) -> Any:
    """A text-to-image (or img2img) pipeline over ready modules (`BASE_COMPONENTS`; other keys are ignored).
    Cheap: the modules are shared, not copied."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    return cls(**{name: components[name] for name in BASE_COMPONENTS}, **PIPELINE_OPTIONS)


def load_pipeline_folder(folder: str | os.PathLike, **options: Any) -> "StableDiffusionPipeline":
    """A diffusers Stable Diffusion folder read offline (safetensors only); `options` go to `from_pretrained`
    (components to use instead of the folder's, a dtype)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                                   **PIPELINE_OPTIONS, **options)
