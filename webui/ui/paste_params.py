"""Send to txt2img (from PNG Info, the gallery, or the prompt box's ↙️ button): an infotext's
values put into txt2img's controls, the checkpoint picked by its A1111 short hash, and a warning
for each checkpoint or LoRA it names that this app does not have."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from webui.engine.generate import Engine
from webui.networks.format import NetworkFileError, compute_hashes
from webui.networks.library import NetworkEntry
from webui.ui.infotext_fields import FieldValues, fields_from_infotext

# the order of `paste_updates`' values (and of the controls `Txt2ImgControls.paste_targets`)
PASTE_FIELDS = (
    *("prompt", "negative_prompt", "steps", "sampler", "cfg_scale", "distilled_cfg_scale"),
    *("seed", "width", "height", "clip_skip", "extra_seed", "subseed", "subseed_strength"),
    *("enable_hr", "hr_upscaler", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_steps"),
    *("denoising_strength", "hr_cfg", "hr_sampler", "hr_prompt", "hr_negative_prompt"),
    "hr_distilled_cfg",
)
SAME_SAMPLER = "Use same sampler"  # A1111's hires sampler choice meaning the first pass's


@dataclass(frozen=True)
class Pasted:
    """What a paste changes: one update per `PASTE_FIELDS`, the checkpoint to select (None:
    keep the loaded one), and warnings for the page."""

    updates: list[Any]
    checkpoint: str | None
    warnings: list[str]


def _value(value: Any) -> Any:
    return gr.update() if value is None else gr.update(value=value)


def paste_updates(values: FieldValues) -> list[Any]:
    """The controls' updates, in `PASTE_FIELDS` order; a field the text does not give is kept."""
    hr = values.hires
    first = [
        values.prompt,
        values.negative_prompt,
        values.steps,
        values.sampler,
        values.cfg_scale,
        values.distilled_cfg_scale,
        values.seed,
        values.width,
        values.height,
        values.clip_skip,
        values.subseed_strength != 0,  # A1111 opens "Extra" for a variation seed
        values.subseed,
        values.subseed_strength,
        hr is not None,
    ]
    hires = (
        [
            hr.upscaler,
            hr.scale,
            hr.resize_x,
            hr.resize_y,
            hr.steps,
            hr.denoising_strength,
            hr.cfg_scale if hr.cfg_scale is not None else values.cfg_scale,  # None: first pass's
            hr.sampler or SAME_SAMPLER,
            hr.prompt,
            hr.negative_prompt,
            hr.distilled_cfg_scale
            if hr.distilled_cfg_scale is not None
            else values.distilled_cfg_scale,  # None: first pass's
        ]
        if hr is not None
        else [None] * 11
    )
    return [_value(v) for v in [*first, *hires]]


def find_checkpoint(engine: Engine, values: FieldValues) -> tuple[str | None, str | None]:
    """(the checkpoint in `models/` with the infotext's `Model hash`, else its `Model` name;
    a warning when neither is there). No model named: (None, None)."""
    if not values.model_hash and not values.model_name:
        return None, None
    checkpoints = engine.checkpoints()
    if values.model_hash:
        wanted = values.model_hash.lower()
        for checkpoint in checkpoints:
            if (engine.hashes.model_hash(checkpoint.path) or "") == wanted:
                return checkpoint.name, None
    for checkpoint in checkpoints:
        if values.model_name and checkpoint.path.stem == values.model_name:
            return checkpoint.name, None
    named = values.model_name or "?"
    hashed = f" (hash {values.model_hash})" if values.model_hash else ""
    return None, (
        f"checkpoint {named}{hashed} is not in {engine.settings.models_dir}; "
        "the loaded model is kept"
    )


def missing_loras(
    pairs: Iterable[tuple[str, str]], entries: Iterable[NetworkEntry], folder: str
) -> list[str]:
    """A warning for each (name, autov3 short hash) of `Lora hashes` with no file in `loras/`
    by that name, alias or hash; a file found by hash only (renamed) is named instead."""
    listed = list(entries)
    notes = []
    for name, short in pairs:
        names = {e.name.lower() for e in listed} | {e.path.stem.lower() for e in listed}
        names |= {(e.alias or "").lower() for e in listed}
        if name.lower() in names:
            continue
        by_hash = [e for e in listed if short and (_autov3(e) or "").startswith(short)]
        if by_hash:
            notes.append(
                f"LoRA {name} is in {folder} as {by_hash[0].name} (same hash {short}); "
                f"change the prompt's tag to <lora:{by_hash[0].name}:...>"
            )
        else:
            notes.append(f"LoRA {name} (hash {short}) is not in {folder}")
    return notes


def _autov3(entry: NetworkEntry) -> str | None:
    """The entry's autov3, hashing the file now when the catalog has not yet."""
    if entry.autov3:
        return entry.autov3.lower()
    try:
        autov3 = compute_hashes(entry.path).autov3
    except (OSError, ValueError, NetworkFileError):
        return None
    return autov3.lower() if autov3 else None


def paste(engine: Engine, text: str) -> Pasted:
    """Everything a paste of `text` changes."""
    values = fields_from_infotext(text)
    checkpoint, model_warning = find_checkpoint(engine, values)
    warnings = [model_warning] if model_warning else []
    if values.lora_hashes:
        engine.catalog.refresh()
        folder = str(engine.settings.loras_dir)
        warnings += missing_loras(values.lora_hashes, engine.catalog.index.entries(), folder)
    warnings += list(values.problems)
    return Pasted(paste_updates(values), checkpoint, warnings)
