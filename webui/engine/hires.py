"""A1111's hires fix: the first pass's result upscaled (in latent space or as an image), then
denoised again as img2img with the same seeds. Pure parts here (settings, target size, the
upscalers, the img2img schedule); the engine runs the passes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Final

import torch
import torch.nn.functional as F
from PIL import Image

from webui.engine.request_error import RequestError
from webui.engine.samplers import UnknownSamplerError, get_sampler
from webui.settings import LIMITS, RequestLimits

LATENT_FACTOR: Final = 8  # pixels per latent cell (SD's VAE)
MAX_SIDE: Final = 2048  # the same bound as the first pass's width and height


@dataclass(frozen=True)
class Upscaler:
    """One of A1111's hires upscalers that need no weights: a latent interpolation (torch mode,
    antialias) or an image resampling filter."""

    name: str
    latent_mode: str | None = None
    antialias: bool = False
    resample: Image.Resampling | None = None

    @property
    def in_latent_space(self) -> bool:
        return self.latent_mode is not None


# A1111's `shared.latent_upscale_modes` and its weightless image upscalers, by name
UPSCALERS: Final = (
    Upscaler("Latent", "bilinear"),
    Upscaler("Latent (antialiased)", "bilinear", antialias=True),
    Upscaler("Latent (bicubic)", "bicubic"),
    Upscaler("Latent (bicubic antialiased)", "bicubic", antialias=True),
    Upscaler("Latent (nearest)", "nearest"),
    Upscaler("Latent (nearest-exact)", "nearest-exact"),
    Upscaler("Lanczos", resample=Image.Resampling.LANCZOS),
    Upscaler("Nearest", resample=Image.Resampling.NEAREST),
)
UPSCALER_NAMES: Final = tuple(u.name for u in UPSCALERS)


def get_upscaler(name: str) -> Upscaler:
    """The upscaler called `name` (case-insensitive); RequestError listing the known ones."""
    for upscaler in UPSCALERS:
        if upscaler.name.lower() == name.strip().lower():
            return upscaler
    raise RequestError(
        f"hr_upscaler: unknown upscaler {name!r}; known: {', '.join(UPSCALER_NAMES)}"
    )


@dataclass(frozen=True)
class HiresSize:
    """Where the first pass goes: upscaled to `upscaled`, then centre-cropped to `target`
    (the two differ only when both resize sides are given with another aspect ratio)."""

    upscaled: tuple[int, int]  # (width, height)
    target: tuple[int, int]


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires-fix fields. `resize_x`/`resize_y` (0: unset) win over `scale`; `steps` 0
    is the first pass's step count; empty `prompt`, `negative_prompt`, `sampler` and a None
    `cfg_scale` or `distilled_cfg_scale` (Forge's, for families with a distilled-guidance
    input; others ignore it) are the first pass's."""

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = "Latent"
    steps: int = 0
    denoising_strength: float = 0.7
    prompt: str = ""
    negative_prompt: str = ""
    sampler: str = ""
    cfg_scale: float | None = None
    distilled_cfg_scale: float | None = None

    def distilled_cfg(self, first_pass: float) -> float:
        """The second pass's Distilled CFG Scale: its own, else the first pass's."""
        return first_pass if self.distilled_cfg_scale is None else self.distilled_cfg_scale

    def size(self, width: int, height: int, multiple: int = LATENT_FACTOR) -> HiresSize:
        """A1111's target resolution (`calculate_target_resolution`), each side floored to a
        `multiple` (the family's size step: whole latent cells, or FLUX's 2x2 patches): the
        first pass (`width` x `height`) scaled, or resized to the given side(s)."""
        if not self.resize_x and not self.resize_y:
            up = (int(width * self.scale), int(height * self.scale))
            return HiresSize(_floored(up, multiple), _floored(up, multiple))
        if not self.resize_y:
            up = (self.resize_x, self.resize_x * height // width)
            return HiresSize(_floored(up, multiple), _floored(up, multiple))
        if not self.resize_x:
            up = (self.resize_y * width // height, self.resize_y)
            return HiresSize(_floored(up, multiple), _floored(up, multiple))
        # both sides: cover the box keeping the aspect ratio, then crop its centre
        if width / height < self.resize_x / self.resize_y:
            up = (self.resize_x, self.resize_x * height // width)
        else:
            up = (self.resize_y * width // height, self.resize_y)
        return HiresSize(_floored(up, multiple), _floored((self.resize_x, self.resize_y), multiple))

    def validate(self, width: int, height: int, limits: RequestLimits = LIMITS) -> None:
        """Raise RequestError naming the first hires field that is out of range."""
        most = limits.max_prompt_chars
        checks = [
            ("hr_scale", 1.0 <= self.scale <= 4.0, "must be between 1 and 4"),
            (
                "hr_resize_x",
                0 <= self.resize_x <= MAX_SIDE,
                f"must be 0 (unset) or up to {MAX_SIDE}",
            ),
            (
                "hr_resize_y",
                0 <= self.resize_y <= MAX_SIDE,
                f"must be 0 (unset) or up to {MAX_SIDE}",
            ),
            ("hr_second_pass_steps", 0 <= self.steps <= 150, "must be between 0 and 150"),
            (
                "denoising_strength",
                0.0 < self.denoising_strength <= 1.0,
                "must be above 0 and at most 1",
            ),
            ("hr_prompt", len(self.prompt) <= most, f"is too long: at most {most} characters"),
            (
                "hr_negative_prompt",
                len(self.negative_prompt) <= most,
                f"is too long: at most {most} characters",
            ),
            (
                "hr_cfg",
                self.cfg_scale is None or 0.0 <= self.cfg_scale <= 30.0,
                "must be between 0 and 30",
            ),
            (
                "hr_distilled_cfg",
                self.distilled_cfg_scale is None or 0.0 <= self.distilled_cfg_scale <= 30.0,
                "must be between 0 and 30",
            ),
        ]
        for name, ok, message in checks:
            if not ok:
                raise RequestError(f"{name} {message}")
        get_upscaler(self.upscaler)
        if self.sampler:
            try:
                get_sampler(self.sampler)
            except UnknownSamplerError as exc:
                raise RequestError(f"hr_sampler_name: {exc}") from exc
        size = self.size(width, height)
        for side in (*size.upscaled, *size.target):
            if not LATENT_FACTOR <= side <= 2 * MAX_SIDE:
                raise RequestError(
                    f"hires size {size.target[0]}x{size.target[1]} is out of range "
                    f"(each side {LATENT_FACTOR}..{MAX_SIDE})"
                )
        if max(size.target) > MAX_SIDE:
            raise RequestError(
                f"hires size {size.target[0]}x{size.target[1]} is too large: at most "
                f"{MAX_SIDE} a side"
            )


def _floored(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """A size floored to a multiple of `multiple` (at least one)."""
    return tuple(max(side // multiple, 1) * multiple for side in size)  # type: ignore[return-value]


def _crop_box(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred `target` inside `size`."""
    left, top = (size[0] - target[0]) // 2, (size[1] - target[1]) // 2
    return left, top, left + target[0], top + target[1]


def upscale_latents(latents: torch.Tensor, upscaler: Upscaler, size: HiresSize) -> torch.Tensor:
    """The first pass's latents (batch, channels, h, w) interpolated to `size` (A1111's latent
    upscalers: `torch.nn.functional.interpolate` with the named mode), then cropped."""
    assert upscaler.latent_mode is not None
    cells = (size.upscaled[1] // LATENT_FACTOR, size.upscaled[0] // LATENT_FACTOR)
    resized = F.interpolate(
        latents.float(), size=cells, mode=upscaler.latent_mode, antialias=upscaler.antialias
    ).to(latents.dtype)
    box = [side // LATENT_FACTOR for side in _crop_box(size.upscaled, size.target)]
    return resized[:, :, box[1] : box[3], box[0] : box[2]]


def upscale_image(image: Image.Image, upscaler: Upscaler, size: HiresSize) -> Image.Image:
    """A decoded first-pass image resized with the upscaler's filter, then cropped."""
    assert upscaler.resample is not None
    resized = image.resize(size.upscaled, resample=upscaler.resample)
    return resized.crop(_crop_box(size.upscaled, size.target))


class StrengthRounding(Enum):
    """How an img2img pipeline turns `strength` of a `total`-step schedule into steps run."""

    STEPS_FLOORED = "steps"  # diffusers' SD img2img: the last int(total * strength) steps
    START_FLOORED = "start"  # flow-matching img2img (FLUX.1): from step int(total - total * s)


@dataclass(frozen=True)
class SecondPassSchedule:
    """diffusers' img2img arguments that run exactly `steps` steps at the denoising strength."""

    num_inference_steps: int
    strength: float
    steps: int


def second_pass_schedule(
    steps: int,
    denoising_strength: float,
    rounding: StrengthRounding = StrengthRounding.STEPS_FLOORED,
) -> SecondPassSchedule:
    """A1111 runs the hires pass for exactly `steps` steps, taken from a schedule of
    `steps / strength` (its `setup_img2img_steps` when steps are given); the strength passed
    is half a step off `steps / total`, on the side the pipeline's rounding makes `steps`."""
    total = max(math.floor(steps / min(denoising_strength, 0.999)), steps)
    half = 0.5 if rounding is StrengthRounding.STEPS_FLOORED else -0.5
    return SecondPassSchedule(total, min(1.0, (steps + half) / total), steps)


def hires_fields(hires: HiresFix, prompt: str, negative_prompt: str) -> dict[str, str]:
    """The infotext fields A1111 writes for a hires fix (Forge's `Hires CFG Scale`); the hires
    prompts only when they differ from the first pass's, as A1111 writes them."""
    fields = {"Denoising strength": f"{hires.denoising_strength:g}"}
    if hires.resize_x or hires.resize_y:
        fields["Hires resize"] = f"{hires.resize_x}x{hires.resize_y}"
    else:
        fields["Hires upscale"] = f"{hires.scale:g}"
    if hires.steps:
        fields["Hires steps"] = str(hires.steps)
    fields["Hires upscaler"] = get_upscaler(hires.upscaler).name
    if hires.sampler:
        fields["Hires sampler"] = get_sampler(hires.sampler).name
    if hires.cfg_scale is not None:
        fields["Hires CFG Scale"] = f"{hires.cfg_scale:g}"
    if hires.prompt and hires.prompt != prompt:
        fields["Hires prompt"] = hires.prompt
    if hires.negative_prompt and hires.negative_prompt != negative_prompt:
        fields["Hires negative prompt"] = hires.negative_prompt
    return fields
