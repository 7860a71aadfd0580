"""From a collated batch of pairs to `StepInputs`: random draws, latents, text embeddings, conditions.

Randomness per optimizer step is drawn once for the whole global batch from the trainer's generator (identical
on every process): the latent posterior's `eps`, the diffusion noise, the timesteps and the prompt dropout. Each
sample takes the draws at its position in the global batch, so a sample meets the same randomness whatever the
number of processes or accumulation steps, with or without the encoding cache.

For SDXL each sample also carries its size/crop conditioning: the image's size before resizing, the crop's
(top, left) in the resized image and the training size, the six numbers diffusers' `train_text_to_image_sdxl.py`
computes per sample (`size_time_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from controlkit.errors import ControlkitError
from training.data.encodings import (
    EncodingCache,
    PromptEncoder,
    content_key,
    encode_images,
    folder_identity,
    latent_shape,
    padded_chunks,
    sample_latents,
)
from training.engine.step import StepInputs

if TYPE_CHECKING:
    import torch

    from training.config import TrainConfig
    from training.engine.models import Components


#: Changes whenever the pixels a cached latent was encoded from would change for the same pairs and resolution
#: (the resize and crop rule of training/data/dataset.py), so that older caches are not read.
GEOMETRY = "short-side-int/center-round"


@dataclass
class StepDraws:
    """Random numbers of one optimizer step, one row per sample of the global batch (N samples)."""

    eps: "torch.Tensor"  # (N, C, h, w) standard normal: the latent posterior sample
    noise: "torch.Tensor"  # (N, C, h, w) standard normal: the diffusion noise
    timesteps: "torch.Tensor"  # (N,) int64
    drop_prompt: "torch.Tensor"  # (N,) bool: the caption is replaced by the empty prompt


def draw_step(generator: "torch.Generator", count: int, shape: tuple[int, ...], num_timesteps: int,
              proportion_empty_prompts: float) -> StepDraws:
    import torch

    device = generator.device
    eps = torch.randn((count, *shape), generator=generator, device=device)
    noise = torch.randn((count, *shape), generator=generator, device=device)
    timesteps = torch.randint(0, num_timesteps, (count,), generator=generator, device=device)
    drop = torch.rand((count,), generator=generator, device=device) < proportion_empty_prompts
    return StepDraws(eps, noise, timesteps, drop)


class BatchEncoder:
    """Turns collated batches into `StepInputs` with cached or per-step encodings (see training/data/encodings.py)."""

    def __init__(self, config: "TrainConfig", parts: "Components", device: Any, text_encoder_forward: Any = None):
        self.config, self.parts, self.device = config, parts, device
        self.prompts = PromptEncoder(parts.base_modules(), parts.family, device, text_encoder_forward)
        self.latent_rows = None  # ShardedRows of latent moments, by dataset index
        self.text_rows = None  # {"embeds": ShardedRows, "pooled": ShardedRows (SDXL)} by prompt id
        self.prompt_ids: dict[str, int] = {}
        self.latent_shape = latent_shape(parts.vae, config.data.resolution)
        self._last: StepInputs | None = None

    def latent_shape_for(self, size: tuple[int, int] | None) -> tuple[int, int, int]:
        """(C, h, w) of the latents of images of (width, height) `size`; None: the square of data.resolution."""
        if size is None:
            return self.latent_shape
        factor = self.config.data.resolution // self.latent_shape[1]
        return self.latent_shape[0], size[1] // factor, size[0] // factor

    def inputs(self, batch: dict[str, Any], draws: StepDraws, positions: dict[int, int]) -> StepInputs:
        """StepInputs of a batch; draws are taken at each sample's position in the step's global batch.

        A batch whose pairs were all bad is replaced by the previous one with zero loss weights, so that every
        process still runs forward and backward (distributed processes must take part in every gradient sync).
        """
        import torch

        if not batch["indices"]:
            if self._last is None:
                raise ControlkitError("every pair of the first batch is bad; check the data: controlkit dataset check")
            previous = self._last
            return StepInputs(previous.latents, previous.text_embeds, previous.condition, previous.noise,
                              previous.timesteps, torch.zeros_like(previous.weights), previous.added)
        rows = torch.tensor([positions[index] for index in batch["indices"]], device=draws.eps.device)
        prompts = ["" if drop else prompt for prompt, drop in zip(batch["prompts"], draws.drop_prompt[rows].tolist())]
        with torch.no_grad():
            if self.latent_rows is not None:
                moments = self.latent_rows.rows(batch["indices"]).to(self.device, non_blocking=True)
            else:
                moments = encode_images(self.parts.vae, batch["pixel_values"].to(self.device, non_blocking=True))
            latents = sample_latents(self.parts.vae.config, moments, draws.eps[rows])
        text_embeds, pooled = self._text_embeds(prompts)
        added = None
        if pooled is not None:
            time_ids = size_time_ids(batch["original_sizes"], batch["crop_top_lefts"], self.config.data.resolution,
                                     batch.get("target_sizes"))
            added = {"text_embeds": pooled, "time_ids": time_ids.to(self.device)}
        condition = None
        if self.parts.controlnet is not None:
            condition = batch["conditioning_pixel_values"].to(self.device, non_blocking=True)
            if self.config.model.channels_last:
                condition = condition.to(memory_format=torch.channels_last)
        inputs = StepInputs(latents, text_embeds, condition, draws.noise[rows].to(self.device),
                            draws.timesteps[rows].to(self.device), torch.ones(len(rows), device=self.device), added)
        self._last = inputs
        return inputs

    def _text_embeds(self, prompts: list[str]) -> tuple["torch.Tensor", "torch.Tensor | None"]:
        import torch

        if self.text_rows is not None:
            ids = [self.prompt_ids[prompt] for prompt in prompts]
            embeds, pooled = (self.text_rows[name].rows(ids).to(self.device, non_blocking=True)
                              if name in self.text_rows else None for name in ("embeds", "pooled"))
            return embeds, pooled
        if self.config.model.train_text_encoder:
            return self.prompts(prompts)
        with torch.no_grad():
            return self.prompts(prompts)

    # -- the cache ---------------------------------------------------------------------------------------------

    def build_caches(self, accelerator: Any, dataset: Any, cache_root: Any) -> list[int] | None:
        """Encode every image (when crops are fixed) and every distinct caption (when the text encoder is frozen)
        once, split over the processes. Returns the dataset indices whose pair could be read (None when images
        are not cached, so bad pairs are only found during training)."""
        data, model = self.config.data, self.config.model
        usable = None
        if data.center_crop and not data.buckets:  # one fixed crop per image: its latent can be cached
            usable = self._cache_latents(accelerator, dataset, cache_root)
        if not model.train_text_encoder:
            self._cache_prompts(accelerator, dataset, cache_root)
        return usable

    def _cache_latents(self, accelerator: Any, dataset: Any, cache_root: Any) -> list[int]:
        import torch

        from training.data.dataset import collate_pairs

        vae = self.parts.vae
        pairs = [(pair.key, _identity(pair.image), _identity(pair.condition)) for pair in dataset.pairs]
        key = content_key(
            "latents", vae=dict(vae.config), weights=folder_identity(self.parts.base_path / "vae"),
            dtype=str(vae.dtype), resolution=self.config.data.resolution, geometry=GEOMETRY, pairs=pairs,
        )
        cache = EncodingCache(cache_root, key, accelerator, names=("moments",))
        if not cache.is_built():
            chunks = list(padded_chunks(cache.my_rows(len(dataset)), self.config.train.batch_size))
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=[padded for _, padded in chunks], collate_fn=collate_pairs,
                num_workers=self.config.data.num_workers,
            )

            def encoded():
                with torch.no_grad():
                    for batch in loader:
                        if batch["indices"]:
                            moments = encode_images(vae, batch["pixel_values"].to(self.device))
                            yield _unpadded(batch["indices"], {"moments": moments})

            shape = (len(dataset), 2 * self.latent_shape[0], *self.latent_shape[1:])
            cache.write_shard({"moments": shape}, vae.dtype, encoded())
        accelerator.wait_for_everyone()
        rows, usable = cache.open(vae.dtype)
        self.latent_rows = rows["moments"]
        return usable

    def _cache_prompts(self, accelerator: Any, dataset: Any, cache_root: Any) -> None:
        import torch

        prompts = sorted({pair.prompt.strip() for pair in dataset.pairs if isinstance(pair.prompt, str)} | {""})
        parts = self.parts
        with torch.no_grad():
            probe_embeds, probe_pooled = self.prompts([""])  # the shapes and dtype of an encoding
        names = ("embeds",) if probe_pooled is None else ("embeds", "pooled")
        modules = parts.base_modules()
        key = content_key(
            "prompts", family=parts.family.name, dtype=str(probe_embeds.dtype), prompts=prompts,
            configs={name: modules[name].config.to_dict() for name in parts.text_names() if "encoder" in name},
            weights={name: folder_identity(parts.base_path / name) for name in parts.text_names()},
        )
        cache = EncodingCache(cache_root, key, accelerator, names=names)
        if not cache.is_built():

            def encoded():
                with torch.no_grad():
                    for ids, padded in padded_chunks(cache.my_rows(len(prompts)), self.config.train.batch_size):
                        embeds, pooled = self.prompts([prompts[i] for i in padded])
                        yield _unpadded(ids, {"embeds": embeds, "pooled": pooled})

            shapes = {"embeds": (len(prompts), *probe_embeds.shape[1:])}
            if probe_pooled is not None:
                shapes["pooled"] = (len(prompts), *probe_pooled.shape[1:])
            cache.write_shard(shapes, probe_embeds.dtype, encoded())
        accelerator.wait_for_everyone()
        self.text_rows, _ = cache.open(probe_embeds.dtype)
        self.prompt_ids = {prompt: index for index, prompt in enumerate(prompts)}


def size_time_ids(original_sizes: Sequence[Sequence[int]], crop_top_lefts: Sequence[Sequence[int]],
                  resolution: int, target_sizes: Sequence[Sequence[int]] | None = None) -> "torch.Tensor":
    """SDXL's six size/crop numbers per sample, (B, 6) float32: original (height, width) before resizing, crop
    (top, left), target (height, width) (default (resolution, resolution); a bucket's size with buckets), laid
    out as `controlkit.conditioning.SizeConditioning` lays them out for generation."""
    import torch

    from controlkit.conditioning import SizeConditioning

    targets = target_sizes or [(resolution, resolution)] * len(original_sizes)
    rows = [SizeConditioning(original_size=tuple(size), crops_coords_top_left=tuple(crop),
                             target_size=tuple(target)).time_ids((target[1], target[0]))[1]
            for size, crop, target in zip(original_sizes, crop_top_lefts, targets)]
    return torch.tensor(rows, dtype=torch.float32)


def _unpadded(ids: list[int], values: dict[str, Any]) -> tuple[list[int], dict[str, Any]]:
    """The rows of `ids` of an encoding of `padded_chunks`' padded ids (the padding repeats the last id)."""
    count = len(dict.fromkeys(ids))
    return ids[:count], {name: value[:count] for name, value in values.items() if value is not None}


def _identity(reference: Any) -> Any:
    from training.data.conditions import source_identity

    return None if reference is None else source_identity(reference)
