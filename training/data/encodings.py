"""What the frozen encoders make of a batch: latents from the VAE, embeddings from the text encoder.

Two ways, the same numbers:

- per step, as diffusers' `train_controlnet.py`: `vae.encode(pixels).latent_dist` and `text_encoder(ids)` on
  every batch;
- cached: the VAE's latent distribution (mean and log-variance, before sampling) of every image and the
  embedding of every distinct caption are computed once, before training, and read back per step.

Either way the latent is sampled per step as `mean + std * eps`, with `eps` drawn from the trainer's generator, so
switching the cache on changes speed, not the run. The cache lives in files (`numpy` memory maps), split over the
processes that computed it (process r of W holds rows r, r + W, ...), keyed by everything that determines its
content (encoder config and weight files, dtype, resolution, the pairs), so a changed input is never read stale.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
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
    """Build or reuse one cached array (latent moments or prompt embeddings) for all processes.

    Args:
        root: the cache folder; `key` names the sub-folder of this content.
        accelerator: for the process index, count and barrier.
    """

    def __init__(self, root: str | Path, key: str, accelerator: Any):
        self.folder = Path(root) / key
        self.accelerator = accelerator
        world = accelerator.num_processes
        self.paths = [self.folder / f"rows-{rank}of{world}.npy" for rank in range(world)]
        self.valid_paths = [self.folder / f"valid-{rank}of{world}.npy" for rank in range(world)]

    def my_rows(self, total: int) -> list[int]:
        """The row ids this process computes."""
        return list(range(self.accelerator.process_index, total, self.accelerator.num_processes))

    def is_built(self) -> bool:
        return all(path.is_file() for path in self.paths + self.valid_paths)

    def write_shard(
        self, shape: tuple[int, ...], dtype: "torch.dtype", batches: Iterable[tuple[list[int], Any]]
    ) -> None:
        """Fill this process's shard from `batches` of (row ids, tensor of those rows) and commit it atomically."""
        import numpy as np

        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.folder.mkdir(parents=True, exist_ok=True)
        count = len(range(rank, shape[0], world))
        temporary = self.paths[rank].with_name(f".{self.paths[rank].name}.{os.getpid()}.tmp.npy")
        array = np.lib.format.open_memmap(temporary, mode="w+", dtype=storage_dtype(dtype), shape=(count, *shape[1:]))
        valid = np.zeros(count, dtype=bool)
        for ids, values in batches:
            local = [i // world for i in ids]
            array[local] = to_storage(values)
            valid[local] = True
        array.flush()
        del array
        os.replace(temporary, self.paths[rank])
        temporary_valid = self.valid_paths[rank].with_name(f".{self.valid_paths[rank].name}.{os.getpid()}.tmp.npy")
        np.save(temporary_valid, valid)
        os.replace(temporary_valid, self.valid_paths[rank])

    def open(self, dtype: "torch.dtype") -> tuple[ShardedRows, list[int]]:
        """All shards (after every process wrote its own) and the ids of the rows that hold a value."""
        import numpy as np

        missing = [str(path) for path in self.paths + self.valid_paths if not path.is_file()]
        if missing:
            from controlkit.errors import ConfigError

            raise ConfigError(
                f"encoding cache incomplete ({missing[0]} missing): with several machines, data.cache_dir must be "
                "on storage they share (or set data.cache_encodings=false)"
            )
        world = len(self.paths)
        valid = [np.load(path) for path in self.valid_paths]
        total = sum(len(v) for v in valid)
        usable = [i for i in range(total) if valid[i % world][i // world]]
        return ShardedRows(self.paths, dtype), usable


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
