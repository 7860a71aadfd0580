"""The base model families as data: which components a base has and which diffusers pipelines build it.

Generation, loading and training read a family's entry instead of branching on its name: SDXL is SD1.x's path
with a second text encoder and tokenizer, a pooled prompt embedding and the size/crop micro-conditioning
(`controlkit.conditioning`), and a VAE that is decoded in float32 when it is stored in float16.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controlkit.errors import ConfigError


@dataclass(frozen=True)
class BaseFamily:
    """One kind of base model.

    Attributes:
        name: what messages call it ("SD1.x/SD2.x", "SDXL").
        components: the modules of a base of this family, as diffusers' pipelines name them.
        text2img, img2img, inpaint: the diffusers pipeline classes that hold them.
        options: constructor arguments of those pipelines besides the components.
        config_keys: pipeline config values a base carries and every pipeline built over its modules keeps
            (SDXL's `force_zeros_for_empty_prompt`).
        pooled: the prompt also has a pooled embedding and the U-Net takes SDXL's added text/size embedding.
        upcast_vae: a float16 VAE whose config says `force_upcast` encodes and decodes in float32 (SDXL's VAE
            overflows in float16: NaN latents and black images, diffusers#6666).
        single_file_marker: a key prefix present only in this family's original single-file checkpoints.
        default_guidance: classifier-free guidance when neither the caller nor the base says (diffusers' pipeline
            defaults: 7.5 for SD1.x/SD2.x, 5.0 for SDXL).
    """

    name: str
    components: tuple[str, ...]
    text2img: str
    img2img: str
    inpaint: str
    options: Mapping[str, Any] = field(default_factory=dict)
    config_keys: tuple[str, ...] = ()
    pooled: bool = False
    upcast_vae: bool = False
    single_file_marker: str | None = None
    default_guidance: float = 7.5


SD = BaseFamily(
    name="SD1.x/SD2.x",
    components=("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    text2img="StableDiffusionPipeline",
    img2img="StableDiffusionImg2ImgPipeline",
    inpaint="StableDiffusionInpaintPipeline",
    options={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
)
SDXL = BaseFamily(
    name="SDXL",
    components=("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    text2img="StableDiffusionXLPipeline",
    img2img="StableDiffusionXLImg2ImgPipeline",
    inpaint="StableDiffusionXLInpaintPipeline",
    options={"add_watermarker": False},  # the invisible watermark is an optional package, and changes pixels
    config_keys=("force_zeros_for_empty_prompt",),
    pooled=True,
    upcast_vae=True,
    single_file_marker="conditioner.embedders.1.",
    default_guidance=5.0,
)
#: Every family, the most specific first (`family_of` takes the first that matches).
BASE_FAMILIES = (SDXL, SD)
#: diffusers pipeline class names (model_index.json's `_class_name`) -> family.
_BY_CLASS = {name: family for family in BASE_FAMILIES for name in (family.text2img, family.img2img, family.inpaint)}


def family_of(base: Any) -> BaseFamily:
    """The family of a loaded base: a diffusers pipeline, or a dict of its components."""
    components = base if isinstance(base, Mapping) else (getattr(base, "components", None) or {})
    if components.get("text_encoder_2") is not None or components.get("tokenizer_2") is not None:
        return SDXL
    unet = components.get("unet")
    if unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time":
        return SDXL
    return SD


def family_of_class(class_name: Any) -> BaseFamily:
    """The family of a diffusers folder by its model_index.json `_class_name`; SD for unknown names (diffusers
    then says what is missing)."""
    return _BY_CLASS.get(class_name, SD)


def base_components(base: Any, family: BaseFamily) -> dict[str, Any]:
    """The family's modules of a base, by name; ConfigError naming what is missing."""
    components = getattr(base, "components", None)
    missing = [name for name in family.components if not components or components.get(name) is None]
    if missing:
        raise ConfigError(
            f"`base` must be a diffusers {family.name} pipeline with {', '.join(family.components)}; "
            f"{type(base).__name__} lacks {', '.join(missing)}"
        )
    return {name: components[name] for name in family.components}


def pipeline_settings(base: Any, family: BaseFamily) -> dict[str, Any]:
    """The family's `config_keys` as the base holds them ({} for a dict of components: the pipelines' defaults)."""
    config = getattr(base, "config", None) or {}
    return {key: config[key] for key in family.config_keys if key in config}
