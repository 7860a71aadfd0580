"""Evaluating a ControlNet on paired data (ControlNet++'s protocol, what `controlkit eval` runs).

    >>> from controlkit import Control, load_base
    >>> from training.data.dataset import load_pairs
    >>> from training.evaluation import evaluate_controlnet
    >>> base = load_base("models/sd15")
    >>> control = Control.from_pretrained("runs/canny/final", None, unet=base.unet)
    >>> result = evaluate_controlnet(base, control, "canny", load_pairs("val/manifest.jsonl")[:100])
    >>> result.metric.name, len(result.keys), len(result.bad_pairs)
    ('edge_f1', 100, 0)

For each pair, the condition map (given, or computed from the image with the condition's preprocessor) is
brought to `resolution` as in training (short side resized, centre crop), one image is generated from it and
the caption, the image is re-annotated with the same preprocessor, and the two maps are compared with the
condition's metric (training/metrics.py). Bad pairs are skipped and returned, never fatal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlkit.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from controlkit.control import Control
    from training.data.sources import Pair
    from training.metrics import MetricResult

#: ControlNet++'s evaluation settings: its negative prompt (with UniPC and 20 steps).
DEFAULT_NEGATIVE_PROMPT = "worst quality, low quality"


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate_controlnet` measured.

    Attributes:
        metric: the controllability over the evaluated pairs (`per_image` in the order of `keys`); None when
            no pair could be evaluated.
        keys: the keys of the evaluated pairs, in input order.
        bad_pairs: (key, reason) of each skipped pair, in input order.
    """

    metric: MetricResult | None
    keys: list[str]
    bad_pairs: list[tuple[str, str]]


def evaluate_controlnet(
    base: Any,
    control: Control,
    condition: str,
    pairs: Sequence[Pair],
    *,
    resolution: int = 512,
    preprocessor_params: Mapping[str, Any] | None = None,
    steps: int = 20,
    guidance: float = 7.5,
    seed: int = 42,
    negative_prompt: str | None = DEFAULT_NEGATIVE_PROMPT,
    grid_folder: str | os.PathLike | None = None,
    progress: bool = True,
) -> Evaluation:
    """Generate one image per pair with `control` and score how well each follows its condition map.

    Args:
        base: a Stable Diffusion pipeline from `controlkit.load_base`.
        control: the ControlNet to evaluate (its `image` is replaced by each pair's map; its scale is kept).
        condition: the condition name, a key of `training.metrics.METRICS` ("canny", "depth", ...); its
            registry preprocessor computes missing maps and re-annotates the generated images.
        pairs: from `training.data.dataset.load_pairs`.
        resolution: side of the square condition and generated image, a multiple of 8.
        preprocessor_params: parameters of the preprocessor, over the ones stored with the ControlNet (those
            count only when its metadata names `condition` as its preprocessor).
        steps, guidance, seed, negative_prompt: generation settings, the same for every pair.
        grid_folder: also save `<index:05d>.png` there per evaluated pair: condition | generated, side by side.
        progress: show a progress bar on stderr (for two or more pairs).

    Raises:
        ConfigError: an unknown condition, bad preprocessor parameters or resolution.
        OutputError: `grid_folder` cannot be written (checked before the first generation).
    """
    from controlkit.pipeline import generate
    from training.data.dataset import PairedDataset, make_condition_fn
    from training.metrics import controllability, metric_spec

    metric_spec(condition)  # an unknown condition fails before anything runs
    if grid_folder is not None:
        from controlkit.files import check_output_folder

        check_output_folder(grid_folder, "grid_folder")
    params = {**_stored_params(control, condition), **(preprocessor_params or {})}
    missing_maps = any(pair.condition is None for pair in pairs)
    condition_fn = make_condition_fn(condition, params) if missing_maps else None
    dataset = PairedDataset(pairs, resolution=resolution, condition_fn=condition_fn, seed=seed)
    annotator = _annotator(condition, params)  # bad parameters fail before the first generation
    generated, conditions, keys = [], [], []
    for index in _progress(range(len(dataset)), enabled=progress):
        item = dataset[index]
        if item is None:
            continue
        condition_map = (item["conditioning_pixel_values"].permute(1, 2, 0) * 255).round().byte().numpy()
        result = generate(
            base, item["prompt"], [replace(control, image=condition_map)], negative_prompt=negative_prompt,
            steps=steps, guidance_scale=guidance, seed=seed,
        )
        generated.append(result.images[0])
        conditions.append(condition_map)
        keys.append(pairs[index].key)
        if grid_folder is not None:
            _save_grid(Path(grid_folder), len(keys) - 1, condition_map, result.images[0])
    bad_pairs = list(dataset.bad_pairs)
    if not generated:
        return Evaluation(metric=None, keys=[], bad_pairs=bad_pairs)
    metric = controllability(condition, generated, conditions, preprocessor=annotator)
    return Evaluation(metric=metric, keys=keys, bad_pairs=bad_pairs)


def _stored_params(control: Control, condition: str) -> dict[str, Any]:
    """The preprocessor parameters stored with the ControlNet, when it was trained on `condition`'s maps (a
    depth ControlNet's parameters mean nothing to the canny preprocessor)."""
    metadata = control.metadata
    if metadata is not None and metadata.preprocessor == condition:
        return dict(metadata.preprocessor_params)
    return {}


def _annotator(condition: str, params: dict[str, Any]) -> Any:
    from preprocessors.registry import get_preprocessor

    try:
        return get_preprocessor(condition, **params)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"preprocessor '{condition}': {error}") from None


def _progress(indices: range, *, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(indices, unit="pair", file=sys.stderr, disable=not enabled or len(indices) < 2)


def _save_grid(folder: Path, index: int, condition: np.ndarray, image: Any) -> None:
    """condition (R, R, 3) uint8 | the generated image (PIL), resized to the image's height."""
    import numpy as np

    from controlkit.files import atomic_path
    from controlkit.image import load_image, resize_to, to_pil

    picture = load_image(image)
    grid = np.concatenate([resize_to(condition, (picture.shape[1], picture.shape[0])), picture], axis=1)
    with atomic_path(folder / f"{index:05d}.png") as temporary:
        to_pil(grid).save(temporary, format="PNG")
