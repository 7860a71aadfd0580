"""What the U-Net and its ControlNets are conditioned on besides the latents and the timestep: the prompt's
embeddings and, for SDXL, the pooled prompt and the size/crop micro-conditioning.

Prompt encoding is diffusers' own (`encode_prompt` of the family's pipeline: both text encoders for SDXL, and
`force_zeros_for_empty_prompt`, which makes the unconditional side zeros when no negative prompt is given).
SDXL's size/crop numbers (Podell et al. 2307.01952, section 2.2) are built here, with diffusers' defaults:
original and target size the output's (height, width), crop (0, 0); the negative side is the positive one's
unless a negative option is given, and then, as in diffusers, its sizes default to the positive ones and its
crop to (0, 0). The batch is laid out [negative x B; positive x B] for every tensor, the prompts' layout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from controlkit.control import check_integer
from controlkit.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from controlkit.base_families import BaseFamily

#: Largest side or crop offset a size/crop option takes: 4x SDXL's largest training bucket side (4096 would
#: already be a photo's size, which SDXL was conditioned on: original sizes of the training images).
MAX_MICRO_SIDE = 16384


@dataclass
class Conditioning:
    """The conditioning tensors of one generation, in the latents' batch layout.

    Attributes:
        text: prompt embeddings (N, 77, D): [negative; positive] with guidance, else the positive ones.
        added: SDXL's `added_cond_kwargs` for the U-Net and ControlNets: "text_embeds", the pooled prompt
            (N, P), and "time_ids", the six size/crop numbers per sample (N, 6); None for SD1.x/SD2.x.
    """

    text: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def conditional_half(self) -> Conditioning:
        """The positive (second) half of a guided batch, for controls on the conditional side only."""
        added = None if self.added is None else {key: value.chunk(2)[1] for key, value in self.added.items()}
        return Conditioning(self.text.chunk(2)[1], added)


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning, each size as diffusers takes it: (height, width) in pixels.

    Attributes:
        original_size: the size the model is told the image had before it was resized (default: the output's).
        crops_coords_top_left: (top, left) of the crop the model is told was taken; (0, 0) is a well-framed image.
        target_size: the size it is told to produce (default: the output's).
        negative_*: the same for the unconditional side (none given: the positive side; any given: the others
            default to the positive sizes and a (0, 0) crop, diffusers' rule).
    """

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
                raise ConfigError(f"`{item.name}` must be two integers (height, width or top, left), got {value!r}")
            low = 0 if "crops" in item.name else 1
            object.__setattr__(self, item.name, tuple(
                check_integer(v, f"`{item.name}`", low, MAX_MICRO_SIDE) for v in value))

    @property
    def is_default(self) -> bool:
        return self == SizeConditioning()

    def time_ids(self, output: tuple[int, int]) -> tuple[list[int], list[int]]:
        """The (negative, positive) six numbers for an output of (width, height) = `output`."""
        width, height = output
        original = self.original_size or (height, width)
        target = self.target_size or (height, width)
        positive = [*original, *self.crops_coords_top_left, *target]
        negatives = (self.negative_original_size, self.negative_crops_coords_top_left, self.negative_target_size)
        if all(value is None for value in negatives):
            return list(positive), positive
        negative = [*(self.negative_original_size or original), *(self.negative_crops_coords_top_left or (0, 0)),
                    *(self.negative_target_size or target)]
        return negative, positive


def encode_conditioning(
    pipe: Any, family: BaseFamily, prompt: str, negative_prompt: str | None, num_images: int, guided: bool,
    output: tuple[int, int], sizes: SizeConditioning,
) -> Conditioning:
    """The prompts encoded by the pipeline (see the module docstring), for `num_images` images of (width,
    height) = `output`. Not thread-safe on a shared tokenizer: the caller holds the prompt lock."""
    import torch

    device = pipe.unet.device
    if not family.pooled:
        if not sizes.is_default:
            raise ConfigError("the size/crop micro-conditioning options are SDXL's; this base is "
                              f"{family.name}: leave them out")
        positive, negative = pipe.encode_prompt(prompt, device, num_images, guided, negative_prompt)
        return Conditioning(torch.cat([negative, positive]) if guided else positive)
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt, None, device, num_images, guided, negative_prompt)
    negative_ids, positive_ids = (_time_ids(pipe, ids, positive.dtype, device, num_images)
                                  for ids in sizes.time_ids(output))
    if not guided:
        return Conditioning(positive, {"text_embeds": pooled, "time_ids": positive_ids})
    return Conditioning(torch.cat([negative, positive]), {
        "text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": torch.cat([negative_ids, positive_ids])})


def _time_ids(pipe: Any, ids: list[int], dtype: torch.dtype, device: Any, count: int) -> torch.Tensor:
    """(count, 6) time ids, checked against the width the U-Net's added embedding takes."""
    import torch

    unet, encoder = pipe.unet, pipe.text_encoder_2
    passed = unet.config.addition_time_embed_dim * len(ids) + encoder.config.projection_dim
    expected = unet.add_embedding.linear_1.in_features
    if passed != expected:
        raise ConfigError(
            f"the base's U-Net takes an added embedding of {expected} values but its second text encoder's "
            f"projection ({encoder.config.projection_dim}) and {len(ids)} size/crop numbers make {passed}; the U-Net "
            "and text_encoder_2 are from different models (an SDXL refiner U-Net needs aesthetic scores, "
            "not supported)"
        )
    return torch.tensor([ids], dtype=dtype, device=device).repeat(count, 1)
