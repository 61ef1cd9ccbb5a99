"""VAE key layout: diffusers `AutoencoderKL` names -> original LDM `first_stage_model` names."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

_RESNET = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)$")
_RESAMPLER = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv$")
_MID_RESNET = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)$")
_MID_ATTENTION = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$")

_TOP_LEVEL: Mapping[str, str] = {
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}
# Current diffusers names first, then the pre-0.14 names older saved VAEs still use.
_ATTENTION_PARTS: Mapping[str, str] = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_RESNET_PARTS: Mapping[str, str] = {"conv_shortcut": "nin_shortcut"}


def vae_module_name(module: str, up_block_count: int) -> str | None:
    """The LDM path of one diffusers VAE module path, or None if the layout has no such module.

    LDM numbers decoder up blocks from the lowest resolution upwards, diffusers the other way.
    """
    if module in _TOP_LEVEL:
        return _TOP_LEVEL[module]
    if m := _RESNET.match(module):
        coder, direction, block, layer, part = m.groups()
        index = int(block) if direction == "down" else up_block_count - 1 - int(block)
        return f"{coder}.{direction}.{index}.block.{layer}.{_RESNET_PARTS.get(part, part)}"
    if m := _RESAMPLER.match(module):
        coder, direction, block, _ = m.groups()
        index = int(block) if direction == "down" else up_block_count - 1 - int(block)
        return f"{coder}.{direction}.{index}.{direction}sample.conv"
    if m := _MID_RESNET.match(module):
        coder, layer, part = m.groups()
        return f"{coder}.mid.block_{int(layer) + 1}.{_RESNET_PARTS.get(part, part)}"
    if (m := _MID_ATTENTION.match(module)) and m.group(2) in _ATTENTION_PARTS:
        return f"{m.group(1)}.mid.attn_1.{_ATTENTION_PARTS[m.group(2)]}"
    return None


def vae_to_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict to LDM keys (without `first_stage_model.`).

    The mid-block attention's linear q/k/v/out weights become 1x1 conv weights [C, C, 1, 1], as LDM
    stores them; every other tensor passes through unchanged. Raises `KeyError` on unknown keys.
    """
    up_block_count = len(config["up_block_types"])
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        name = vae_module_name(module, up_block_count)
        if name is None:
            unknown.append(key)
            continue
        is_attention_matrix = ".mid.attn_1." in name and param == "weight" and tensor.ndim == 2
        converted[f"{name}.{param}"] = tensor[:, :, None, None] if is_attention_matrix else tensor
    if unknown:
        raise KeyError(f"VAE keys with no LDM name: {sorted(unknown)[:10]} ({len(unknown)} in all)")
    return converted
