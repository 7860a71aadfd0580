"""Controls: what one ControlNet adds to a generation, and the summed residuals all of them feed the U-Net.

A `Control` pairs a condition image with a ControlNet and says how strongly, when, and on which side of
classifier-free guidance it acts. The three modes follow the reference (anchors B.2):

- ``balanced``: every one of the ControlNet's outputs (12 skip residuals and the middle one for SD1.x) is
  multiplied by `scale`, on both guidance sides. This is diffusers' default.
- ``prompt`` ("my prompt is more important"): soft per-layer scales ``scale * 0.825 ** (N - 1 - i)``, from about
  0.1 on the first (highest-resolution) output to 1 on the middle one, on both guidance sides.
- ``control`` ("ControlNet is more important"): the same soft scales, on the conditional side only; the
  ControlNet then runs on the conditional half of the batch only. This is the reference's guess mode
  (diffusers' ``guess_mode=True`` uses ``torch.logspace(-1, 0, N)``, i.e. 0.1 ** ((N - 1 - i) / (N - 1))).

Explicit `layer_weights` replace the mode's per-layer profile. ControlNets with global pooling (1.1 shuffle)
keep flat scales and act on the conditional side only, as in the reference demos and diffusers.

Speed (own code, each piece tested against diffusers): the conditioning encoder runs once per generation, not
once per step (the rest of the ControlNet runs in `controlkit.controlnet_forward`, which only reads the model, so
one ControlNet can serve several generations at once); a ControlNet outside its start/end window or with all
scales 0 is not run at all.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from controlkit.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from controlkit.controlnet import ConditionMetadata

MODES = ("balanced", "prompt", "control")
RESIZE_MODES = ("resize", "crop", "fill")
#: Per-layer decay of the soft modes: layer i of N gets SOFT_DECAY ** (N - 1 - i). The reference's guess mode
#: (lllyasviel/ControlNet gradio apps) uses 0.825: for SD1.x's 13 outputs the first gets 0.825 ** 12 = 0.099,
#: just under a tenth (0.826 ** 12 is just over), as diffusers' logspace(-1, 0, 13) starts at exactly 0.1.
SOFT_DECAY = 0.825
#: Largest control `scale` and layer weight. The reference UIs offer 0-2; residuals grow linearly with the scale,
#: and far past a few the U-Net's features are swamped (a gray or NaN image after the whole run), so 10 bounds a
#: typo (a missing decimal point) without refusing any setting that makes sense.
MAX_SCALE = 10.0
#: The options `check_control_options` checks, with the defaults of `Control`.
OPTION_DEFAULTS = {"scale": 1.0, "start": 0.0, "end": 1.0, "mode": "balanced", "layer_weights": None}


@dataclass
class Control:
    """One ControlNet with its condition image and how it is applied.

    Args:
        image: the condition map (anything `controlkit.image.load_image` accepts), or a photo when
            `preprocessor` is given.
        controlnet: a diffusers `ControlNetModel` made for the base U-Net.
        scale: overall strength in [0, `MAX_SCALE`] (the reference's "control strength"; 0 switches it off).
        start: fraction of the denoising steps after which the control starts acting, in [0, 1).
        end: fraction of the steps after which it stops, in (start, 1].
        mode: "balanced", "prompt" or "control" (see the module docstring).
        layer_weights: optional per-output weights (13 for SD1.x: 12 skip outputs from high to low resolution,
            then the middle block), each in [0, `MAX_SCALE`]; they replace the mode's per-layer profile and are
            multiplied by `scale`.
        preprocessor: a callable photo -> condition map (e.g. a `preprocessors` entry); None when `image`
            already is the map.
        conditional_only: apply this control on the conditional side of guidance only (implied by
            mode "control" and by ControlNets with global pooling).
        metadata: the condition metadata read with the checkpoint (informational; set by `from_pretrained`).
        control_type: for a ControlNet-Union model, which of its types the image is (a name in
            `controlkit.union.UNION_TYPES`: openpose, depth, softedge, canny, lineart, normal, segment, tile, ...);
            None for every other ControlNet.
        every: step reuse. An integer k in 1..`MAX_EVERY`: the ControlNet runs on the first step of its window and
            on every k-th step after it, and the steps between reuse its last residuals (1: every step, the
            default). Or a schedule: the 0-based step indices at which it runs (its window's first step always
            does). Each reused step saves the ControlNet's share of the step time, at a measured cost in control.
    """

    image: Any
    controlnet: ControlNetModel
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    layer_weights: Sequence[float] | None = None
    preprocessor: Callable[[Any], Any] | None = None
    conditional_only: bool = False
    metadata: ConditionMetadata | None = field(default=None, repr=False)
    control_type: str | None = None
    every: int | Sequence[int] = 1

    def __post_init__(self) -> None:
        self.every = check_every(self.every)
        from controlkit.union import is_union, union_type_index

        if is_union(self.controlnet):
            union_type_index(self.control_type, self.controlnet)
        elif self.control_type is not None:
            raise ConfigError(f"control `control_type` {self.control_type!r} is for ControlNet-Union models; this "
                              "ControlNet takes one kind of map: leave it out")
        if self.layer_weights is not None and isinstance(self.layer_weights, Iterable):
            self.layer_weights = list(self.layer_weights)  # once: an iterator would be used up by the checks
        check_control_options(self.scale, self.start, self.end, self.mode, self.layer_weights)
        if self.layer_weights is not None:
            weights = self.layer_weights
            expected = num_control_layers(self.controlnet)
            if len(weights) != expected:
                raise ConfigError(
                    f"control `layer_weights` must be {expected} finite numbers (one per ControlNet output), got "
                    f"{len(weights)}"
                )
            self.layer_weights = weights

    @classmethod
    def from_pretrained(
        cls,
        source: Any,
        image: Any,
        *,
        unet: UNet2DConditionModel | None = None,
        torch_dtype: torch.dtype | None = None,
        **options: Any,
    ) -> Control:
        """Load a ControlNet (a diffusers folder or file, an original-format checkpoint, or a demo name such as
        "demo:canny") with its metadata.

        Example:
            >>> control = Control.from_pretrained("controlnet-canny/", "edges.png", unet=base.unet, scale=0.8,
            ...                                   mode="prompt")

        With `unet` (the base's U-Net) the ControlNet is checked against it and loaded on its device in its dtype,
        as `controlkit.pipeline.generate` requires; without, it stays on the CPU in the stored dtype. `options`
        are the other fields of `Control`; `conditional_only` defaults to what the checkpoint's condition
        metadata says.
        """
        from controlkit.checkpoint import load_controlnet
        from controlkit.weights import resolve_model_name

        check_control_options(**{key: options.get(key, value) for key, value in OPTION_DEFAULTS.items()})  # first
        controlnet, metadata = load_controlnet(resolve_model_name(source, "controlnet"), unet=unet,
                                               torch_dtype=torch_dtype)
        options.setdefault("conditional_only", bool(metadata is not None and metadata.conditional_only))
        return cls(image, controlnet, metadata=metadata, **options)

    @property
    def global_pooling(self) -> bool:
        return bool(getattr(self.controlnet.config, "global_pool_conditions", False))

    @property
    def conditional_side_only(self) -> bool:
        """True when the control acts on the conditional half of classifier-free guidance only."""
        return self.mode == "control" or self.conditional_only or self.global_pooling

    def layer_profile(self) -> list[float]:
        """The per-output weights before `scale` (skip outputs high to low resolution, then the middle): the
        `layer_weights`, else the mode's profile."""
        count = num_control_layers(self.controlnet)
        if self.layer_weights is not None:
            return [float(w) for w in self.layer_weights]
        if self.mode != "balanced" and not self.global_pooling:
            return [SOFT_DECAY ** (count - 1 - i) for i in range(count)]
        return [1.0] * count

    def layer_scales(self) -> list[float]:
        """The multiplier of each ControlNet output (skip outputs high to low resolution, then the middle)."""
        return [w * float(self.scale) for w in self.layer_profile()]

    def active_at(self, step: int, num_steps: int) -> bool:
        """Whether step `step` (0-based) of `num_steps` lies in the start/end window (diffusers' rule)."""
        return not (step / num_steps < self.start or (step + 1) / num_steps > self.end)

    def runs_at(self, step: int, num_steps: int) -> bool:
        """Whether the ControlNet runs at an active `step` or reuses its last residuals (`every`)."""
        first = next((s for s in range(num_steps) if self.active_at(s, num_steps)), step)
        if step == first:
            return True
        if isinstance(self.every, int):
            return (step - first) % self.every == 0
        return step in self.every


def num_control_layers(controlnet: ControlNetModel) -> int:
    """Outputs of a ControlNet: one per U-Net skip connection plus the middle block (13 for SD1.x)."""
    return len(controlnet.controlnet_down_blocks) + 1


def check_placement(
    module: ControlNetModel, device: torch.device, dtype: torch.dtype, name: str = "ControlNet"
) -> None:
    """Raise ConfigError unless `module` is on the base's `device` in its `dtype`.

    Generation does not move or convert it: that would change the caller's object behind their back (and
    under any other thread using it), and a converted copy per call would cost its size in memory each time.
    """
    if module.device == device and module.dtype == dtype:
        return
    dtype_name = str(dtype).replace("torch.", "")
    raise ConfigError(
        f"{name} is {str(module.dtype).replace('torch.', '')} on {module.device} but the base is {dtype_name} on "
        f"{device}; load it with Control.from_pretrained(..., unet=base.unet) or load_controlnet(..., "
        f"unet=base.unet), or call controlnet.to('{device}', torch.{dtype_name}) before generating"
    )


def fit_image(image: np.ndarray, size: tuple[int, int], mode: str = "resize") -> np.ndarray:
    """Bring a uint8 (H, W, C) image (RGB, or a masked map's RGBA) to `size` = (width, height).

    Modes (A1111's names in brackets): "resize" stretches [Just Resize]; "crop" scales to cover the target and
    cuts the centre [Crop and Resize]; "fill" scales to fit inside and pads with the median border colour
    [Resize and Fill].
    """
    from controlkit.image import resize_to

    if mode not in RESIZE_MODES:
        raise ConfigError(f"`resize_mode` must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    width, height = size
    old_height, old_width = image.shape[:2]
    if (old_width, old_height) == (width, height) or mode == "resize":
        return resize_to(image, (width, height))
    factor = (max if mode == "crop" else min)(width / old_width, height / old_height)
    inner_w, inner_h = max(1, round(old_width * factor)), max(1, round(old_height * factor))
    scaled = resize_to(image, (inner_w, inner_h))
    if mode == "crop":
        top, left = (inner_h - height) // 2, (inner_w - width) // 2
        return np.ascontiguousarray(scaled[top : top + height, left : left + width])
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]], axis=0)
    canvas = np.empty((height, width, image.shape[2]), dtype=np.uint8)
    canvas[:] = np.median(border, axis=0).astype(np.uint8)
    top, left = (height - inner_h) // 2, (width - inner_w) // 2
    canvas[top : top + inner_h, left : left + inner_w] = scaled
    return canvas


def condition_tensor(images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """Condition map(s) to the models' input convention: float32 (B, 3, H, W) in [0, 1].

    Maps are RGB uint8 (H, W, 3), or (H, W, 4) with a masked region (`controlkit.image.load_condition`: alpha
    below `MASK_ALPHA`), whose pixels become -1 in every channel: ControlNet 1.1's inpaint condition.
    """
    import torch

    from controlkit.image import MASK_ALPHA

    batch = np.stack([images] if isinstance(images, np.ndarray) else list(images))
    pixels = torch.from_numpy(np.ascontiguousarray(batch[..., :3])).permute(0, 3, 1, 2).float().div(255.0)
    if batch.shape[-1] == 4:
        masked = torch.from_numpy(batch[..., 3] < MASK_ALPHA)[:, None].expand_as(pixels)
        pixels = pixels.masked_fill(masked, -1.0)
    return pixels


@dataclass
class PreparedControl:
    """A control ready for the denoising loop: the condition embedding computed once and the scales fixed.

    Attributes:
        control: the user's spec.
        embedding: output of the ControlNet's conditioning encoder, (N, C, h, w) at latent size, N the batch
            the ControlNet runs on (or 1, broadcast over it). For a Union model, the condition pixels
            (1, 3, H, W) in [0, 1]: its encoder runs inside its forward (`controlkit.union`).
        scales: one multiplier per ControlNet output.
        reused: the controls that shared this control's last forward and the residuals it gave, for the steps
            that reuse them (`Control.every`).
        compiled, scale_tensor: with `generate(..., compile=True)`, the ControlNet's compiled forward
            (`controlkit.compiled`) and the scales as a float32 (N,) tensor it takes.
    """

    control: Control
    embedding: torch.Tensor
    scales: list[float]
    reused: tuple[tuple[int, ...], list[torch.Tensor]] | None = None
    compiled: Any = None
    scale_tensor: torch.Tensor | None = None


def prepare_control(
    control: Control, condition: np.ndarray, device: Any, dtype: torch.dtype, batch: int = 1
) -> PreparedControl:
    """Run the conditioning encoder once on the condition map (RGB uint8 at output size).

    The encoder (Zhang et al. 2302.05543: "a tiny network ... to encode an image-space condition to a
    feature space conditioning vector") does not depend on the step, so computing it per step repeats work.
    The ControlNet's weights must already be on `device` in `dtype`; the model is only read. `batch`: the batch
    the ControlNet runs on (2B with guidance on both sides, else B): the map is encoded repeated to it, as
    diffusers encodes it, because a convolution's rounding can depend on the batch size (oneDNN picks its
    kernels by shape), and the result then equals diffusers' bit for bit.
    """
    import torch

    from controlkit.union import is_union

    controlnet = control.controlnet
    order = controlnet.config.controlnet_conditioning_channel_order
    if order not in ("rgb", "bgr"):
        raise ConfigError(f"unknown `controlnet_conditioning_channel_order` {order!r}; expected 'rgb' or 'bgr'")
    pixels = condition_tensor(condition).to(device=device, dtype=dtype)
    if order == "bgr":  # as diffusers' forward does to `controlnet_cond`, before the encoder
        pixels = torch.flip(pixels, dims=[1])
    if is_union(controlnet):
        return PreparedControl(control, pixels, control.layer_scales())
    embedding = controlnet.controlnet_cond_embedding(pixels.repeat(batch, 1, 1, 1))
    return PreparedControl(control, embedding, control.layer_scales())


#: Largest step-reuse interval: past a handful of steps the residuals are those of a far noisier latent.
MAX_EVERY = 50


def check_every(every: Any, what: str = "control `every`") -> int | frozenset[int]:
    """`every` as an int in 1..`MAX_EVERY`, or a schedule of step indices as a frozenset; else ConfigError."""
    if isinstance(every, numbers.Integral) and not isinstance(every, bool):
        return check_integer(every, what, 1, MAX_EVERY)
    if isinstance(every, (str, bytes)) or not isinstance(every, Iterable):
        raise ConfigError(f"{what} must be an integer in 1..{MAX_EVERY} or a list of step indices, got {every!r}")
    steps = list(every)
    for step in steps:
        check_integer(step, f"{what} steps", 0, 998)
    return frozenset(steps)


def check_control_options(
    scale: Any, start: Any, end: Any, mode: Any, layer_weights: Sequence[Any] | None = None, *,
    prefix: str = "control ",
) -> None:
    """Raise ConfigError (one line: the option, its allowed range, the value) unless every option of a `Control`
    is in range; `prefix` is how the message names the control (the CLI passes "control NAME: ")."""
    if mode not in MODES:
        raise ConfigError(f"{prefix}`mode` must be one of {', '.join(MODES)}, got {mode!r}")
    check_number(scale, f"{prefix}`scale`", 0.0, MAX_SCALE)
    if not (_is_finite_number(start) and _is_finite_number(end) and 0.0 <= start < end <= 1.0):
        raise ConfigError(
            f"{prefix}`start` and `end` must satisfy 0 <= start < end <= 1, got start={start!r}, end={end!r}"
        )
    if layer_weights is None:
        return
    if isinstance(layer_weights, (str, bytes)) or not isinstance(layer_weights, Iterable):
        raise ConfigError(f"{prefix}`layer_weights` must be a list of numbers, got {layer_weights!r}")
    for weight in list(layer_weights):
        check_number(weight, f"{prefix}`layer_weights`", 0.0, MAX_SCALE)


def check_number(value: Any, what: str, low: float, high: float | None = None, *, low_open: bool = False) -> float:
    """`value` as a float if it is a real number (not a bool, not NaN or inf) in [low, high] ((low, high] with
    `low_open`; no upper end when `high` is None); else ConfigError naming `what` and the range."""
    real = _is_finite_number(value)
    above = real and (value > low if low_open else value >= low)
    if not (above and (high is None or value <= high)):
        if high is None:
            span = f"{'>' if low_open else '>='} {low:g}"
        else:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise ConfigError(f"{what} must be a finite number {span}, got {value!r}")
    return float(value)


def check_integer(value: Any, what: str, low: int, high: int, hint: str = "") -> int:
    """`value` if it is an integer (not a bool) in low..high; else ConfigError naming `what`, the range and `hint`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ConfigError(f"{what} must be an integer in {low}..{high}, got {value!r}{hint}")
    return int(value)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
