"""Whole-checkpoint layout: diffusers components -> one original (LDM / SGM) single-file state dict."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from webui.arch import Arch
from webui.layouts.text_encoders import clip_to_ldm, open_clip_to_ldm
from webui.layouts.unet import unet_to_ldm
from webui.layouts.vae import vae_to_ldm

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_Converter = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ComponentSlot:
    """Where one diffusers component lives in a single file, and how its keys are renamed."""

    prefix: str
    convert: _Converter
    needs_config: bool = False


def _clip(
    state_dict: Mapping[str, torch.Tensor], _config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    return clip_to_ldm(state_dict)


def _open_clip(
    state_dict: Mapping[str, torch.Tensor], _config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    return open_clip_to_ldm(state_dict)


_UNET = ComponentSlot(UNET_PREFIX, unet_to_ldm, needs_config=True)
_VAE = ComponentSlot(VAE_PREFIX, vae_to_ldm, needs_config=True)

SLOTS: Mapping[Arch, Mapping[str, ComponentSlot]] = {
    Arch.SD1: {
        "unet": _UNET,
        "vae": _VAE,
        "text_encoder": ComponentSlot("cond_stage_model.", _clip),
    },
    Arch.SD2: {
        "unet": _UNET,
        "vae": _VAE,
        "text_encoder": ComponentSlot("cond_stage_model.", _open_clip),
    },
    Arch.SDXL: {
        "unet": _UNET,
        "vae": _VAE,
        "text_encoder": ComponentSlot("conditioner.embedders.0.", _clip),
        "text_encoder_2": ComponentSlot("conditioner.embedders.1.", _open_clip),
    },
}


def to_single_file(
    components: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, Mapping[str, Any]],
    arch: Arch,
    *,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Combine diffusers component state dicts into one checkpoint in the original key layout.

    `components` is keyed "unet", "vae", "text_encoder", "text_encoder_2" (absent ones are skipped);
    `configs` needs "unet" and "vae" configs when those are given (other entries are ignored).
    `extra` holds original-file tensors the conversion does not produce (SD2's 24th text layer,
    `logit_scale`, ...): they are copied where no converted key has the same name.
    Tensors are shared with the inputs where no reshaping is needed.
    """
    slots = SLOTS[arch]
    unexpected = sorted(set(components) - set(slots))
    if unexpected:
        raise ValueError(f"{arch.label} checkpoints have no place for components {unexpected}")
    checkpoint: dict[str, torch.Tensor] = {}
    for name, slot in slots.items():
        if name not in components:
            continue
        if slot.needs_config and name not in configs:
            raise ValueError(f"converting the {name} needs its diffusers config")
        converted = slot.convert(components[name], configs.get(name, {}))
        checkpoint.update({slot.prefix + key: tensor for key, tensor in converted.items()})
    for key, tensor in (extra or {}).items():
        checkpoint.setdefault(key, tensor)
    return checkpoint
