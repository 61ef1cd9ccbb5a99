"""FLUX.1 transformer key layout: BFL's original names (`double_blocks.N.img_attn.qkv`, ...) <->
diffusers `FluxTransformer2DModel` names. Sizes come from the tensors, never from constants, so
tiny test models convert like the 12B one (diffusers' own converter assumes width 3072).

Traps: BFL fuses q/k/v (`*_attn.qkv`) and, in single blocks, q/k/v and the MLP input (`linear1`,
rows [h, h, h, mlp]); the final layer's modulation is (shift, scale) in BFL but (scale, shift) in
diffusers' AdaLayerNormContinuous (`norm_out.linear`), so its halves are swapped. The block
modulations (`*_mod.lin`, `modulation.lin`) keep the same chunk order in both."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

_PARAMS = ("weight", "bias")


@dataclass(frozen=True)
class _Renamed:
    diffusers: str
    bfl: str
    swap_halves: bool = False


@dataclass(frozen=True)
class _Fused:
    """One BFL tensor holding several diffusers tensors stacked by rows; the last part takes
    whatever rows the equal-sized others leave (the MLP of `linear1`)."""

    bfl: str
    diffusers: tuple[str, ...]


_TOP: tuple[tuple[str, str], ...] = (
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("proj_out", "final_layer.linear"),
)
_GUIDANCE: tuple[tuple[str, str], ...] = (
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
)
_DOUBLE: tuple[tuple[str, str], ...] = (
    ("norm1.linear", "img_mod.lin"),
    ("norm1_context.linear", "txt_mod.lin"),
    ("attn.to_out.0", "img_attn.proj"),
    ("attn.to_add_out", "txt_attn.proj"),
    ("ff.net.0.proj", "img_mlp.0"),
    ("ff.net.2", "img_mlp.2"),
    ("ff_context.net.0.proj", "txt_mlp.0"),
    ("ff_context.net.2", "txt_mlp.2"),
)
_DOUBLE_NORMS: tuple[tuple[str, str], ...] = (
    ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"),
    ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
    ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
    ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
)
_DOUBLE_FUSED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
)
_SINGLE: tuple[tuple[str, str], ...] = (
    ("norm.linear", "modulation.lin"),
    ("proj_out", "linear2"),
)
_SINGLE_NORMS: tuple[tuple[str, str], ...] = (
    ("attn.norm_q.weight", "norm.query_norm.scale"),
    ("attn.norm_k.weight", "norm.key_norm.scale"),
)
_SINGLE_FUSED = ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))

_BFL_DOUBLE = re.compile(r"^double_blocks\.(\d+)\.")
_BFL_SINGLE = re.compile(r"^single_blocks\.(\d+)\.")
_DIFFUSERS_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.")
_DIFFUSERS_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.")


def _count(keys: Iterator[str] | list[str], pattern: re.Pattern[str]) -> int:
    indices = {int(m.group(1)) for key in keys if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def _entries(double: int, single: int, guidance: bool) -> Iterator[_Renamed | _Fused]:
    """Every tensor of a transformer with these block counts, in both layouts."""
    tops = _TOP + (_GUIDANCE if guidance else ())
    for diffusers, bfl in tops:
        for param in _PARAMS:
            yield _Renamed(f"{diffusers}.{param}", f"{bfl}.{param}")
    for param in _PARAMS:
        yield _Renamed(
            f"norm_out.linear.{param}", f"final_layer.adaLN_modulation.1.{param}", swap_halves=True
        )
    for i in range(double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for diffusers, bfl in _DOUBLE:
            for param in _PARAMS:
                yield _Renamed(f"{d}{diffusers}.{param}", f"{b}{bfl}.{param}")
        for diffusers, bfl in _DOUBLE_NORMS:
            yield _Renamed(d + diffusers, b + bfl)
        for bfl, parts in _DOUBLE_FUSED:
            for param in _PARAMS:
                yield _Fused(f"{b}{bfl}.{param}", tuple(f"{d}{p}.{param}" for p in parts))
    for i in range(single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for diffusers, bfl in _SINGLE:
            for param in _PARAMS:
                yield _Renamed(f"{d}{diffusers}.{param}", f"{b}{bfl}.{param}")
        for diffusers, bfl in _SINGLE_NORMS:
            yield _Renamed(d + diffusers, b + bfl)
        bfl, parts = _SINGLE_FUSED
        for param in _PARAMS:
            yield _Fused(f"{b}{bfl}.{param}", tuple(f"{d}{p}.{param}" for p in parts))


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _split_rows(tensor: torch.Tensor, parts: int, width: int) -> list[torch.Tensor]:
    """Rows [width] * (parts - 1) + [the rest]."""
    sizes = [width] * (parts - 1)
    sizes.append(tensor.shape[0] - sum(sizes))
    if sizes[-1] <= 0:
        raise ValueError(f"a fused tensor of {tensor.shape[0]} rows cannot hold {parts} parts")
    return list(torch.split(tensor, sizes, dim=0))


def _check_all_used(state_dict: Mapping[str, torch.Tensor], used: set[str], layout: str) -> None:
    unknown = sorted(set(state_dict) - used)
    if unknown:
        raise KeyError(
            f"FLUX.1 transformer keys with no {layout} counterpart: {unknown[:10]} "
            f"({len(unknown)} in all)"
        )


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL-layout transformer tensors (no prefix) -> diffusers `FluxTransformer2DModel` names.
    Raises KeyError naming missing or unknown keys."""
    keys = list(state_dict)
    double, single = _count(keys, _BFL_DOUBLE), _count(keys, _BFL_SINGLE)
    guidance = "guidance_in.in_layer.weight" in state_dict
    hidden = state_dict["img_in.weight"].shape[0]
    converted: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for entry in _entries(double, single, guidance):
        if entry.bfl not in state_dict:
            missing.append(entry.bfl)
            continue
        used.add(entry.bfl)
        tensor = state_dict[entry.bfl]
        if isinstance(entry, _Fused):
            pieces = _split_rows(tensor, len(entry.diffusers), hidden)
            converted.update(zip(entry.diffusers, pieces, strict=True))
        else:
            converted[entry.diffusers] = _swap_halves(tensor) if entry.swap_halves else tensor
    if missing:
        raise KeyError(f"FLUX.1 transformer lacks {missing[:10]} ({len(missing)} in all)")
    _check_all_used(state_dict, used, "diffusers")
    return converted


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers `FluxTransformer2DModel` tensors -> BFL names (fused q/k/v and `linear1`,
    final modulation halves swapped back). Raises KeyError naming missing or unknown keys."""
    keys = list(state_dict)
    double, single = _count(keys, _DIFFUSERS_DOUBLE), _count(keys, _DIFFUSERS_SINGLE)
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in state_dict
    converted: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for entry in _entries(double, single, guidance):
        names = entry.diffusers if isinstance(entry, _Fused) else (entry.diffusers,)
        absent = [name for name in names if name not in state_dict]
        if absent:
            missing += absent
            continue
        used.update(names)
        if isinstance(entry, _Fused):
            converted[entry.bfl] = torch.cat([state_dict[name] for name in names], dim=0)
        else:
            tensor = state_dict[entry.diffusers]
            converted[entry.bfl] = _swap_halves(tensor) if entry.swap_halves else tensor
    if missing:
        raise KeyError(f"FLUX.1 transformer lacks {missing[:10]} ({len(missing)} in all)")
    _check_all_used(state_dict, used, "BFL")
    return converted


def transformer_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The `FluxTransformer2DModel` config values a diffusers-layout state dict's shapes fix
    (block counts, widths, heads, guidance); `axes_dims_rope` is not in the weights."""
    keys = list(shapes)
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    hidden, in_channels = shapes["x_embedder.weight"]
    out_features = shapes["proj_out.weight"][0]
    return {
        "num_layers": _count(keys, _DIFFUSERS_DOUBLE),
        "num_single_layers": _count(keys, _DIFFUSERS_SINGLE),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "in_channels": in_channels,
        "out_channels": None if out_features == in_channels else out_features,
        "joint_attention_dim": shapes["context_embedder.weight"][1],
        "pooled_projection_dim": shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in shapes,
    }


@dataclass(frozen=True)
class LoraTarget:
    """One BFL module name and the diffusers module(s) its weight becomes: each part is a
    diffusers path and the BFL rows (ranges, concatenated) that make its rows, or None when the
    whole weight maps as is; `rows` is the BFL weight's row count."""

    bfl: str
    parts: tuple[tuple[str, tuple[tuple[int, int], ...] | None], ...]
    rows: int


def lora_targets(transformer: torch.nn.Module) -> Iterator[LoraTarget]:
    """Every weight-bearing BFL module of a loaded `FluxTransformer2DModel`, from the same table
    the checkpoint converter uses; row sizes are read from the model (tiny models map too)."""
    double = len(getattr(transformer, "transformer_blocks", ()))
    single = len(getattr(transformer, "single_transformer_blocks", ()))
    guidance = bool(transformer.config.get("guidance_embeds", False))
    weights = dict(transformer.named_parameters())
    suffix = ".weight"
    for entry in _entries(double, single, guidance):
        if not entry.bfl.endswith(suffix):
            continue  # biases, and the RMSNorm scales LoRAs do not touch
        bfl = entry.bfl[: -len(suffix)]
        if isinstance(entry, _Fused):
            sizes = [weights[name].shape[0] for name in entry.diffusers if name in weights]
            if len(sizes) != len(entry.diffusers):
                continue
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            parts = tuple(
                (name[: -len(suffix)], ((start, start + size),))
                for name, start, size in zip(entry.diffusers, starts, sizes, strict=True)
            )
            yield LoraTarget(bfl, parts, sum(sizes))
        elif entry.diffusers.endswith(suffix) and entry.diffusers in weights:
            path = entry.diffusers[: -len(suffix)]
            rows = weights[entry.diffusers].shape[0]
            if entry.swap_halves:
                half = rows // 2
                yield LoraTarget(bfl, ((path, ((half, rows), (0, half))),), rows)
            else:
                yield LoraTarget(bfl, ((path, None),), rows)
