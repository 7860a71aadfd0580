"""Small, real Stable Diffusion components built from configs, with no download.

Two uses: the test suite (tiny U-Net, VAE, CLIP text encoder and a word-level CLIP tokenizer whose vocabulary is
written here), and the embedded demo's base model, which is the same architecture family at a larger size.
Every component is the real diffusers/transformers class, so everything that works on them works on SD1.5, and
with `TinyConfig(sdxl=True)` on SDXL: a U-Net with SDXL's added text/size embedding, and two CLIP text encoders
(the second with a projection, whose pooled output SDXL takes) with their tokenizers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Words of the toy world's captions; any other word is spelled out letter by letter.
DEFAULT_WORDS = tuple((
    "a an and the on of in with floor background wall sky scene photo picture image drawing person figure "
    "red green blue yellow orange purple pink cyan white black grey gray brown magenta "
    "sphere spheres ball cube cubes box boxes cylinder cylinders cone cones circle circles ring torus "
    "small large big tiny two three four one standing walking arms legs raised dark light bright"
).split())

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.-'!?"


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of a small latent diffusion model. Defaults are the test size (forward in a few ms on a CPU).

    Attributes:
        block_out_channels: U-Net channels per resolution (len = number of resolutions).
        layers_per_block: resnets per U-Net block.
        cross_attention_dim: width of the text encoder (and of the U-Net's cross-attention).
        text_layers: transformer layers of the text encoder.
        vae_channels: VAE channels per resolution (len - 1 downsamplings: 2 -> x2, 3 -> x4, 4 -> x8).
        sample_size: latent side the U-Net is configured for (informational in diffusers).
        words: the tokenizer's word list.
        norm_num_groups, vae_norm_num_groups: GroupNorm groups of the U-Net and of the VAE; None: as many as
            the first level has channels, up to 32 (a group per channel normalises every channel on its own, which
            costs a small VAE its colours: the demo uses 4 channels per group or more).
        sdxl: build SDXL's layout: two text encoders of a quarter and three quarters of `cross_attention_dim`
            (the U-Net attends to their concatenated hidden states, as SDXL's 768 + 1280 = 2048), the second with a
            projection of
            `projection_dim` (the pooled prompt), and a U-Net whose added embedding takes that pooled vector and
            the six size/crop numbers (`addition_time_embed_dim` each), as SDXL's `addition_embed_type` "text_time".
    """

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    cross_attention_dim: int = 32
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (32, 64)
    sample_size: int = 32
    attention_head_dim: int = 8
    words: tuple[str, ...] = DEFAULT_WORDS
    norm_num_groups: int | None = None
    vae_norm_num_groups: int | None = None
    sdxl: bool = False
    projection_dim: int = 32
    addition_time_embed_dim: int = 8


#: The SDXL test size: SDXL's layout (two text encoders, pooled and size/crop embedding, linear attention
#: projections, two transformer layers at the lower level) at the size of diffusers' own SDXL ControlNet tests.
TINY_SDXL_CONFIG = TinyConfig(cross_attention_dim=64, layers_per_block=2, sdxl=True)
#: The test size of every base family (`controlkit.base_families.BASE_FAMILIES`), by family name: tests that must
#: hold for every family run over this table.
TINY_CONFIGS = {"SD1.x/SD2.x": TinyConfig(), "SDXL": TINY_SDXL_CONFIG}


#: The embedded demo's base model: 64 x 64 images, a x4 VAE (16 x 16 x 4 latents), a three-level U-Net
#: (2.7 M parameters) and a two-layer text encoder; with its six ControlNets about 22 MB in float16.
DEMO_CONFIG = TinyConfig(
    block_out_channels=(32, 64, 96), layers_per_block=1, cross_attention_dim=64, text_layers=2,
    vae_channels=(16, 32, 64), sample_size=16, attention_head_dim=8, norm_num_groups=8, vae_norm_num_groups=4,
)


def tokenizer_files(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merges in which every listed word is one token.

    Letters are in the vocabulary (with and without the end-of-word mark '</w>'), so any text tokenises. The merges
    are learned by byte-pair encoding over the word list, run until every word is one symbol: the most frequent
    adjacent pair (ties: the alphabetically first) is merged everywhere, step after step. Encoding a listed word
    with merges applied by rank then replays exactly its merges of that run (a lower-ranked pair present in the
    word would have been merged in the word when it was learned), so it always ends as one token. Merges built
    word by word instead can be pre-empted: "an"'s ('a', 'n</w>') would split "cyan" into 'cy' + 'an</w>'.
    """
    from collections import Counter

    tokens: list[str] = [BOS, EOS]
    for letter in _LETTERS:
        tokens += [letter, letter + "</w>"]
    spelled = [list(word[:-1]) + [word[-1] + "</w>"] for word in sorted(set(w.lower() for w in words)) if word]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for symbols in spelled for pair in zip(symbols, symbols[1:]))
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = best[0] + best[1]
        if merged not in tokens:
            tokens.append(merged)
        spelled = [_merge(symbols, best, merged) for symbols in spelled]
    vocab = {token: index for index, token in enumerate(tokens)}
    return vocab, merges


def _merge(symbols: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    """`symbols` with every adjacent occurrence of `pair` (left to right, no overlaps) replaced by `merged`."""
    result: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            result.append(merged)
            index += 2
        else:
            result.append(symbols[index])
            index += 1
    return result


def build_tokenizer(words: Iterable[str] = DEFAULT_WORDS, directory: str | Path | None = None) -> Any:
    """A transformers `CLIPTokenizer` over `words` (model_max_length 77); saved to `directory` if given."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files(words)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "vocab.json").write_text(json.dumps(vocab))
        merge_lines = "\n".join(" ".join(pair) for pair in merges)
        (Path(directory) / "merges.txt").write_text(f"#version: 0.2\n{merge_lines}\n")
        tokenizer.save_pretrained(str(directory))
    return tokenizer


def build_components(config: TinyConfig = TinyConfig(), *, seed: int = 0) -> dict[str, Any]:
    """Randomly initialised (seeded) SD components of the given size.

    Returns:
        dict with keys unet, vae, text_encoder, tokenizer, scheduler (and text_encoder_2, tokenizer_2 for SDXL):
        the arguments of diffusers' Stable Diffusion (XL) pipelines besides the ControlNet. Latents have 4
        channels; the VAE downsamples by 2 ** (len(vae_channels) - 1).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    levels = len(config.block_out_channels)
    tokenizer = build_tokenizer(config.words)
    torch.manual_seed(seed)
    sdxl_options: dict[str, Any] = {}
    if config.sdxl:  # SDXL's U-Net: linear projections, deeper lower levels, the added text/size embedding
        sdxl_options = {
            "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_time_embed_dim": config.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": 6 * config.addition_time_embed_dim + config.projection_dim,
            "transformer_layers_per_block": tuple(range(1, levels + 1)),
        }
    unet = UNet2DConditionModel(
        sample_size=config.sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups or min(32, config.block_out_channels[0]),
        **sdxl_options,
    )
    torch.manual_seed(seed + 1)
    vae_levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        block_out_channels=config.vae_channels,
        latent_channels=4,
        norm_num_groups=config.vae_norm_num_groups or min(32, config.vae_channels[0]),
        sample_size=config.sample_size * 2 ** (vae_levels - 1),
    )
    torch.manual_seed(seed + 2)
    if not config.sdxl:
        text_encoder = CLIPTextModel(_text_config(config, tokenizer, config.cross_attention_dim))
        return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                "scheduler": _sd_scheduler()}
    # unequal widths, as SDXL's 768 and 1280: diffusers' single-file reader tells the two encoders apart by width
    first = config.cross_attention_dim // 4
    text_encoder = CLIPTextModel(_text_config(config, tokenizer, first))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(config, tokenizer, config.cross_attention_dim - first, projection_dim=config.projection_dim)
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": build_tokenizer(config.words), "scheduler": _sd_scheduler()}


def _text_config(config: TinyConfig, tokenizer: Any, width: int, **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 4,
        num_hidden_layers=config.text_layers, num_attention_heads=max(1, width // 16), max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _sd_scheduler() -> Any:
    """DDPM with Stable Diffusion 1.x's noise schedule (scaled_linear 0.00085..0.012, 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )


def save_components(components: dict[str, Any], directory: str | Path) -> Path:
    """Write components as a diffusers folder (model_index.json + one sub-folder each) loadable by diffusers'
    `StableDiffusionPipeline.from_pretrained` (`StableDiffusionXLPipeline` for SDXL components) and by
    `controlkit generate --base`."""
    from controlkit.sd_pipelines import pipeline_from_components

    pipeline = pipeline_from_components(components)
    pipeline.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)
