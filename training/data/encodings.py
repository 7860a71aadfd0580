"""What the frozen encoders make of a batch: latents from the VAE, embeddings from the text encoder(s).

Two ways, the same numbers:

- per step, as diffusers' `train_controlnet.py`: `vae.encode(pixels).latent_dist` and the text encoding on
  every batch;
- cached: the VAE's latent distribution (mean and log-variance, before sampling) of every image and the
  text encoding of every distinct caption are computed once, before training, and read back per step.

The text encoding is what the family's pipelines condition on (`PromptEncoder`): for SD1.x/SD2.x the text
encoder's last hidden states; for SDXL the two encoders' penultimate hidden states, concatenated, and the second
encoder's pooled projection (both are cached; diffusers' `train_controlnet_sdxl.py` caches these too, but
encodes every latent per step).

Either way the latent is sampled per step as `mean + std * eps`, with `eps` drawn from the trainer's generator, so
switching the cache on changes speed, not the run. The cache lives in files (`numpy` memory maps), split over the
processes that computed it (process r of W holds rows r, r + W, ...), keyed by everything that determines its
content (encoder config and weight files, dtype, resolution, crop rule, the pairs), so a changed input is never
read stale.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch


def encode_images(vae: Any, pixel_values: "torch.Tensor") -> "torch.Tensor":
    """(B, 3, H, W) in [-1, 1] -> the VAE posterior's parameters (B, 2 x latent channels, H / f, W / f)."""
    return vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.parameters


def sample_latents(vae_config: Any, moments: "torch.Tensor", eps: "torch.Tensor") -> "torch.Tensor":
    """Scaled float32 latents `(mean + std * eps - shift) * scaling_factor` from posterior parameters."""
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    posterior = DiagonalGaussianDistribution(moments.float())
    latents = posterior.mean + posterior.std * eps.to(posterior.mean.device, torch.float32)
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> "torch.Tensor":
    """Token ids (B, model_max_length), padded and truncated as diffusers' trainers do."""
    return tokenizer(
        list(prompts), max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: Sequence[str]) -> "torch.Tensor":
    """Captions -> the text encoder's last hidden states (B, model_max_length, width)."""
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids, return_dict=False)[0]


class PromptEncoder:
    """Captions -> the U-Net's text conditioning: (embeddings (B, 77, D), pooled embeddings (B, P) or None).

    SD1.x/SD2.x (`family.pooled` false): the text encoder's last hidden states, as diffusers' `train_controlnet.py`.
    A family with a pooled prompt (SDXL): the family pipeline's own `encode_prompt`, the function generation calls
    (`controlkit.conditioning.encode_conditioning`), over the same modules: one way to encode a prompt.

    Args:
        components: the base's modules by diffusers' names (`Components.base_modules()`).
        family: their `controlkit.base_families.BaseFamily`.
        device: where the embeddings go.
        text_encoder: the module to call for SD1.x (the DDP wrapper of a trained text encoder); default
            components["text_encoder"].
    """

    def __init__(self, components: Mapping[str, Any], family: Any, device: Any, text_encoder: Any = None):
        self.components, self.family, self.device = components, family, device
        self.text_encoder = text_encoder or components["text_encoder"]
        self._pipeline: Any = None

    def __call__(self, prompts: Sequence[str]) -> tuple["torch.Tensor", "torch.Tensor | None"]:
        if not self.family.pooled:
            return encode_prompts(self.components["tokenizer"], self.text_encoder, prompts), None
        if self._pipeline is None:  # a pipeline object over the modules: cheap, nothing is copied
            from controlkit.sd_pipelines import pipeline_from_components

            self._pipeline = pipeline_from_components(self.components)
        embeds, _, pooled, _ = self._pipeline.encode_prompt(list(prompts), None, self.device, 1, False)
        return embeds, pooled


def latent_shape(vae: Any, resolution: int) -> tuple[int, int, int]:
    """(latent channels, side, side) of an image of `resolution` pixels."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.latent_channels, resolution // factor, resolution // factor


class ShardedRows:
    """Rows of one array spread over W `.npy` files: row i is row i // W of file i % W (memory-mapped)."""

    def __init__(self, paths: Sequence[Path], dtype: "torch.dtype"):
        import numpy as np

        self.shards = [np.load(path, mmap_mode="r") for path in paths]
        self.dtype = dtype

    def rows(self, ids: Iterable[int]) -> "torch.Tensor":
        import numpy as np

        count = len(self.shards)
        return from_storage(np.stack([self.shards[i % count][i // count] for i in ids]), self.dtype)


class EncodingCache:
    """Build or reuse cached arrays (latent moments, or prompt embeddings and pooled embeddings) for all processes.

    Args:
        root: the cache folder; `key` names the sub-folder of this content.
        accelerator: for the process index, count and barrier.
        names: the arrays of this content, row for row (every array has one row per item).
    """

    def __init__(self, root: str | Path, key: str, accelerator: Any, names: Sequence[str]):
        self.folder = Path(root) / key
        self.accelerator = accelerator
        world = accelerator.num_processes
        self.paths = {name: [self.folder / f"{name}-{rank}of{world}.npy" for rank in range(world)] for name in names}
        self.valid_paths = [self.folder / f"valid-{rank}of{world}.npy" for rank in range(world)]

    def my_rows(self, total: int) -> list[int]:
        """The row ids this process computes."""
        return list(range(self.accelerator.process_index, total, self.accelerator.num_processes))

    def _all_paths(self) -> list[Path]:
        return [path for paths in self.paths.values() for path in paths] + self.valid_paths

    def is_built(self) -> bool:
        return all(path.is_file() for path in self._all_paths())

    def write_shard(
        self, shapes: Mapping[str, tuple[int, ...]], dtype: "torch.dtype",
        batches: Iterable[tuple[list[int], Mapping[str, Any]]],
    ) -> None:
        """Fill this process's shard of every array (`shapes`: name -> (total rows, *row shape)) from `batches` of
        (row ids, {name: tensor of those rows}) and commit each file atomically."""
        import numpy as np

        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.folder.mkdir(parents=True, exist_ok=True)
        count = len(range(rank, next(iter(shapes.values()))[0], world))
        temporaries = {name: _temporary(self.paths[name][rank]) for name in self.paths}
        arrays = {name: np.lib.format.open_memmap(temporaries[name], mode="w+", dtype=storage_dtype(dtype),
                                                  shape=(count, *shapes[name][1:])) for name in self.paths}
        valid = np.zeros(count, dtype=bool)
        for ids, values in batches:
            local = [i // world for i in ids]
            for name, array in arrays.items():
                array[local] = to_storage(values[name])
            valid[local] = True
        for array in arrays.values():
            array.flush()
        arrays.clear()  # closes the memory maps before their files are renamed into place
        for name, temporary in temporaries.items():
            os.replace(temporary, self.paths[name][rank])
        temporary_valid = _temporary(self.valid_paths[rank])
        np.save(temporary_valid, valid)
        os.replace(temporary_valid, self.valid_paths[rank])

    def open(self, dtype: "torch.dtype") -> tuple[dict[str, ShardedRows], list[int]]:
        """Every array (after every process wrote its own shard), by name, and the ids of the rows that hold a
        value."""
        import numpy as np

        missing = [str(path) for path in self._all_paths() if not path.is_file()]
        if missing:
            from controlkit.errors import ConfigError

            raise ConfigError(
                f"encoding cache incomplete ({missing[0]} missing): with several machines, data.cache_dir must be "
                "on storage they share (or set data.cache_encodings=false)"
            )
        world = len(self.valid_paths)
        valid = [np.load(path) for path in self.valid_paths]
        total = sum(len(v) for v in valid)
        usable = [i for i in range(total) if valid[i % world][i // world]]
        return {name: ShardedRows(paths, dtype) for name, paths in self.paths.items()}, usable


def _temporary(path: Path) -> Path:
    """Where this process writes `path` before renaming it into place (numpy adds no suffix to a .npy name)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")


def padded_chunks(ids: Sequence[int], size: int) -> Iterator[tuple[list[int], list[int]]]:
    """(ids, the same padded to `size` by repeating the last) for consecutive chunks of `size` ids.

    The cache encodes in chunks of the training batch size because CPU kernels choose their blocking by batch size:
    a sample encoded in a batch of the same size gives the same bits whatever the other samples are, so cached
    encodings equal per-step ones exactly.
    """
    for start in range(0, len(ids), size):
        chunk = list(ids[start : start + size])
        yield chunk, chunk + [chunk[-1]] * (size - len(chunk))


def storage_dtype(dtype: "torch.dtype") -> Any:
    """numpy dtype holding a torch dtype bit for bit (bfloat16 as its int16 bits)."""
    import numpy as np
    import torch

    return {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}[dtype]


def to_storage(tensor: "torch.Tensor") -> "np.ndarray":
    import torch

    tensor = tensor.detach().to("cpu")
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def from_storage(array: "np.ndarray", dtype: "torch.dtype") -> "torch.Tensor":
    import torch

    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def content_key(kind: str, **parts: Any) -> str:
    """A short hash naming cached content: `kind-<sha256 of the parts>`."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def folder_identity(folder: str | Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of every file in a model folder: changes when its weights are replaced."""
    root = Path(folder)
    return sorted(
        (str(path.relative_to(root)), path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*") if path.is_file()
    )
