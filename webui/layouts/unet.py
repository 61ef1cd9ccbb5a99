"""UNet key layout: diffusers `UNet2DConditionModel` names <-> original LDM/SGM `diffusion_model` names.

The map is derived from the diffusers config alone (no model is built), so it serves SD1, SD2, SDXL
and the tiny test UNets the same way. Kohya LoRA names ("lora_unet_input_blocks_1_1_proj_in") are
these LDM module paths with dots turned into underscores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# LDM's ResBlock keeps its layers in nn.Sequentials; these are the indices that hold parameters.
_RESNET_PARTS: Mapping[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
}
_SHORTCUT = ("conv_shortcut", "skip_connection")
_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class ResnetShape:
    """One ResNet block: whether it needs a 1x1 shortcut because its channel count changes."""

    has_shortcut: bool


@dataclass(frozen=True)
class TransformerShape:
    """One spatial transformer: how many `BasicTransformerBlock`s it stacks."""

    depth: int


@dataclass(frozen=True)
class LayerShape:
    """One resnet, optionally followed by its attention, inside a down/up block."""

    resnet: ResnetShape
    attention: TransformerShape | None


@dataclass(frozen=True)
class BlockShape:
    """A diffusers down or up block: its layers and whether it ends with a resampler."""

    layers: tuple[LayerShape, ...]
    has_resampler: bool


@dataclass(frozen=True)
class UNetShape:
    """The parts of a UNet config that decide which parameters exist and where they live."""

    down: tuple[BlockShape, ...]
    mid_attention_depth: int
    up: tuple[BlockShape, ...]
    has_class_embedding: bool
    has_add_embedding: bool


def _per_block(value: Any, count: int) -> list[Any]:
    """Broadcast an int config entry to one entry per block (diffusers accepts both)."""
    if isinstance(value, int):
        return [value] * count
    return list(value)


def _depth(entry: int | Sequence[int], layer: int) -> int:
    """Transformer depth of one layer; entries may be per block (int) or per layer (sequence)."""
    return entry if isinstance(entry, int) else int(entry[layer])


def unet_shape(config: Mapping[str, Any]) -> UNetShape:
    """Read the structural facts of a diffusers `UNet2DConditionModel` config (defaults as diffusers)."""
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(
            f"unsupported mid_block_type {mid_type!r}: SD UNets use UNetMidBlock2DCrossAttn"
        )
    down_types: list[str] = list(config.get("down_block_types", ()))
    up_types: list[str] = list(config.get("up_block_types", ()))
    channels: list[int] = list(config["block_out_channels"])
    count = len(down_types)
    layers = _per_block(config.get("layers_per_block", 2), count)
    depths = _per_block(config.get("transformer_layers_per_block", 1), count)
    reverse_depths = config.get("reverse_transformer_layers_per_block")
    up_depths = list(reversed(depths)) if reverse_depths is None else list(reverse_depths)

    down: list[BlockShape] = []
    out_channels = channels[0]
    for i, block_type in enumerate(down_types):
        in_channels, out_channels = out_channels, channels[i]
        block_layers = tuple(
            LayerShape(
                resnet=ResnetShape(
                    has_shortcut=(in_channels if j == 0 else out_channels) != out_channels
                ),
                attention=TransformerShape(_depth(depths[i], j))
                if "CrossAttn" in block_type
                else None,
            )
            for j in range(layers[i])
        )
        down.append(BlockShape(block_layers, has_resampler=i < count - 1))

    # Up-block resnets concatenate a skip connection, so their input width always differs: shortcut.
    up: list[BlockShape] = []
    reversed_layers = list(reversed(layers))
    for i, block_type in enumerate(up_types):
        block_layers = tuple(
            LayerShape(
                resnet=ResnetShape(has_shortcut=True),
                attention=TransformerShape(_depth(up_depths[i], j))
                if "CrossAttn" in block_type
                else None,
            )
            for j in range(reversed_layers[i] + 1)
        )
        up.append(BlockShape(block_layers, has_resampler=i < len(up_types) - 1))

    return UNetShape(
        down=tuple(down),
        mid_attention_depth=_depth(depths[-1], 0),
        up=tuple(up),
        has_class_embedding=config.get("class_embed_type") in ("timestep", "projection"),
        has_add_embedding=config.get("addition_embed_type") == "text_time",
    )


def _resnet_names(diffusers: str, ldm: str, resnet: ResnetShape) -> dict[str, str]:
    names = {f"{diffusers}.{d}": f"{ldm}.{o}" for d, o in _RESNET_PARTS.items()}
    if resnet.has_shortcut:
        names[f"{diffusers}.{_SHORTCUT[0]}"] = f"{ldm}.{_SHORTCUT[1]}"
    return names


def _transformer_names(diffusers: str, ldm: str, shape: TransformerShape) -> dict[str, str]:
    # Inside a spatial transformer LDM and diffusers use the same module names.
    suffixes = ["norm", "proj_in", "proj_out"]
    for k in range(shape.depth):
        block = f"transformer_blocks.{k}"
        suffixes += [f"{block}.norm{n}" for n in (1, 2, 3)]
        suffixes += [
            f"{block}.{attn}.{p}" for attn in ("attn1", "attn2") for p in _ATTENTION_PROJECTIONS
        ]
        suffixes += [f"{block}.ff.net.0.proj", f"{block}.ff.net.2"]
    return {f"{diffusers}.{s}": f"{ldm}.{s}" for s in suffixes}


def unet_module_names(config: Mapping[str, Any]) -> dict[str, str]:
    """Map every parameter-owning diffusers UNet module path to its LDM path.

    LDM paths are relative to `model.diffusion_model.`; e.g. `down_blocks.0.attentions.0.proj_in`
    -> `input_blocks.1.1.proj_in`. Covers SD1/SD2/SDXL-style `UNet2DConditionModel` configs.
    """
    shape = unet_shape(config)
    names: dict[str, str] = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    # SGM stores SDXL's size/pooled-text embedding where LDM kept class labels.
    if shape.has_add_embedding:
        names |= {
            "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2",
        }
    if shape.has_class_embedding:
        names |= {
            "class_embedding.linear_1": "label_emb.0.0",
            "class_embedding.linear_2": "label_emb.0.2",
        }

    index = 1  # input_blocks.0 is conv_in
    for i, block in enumerate(shape.down):
        for j, layer in enumerate(block.layers):
            names |= _resnet_names(
                f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0", layer.resnet
            )
            if layer.attention is not None:
                names |= _transformer_names(
                    f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1", layer.attention
                )
            index += 1
        if block.has_resampler:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    plain = ResnetShape(has_shortcut=False)
    names |= _resnet_names("mid_block.resnets.0", "middle_block.0", plain)
    names |= _transformer_names(
        "mid_block.attentions.0", "middle_block.1", TransformerShape(shape.mid_attention_depth)
    )
    names |= _resnet_names("mid_block.resnets.1", "middle_block.2", plain)

    index = 0
    for i, block in enumerate(shape.up):
        for j, layer in enumerate(block.layers):
            names |= _resnet_names(
                f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", layer.resnet
            )
            slot = 1
            if layer.attention is not None:
                names |= _transformer_names(
                    f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1", layer.attention
                )
                slot = 2
            # The upsampler joins the block's last output block, after its attention if any.
            if block.has_resampler and j == len(block.layers) - 1:
                names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
            index += 1
    return names


def unet_to_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet state dict to LDM keys (without the `model.diffusion_model.` prefix).

    Tensors are passed through unchanged (no copy). Raises `KeyError` naming any key the map lacks.
    """
    names = unet_module_names(config)
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        if module in names:
            converted[f"{names[module]}.{param}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(
            f"UNet keys with no LDM name: {sorted(unknown)[:10]} ({len(unknown)} in all)"
        )
    return converted
