"""Send to txt2img: an infotext (this app's or A1111's) turned into txt2img's field values, the
way A1111's `parse_generation_parameters` fills its controls. Pure: the page applies the values,
the checkpoint and LoRA look-ups happen at the edge (`paste_params`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from webui.engine.flux_recipe import DISTILLED_CFG_KEY, HIRES_DISTILLED_CFG_KEY
from webui.engine.hires import UPSCALER_NAMES, HiresFix
from webui.engine.infotext import parse_infotext
from webui.engine.samplers import UnknownSamplerError, get_sampler

_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True)
class FieldValues:
    """txt2img's values read from an infotext. None: the text does not say (the control keeps its
    value); fields A1111 resets when absent (clip skip, variation, hires) carry its defaults."""

    prompt: str
    negative_prompt: str
    steps: int | None = None
    sampler: str | None = None
    cfg_scale: float | None = None
    distilled_cfg_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    clip_skip: int = 1
    subseed: int = -1
    subseed_strength: float = 0.0
    hires: HiresFix | None = None  # None: hires fix off
    model_hash: str | None = None
    model_name: str | None = None
    lora_hashes: tuple[tuple[str, str], ...] = ()  # (name, A1111's 12-digit autov3) each
    problems: tuple[str, ...] = ()  # values that could not be read, one line each


def fields_from_infotext(text: str) -> FieldValues:
    """The field values of an infotext; unreadable values are skipped and named in `problems`."""
    info = parse_infotext(text)
    params = info.params
    problems: list[str] = []

    def number(key: str, kind: type[int] | type[float]) -> int | float | None:
        raw = params.get(key)
        if raw is None:
            return None
        try:
            value = float(raw)
            return int(value) if kind is int else value
        except ValueError:
            problems.append(f"{key}: {raw!r} is not a number")
            return None

    width = height = None
    if "Size" in params:
        size = _SIZE.match(params["Size"])
        if size:
            width, height = int(size[1]), int(size[2])
        else:
            problems.append(f"Size: {params['Size']!r} is not WIDTHxHEIGHT")
    clip_skip = number("Clip skip", int)
    strength = number("Variation seed strength", float)
    subseed = number("Variation seed", int)
    return FieldValues(
        prompt=info.prompt,
        negative_prompt=info.negative_prompt,
        steps=number("Steps", int),  # type: ignore[arg-type]
        sampler=_sampler(params, "Sampler", problems),
        cfg_scale=number("CFG scale", float),
        distilled_cfg_scale=number(DISTILLED_CFG_KEY, float),
        seed=number("Seed", int),  # type: ignore[arg-type]
        width=width,
        height=height,
        clip_skip=int(clip_skip) if clip_skip is not None else 1,
        subseed=int(subseed) if subseed is not None else -1,
        subseed_strength=strength if strength is not None else 0.0,
        hires=_hires(params, number, problems),
        model_hash=params.get("Model hash") or None,
        model_name=params.get("Model") or None,
        lora_hashes=lora_hashes(params.get("Lora hashes", "")),
        problems=tuple(problems),
    )


def _sampler(params: Mapping[str, str], key: str, problems: list[str]) -> str | None:
    """A1111's sampler name with its separate `Schedule type` folded in (DPM++ 2M + Karras)."""
    name = params.get(key)
    if not name:
        return None
    try:
        return get_sampler(name, params.get("Schedule type", "")).name
    except UnknownSamplerError:
        problems.append(f"{key}: {name!r} is not a sampler this app has")
        return None


def _hires(params: Mapping[str, str], number, problems: list[str]) -> HiresFix | None:  # type: ignore[no-untyped-def]
    """Hires fix is on when any `Hires ...` key is written (A1111 writes `Hires upscale` or
    `Hires resize` with every hires image)."""
    if not any(key.startswith("Hires ") for key in params):
        return None
    defaults = HiresFix()
    resize_x = resize_y = 0
    if "Hires resize" in params:
        size = _SIZE.match(params["Hires resize"])
        if size:
            resize_x, resize_y = int(size[1]), int(size[2])
        else:
            problems.append(f"Hires resize: {params['Hires resize']!r} is not WIDTHxHEIGHT")
    upscaler = params.get("Hires upscaler", defaults.upscaler)
    known = {name.lower(): name for name in UPSCALER_NAMES}
    if upscaler.lower() not in known:
        problems.append(f"Hires upscaler: {upscaler!r} is not one this app has")
    scale = number("Hires upscale", float)
    steps = number("Hires steps", int)
    strength = number("Denoising strength", float)
    return HiresFix(
        scale=scale if scale is not None else defaults.scale,
        resize_x=resize_x,
        resize_y=resize_y,
        upscaler=known.get(upscaler.lower(), defaults.upscaler),
        steps=int(steps) if steps is not None else 0,
        denoising_strength=strength if strength is not None else defaults.denoising_strength,
        prompt=params.get("Hires prompt", ""),
        negative_prompt=params.get("Hires negative prompt", ""),
        sampler=_sampler(params, "Hires sampler", problems) or "",
        cfg_scale=number("Hires CFG Scale", float),
        distilled_cfg_scale=number(HIRES_DISTILLED_CFG_KEY, float),
    )


def lora_hashes(value: str) -> tuple[tuple[str, str], ...]:
    """A1111's `Lora hashes` value (`name: hash, name: hash`) as (name, hash) pairs."""
    pairs = []
    for part in value.split(","):
        name, sep, short = part.rpartition(":")
        if sep and name.strip() and short.strip():
            pairs.append((name.strip(), short.strip().lower()))
    return tuple(pairs)
