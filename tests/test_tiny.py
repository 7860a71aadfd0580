"""controlkit.tiny: the word-level tokenizer of the tiny and demo models, and the demo architecture."""

from __future__ import annotations

import re

import pytest

from controlkit.tiny import DEFAULT_WORDS, DEMO_CONFIG, build_components, build_tokenizer, tokenizer_files


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_every_listed_word_is_one_token(tokenizer):
    split = {word: tokenizer.tokenize(word) for word in DEFAULT_WORDS if len(tokenizer.tokenize(word)) != 1}
    assert not split


def test_toy_world_captions_read_one_token_per_word(tokenizer):
    from controlkit.demo.toyworld.world import render_circles, render_figure, render_scene

    for seed in range(60):
        for sample in (render_scene(seed), render_figure(seed), render_circles(seed)):
            words = re.findall(r"[a-z]+|,", sample.caption)
            assert tokenizer.tokenize(sample.caption) == [f"{word}</w>" for word in words], sample.caption


def test_words_whose_pieces_are_other_words_stay_whole():
    """Merges built word by word let "an" split "cyan" (cy + an); learned merges keep such words whole."""
    tokenizer = build_tokenizer(["an", "cyan", "orange", "on", "person", "standing", "and"])
    assert [tokenizer.tokenize(word) for word in ("cyan", "orange", "person", "standing")] == [
        ["cyan</w>"], ["orange</w>"], ["person</w>"], ["standing</w>"]]


def test_other_text_is_spelled_out_and_never_unknown(tokenizer):
    ids = tokenizer("a zebra, 42 quick foxes!", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids).replace(" ", "") == "azebra,42quickfoxes!"


def test_vocabulary_and_merges_are_deterministic():
    assert tokenizer_files(DEFAULT_WORDS) == tokenizer_files(reversed(DEFAULT_WORDS))


def test_demo_architecture_sizes():
    components = build_components(DEMO_CONFIG)
    unet, vae = components["unet"], components["vae"]
    assert unet.config.block_out_channels == (32, 64, 96) and unet.config.norm_num_groups == 8
    assert vae.config.norm_num_groups == 4 and 2 ** (len(vae.config.block_out_channels) - 1) == 4
    assert sum(p.numel() for p in unet.parameters()) < 3_000_000
