"""From a collated batch of pairs to `StepInputs`: random draws, latents, text embeddings, conditions.

Randomness per optimizer step is drawn once for the whole global batch from the trainer's generator (identical
on every process): the latent posterior's `eps`, the diffusion noise, the timesteps and the prompt dropout. Each
sample takes the draws at its position in the global batch, so a sample meets the same randomness whatever the
number of processes or accumulation steps, with or without the encoding cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from controlkit.errors import ControlkitError
from training.data.encodings import (
    EncodingCache,
    content_key,
    encode_images,
    encode_prompts,
    folder_identity,
    latent_shape,
    sample_latents,
)
from training.engine.step import StepInputs

if TYPE_CHECKING:
    import torch

    from training.config import TrainConfig
    from training.engine.models import Components


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
        self.text_encoder_forward = text_encoder_forward or parts.text_encoder
        self.latent_rows = None  # ShardedRows of latent moments, by dataset index
        self.text_rows = None  # ShardedRows of embeddings, by prompt id
        self.prompt_ids: dict[str, int] = {}
        self.latent_shape = latent_shape(parts.vae, config.data.resolution)
        self._last: StepInputs | None = None

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
                              previous.timesteps, torch.zeros_like(previous.weights))
        rows = torch.tensor([positions[index] for index in batch["indices"]], device=draws.eps.device)
        prompts = ["" if drop else prompt for prompt, drop in zip(batch["prompts"], draws.drop_prompt[rows].tolist())]
        with torch.no_grad():
            if self.latent_rows is not None:
                moments = self.latent_rows.rows(batch["indices"]).to(self.device, non_blocking=True)
            else:
                moments = encode_images(self.parts.vae, batch["pixel_values"].to(self.device, non_blocking=True))
            latents = sample_latents(self.parts.vae.config, moments, draws.eps[rows])
        text_embeds = self._text_embeds(prompts)
        condition = None
        if self.parts.controlnet is not None:
            condition = batch["conditioning_pixel_values"].to(self.device, non_blocking=True)
            if self.config.model.channels_last:
                condition = condition.to(memory_format=torch.channels_last)
        inputs = StepInputs(latents, text_embeds, condition, draws.noise[rows].to(self.device),
                            draws.timesteps[rows].to(self.device), torch.ones(len(rows), device=self.device))
        self._last = inputs
        return inputs

    def _text_embeds(self, prompts: list[str]) -> "torch.Tensor":
        import torch

        if self.text_rows is not None:
            rows = self.text_rows.rows(self.prompt_ids[prompt] for prompt in prompts)
            return rows.to(self.device, non_blocking=True)
        if self.config.model.train_text_encoder:
            return encode_prompts(self.parts.tokenizer, self.text_encoder_forward, prompts)
        with torch.no_grad():
            return encode_prompts(self.parts.tokenizer, self.parts.text_encoder, prompts)

    # -- the cache ---------------------------------------------------------------------------------------------

    def build_caches(self, accelerator: Any, dataset: Any, cache_root: Any) -> list[int] | None:
        """Encode every image (when crops are fixed) and every distinct caption (when the text encoder is frozen)
        once, split over the processes. Returns the dataset indices whose pair could be read (None when images
        are not cached, so bad pairs are only found during training)."""
        data, model = self.config.data, self.config.model
        usable = None
        if data.center_crop:
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
            dtype=str(vae.dtype), resolution=self.config.data.resolution, pairs=pairs,
        )
        cache = EncodingCache(cache_root, key, accelerator)
        if not cache.is_built():
            mine = cache.my_rows(len(dataset))
            size = self.config.train.batch_size
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=[mine[i : i + size] for i in range(0, len(mine), size)],
                collate_fn=collate_pairs, num_workers=self.config.data.num_workers,
            )

            def encoded():
                with torch.no_grad():
                    for batch in loader:
                        if batch["indices"]:
                            yield batch["indices"], encode_images(vae, batch["pixel_values"].to(self.device))

            shape = (len(dataset), 2 * self.latent_shape[0], *self.latent_shape[1:])
            cache.write_shard(shape, vae.dtype, encoded())
        accelerator.wait_for_everyone()
        self.latent_rows, usable = cache.open(vae.dtype)
        return usable

    def _cache_prompts(self, accelerator: Any, dataset: Any, cache_root: Any) -> None:
        import torch

        prompts = sorted({pair.prompt.strip() for pair in dataset.pairs if isinstance(pair.prompt, str)} | {""})
        encoder = self.parts.text_encoder
        key = content_key(
            "prompts", encoder=encoder.config.to_dict(), dtype=str(encoder.dtype), prompts=prompts,
            weights=folder_identity(self.parts.base_path / "text_encoder"),
            tokenizer=folder_identity(self.parts.base_path / "tokenizer"),
        )
        cache = EncodingCache(cache_root, key, accelerator)
        if not cache.is_built():
            mine = cache.my_rows(len(prompts))
            size = max(self.config.train.batch_size, 16)

            def encoded():
                with torch.no_grad():
                    for start in range(0, len(mine), size):
                        ids = mine[start : start + size]
                        yield ids, encode_prompts(self.parts.tokenizer, encoder, [prompts[i] for i in ids])

            width = encoder.config.hidden_size
            cache.write_shard((len(prompts), self.parts.tokenizer.model_max_length, width), encoder.dtype, encoded())
        accelerator.wait_for_everyone()
        self.text_rows, _ = cache.open(encoder.dtype)
        self.prompt_ids = {prompt: index for index, prompt in enumerate(prompts)}


def _identity(reference: Any) -> Any:
    from training.data.conditions import source_identity

    return None if reference is None else source_identity(reference)
