"""Text-encoder key layouts: transformers `CLIPTextModel[WithProjection]` -> the original files.

Two original layouts exist. SD1's encoder and SDXL's first keep the HF CLIP names under
`transformer.` (`transformer.text_model.encoder.layers.0...`). SD2's encoder and SDXL's second
are OpenCLIP modules under `model.` (`model.transformer.resblocks.0.attn.in_proj_weight`, ...).
Keys returned here are relative to the embedder (`cond_stage_model.`, `conditioner.embedders.N.`).

SD2: diffusers ships 23 of OpenCLIP's 24 layers (SD2 conditions on the penultimate layer, so the
last one and `text_projection` never run) and its text encoder has no projection. We write exactly
the layers we are given, so an SD2 file written from diffusers has 23 resblocks and no
`text_projection`; `to_single_file(extra=...)` carries the original file's tensors over.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_TEXT_MODEL = "text_model."
# Roots of CLIPTextModel's inner `text_model` (transformers >= 5.6 drops the wrapper in the keys).
_TEXT_MODEL_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")

_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)$")
_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)$")
_OPEN_CLIP_TOP: Mapping[str, str] = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER_PARTS: Mapping[str, str] = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# Buffers transformers may save that OpenCLIP recomputes (it has no position ids).
_OPEN_CLIP_DROPPED = frozenset({"embeddings.position_ids"})


def with_text_model_prefix(key: str) -> str:
    """A CLIP key with the `text_model.` wrapper, whichever transformers version saved it."""
    return _TEXT_MODEL + key if key.startswith(_TEXT_MODEL_ROOTS) else key


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text encoder -> `transformer.text_model.*` keys (SD1, SDXL's first encoder).

    Accepts state dicts with or without the `text_model.` wrapper; tensors pass through unchanged.
    """
    return {f"transformer.{with_text_model_prefix(k)}": v for k, v in state_dict.items()}


def _strip_text_model(key: str) -> str:
    return key.removeprefix(_TEXT_MODEL)


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text encoder -> OpenCLIP `model.*` keys (SD2, SDXL's second encoder).

    q/k/v projections are concatenated into `attn.in_proj_weight`/`in_proj_bias` (in that order),
    and `text_projection.weight` [proj, hidden] becomes `text_projection` [hidden, proj].
    Raises `KeyError` on keys with no OpenCLIP counterpart or an incomplete q/k/v triple.
    """
    converted: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for full_key, tensor in state_dict.items():
        key = _strip_text_model(full_key)
        if key in _OPEN_CLIP_DROPPED:
            continue
        if key == "text_projection.weight":
            converted["model.text_projection"] = tensor.T.contiguous()
        elif key in _OPEN_CLIP_TOP:
            converted[f"model.{_OPEN_CLIP_TOP[key]}"] = tensor
        elif (layer := _LAYER.match(key)) is None:
            unknown.append(full_key)
        elif qkv_match := _QKV.match(layer.group(2)):
            projection, param = qkv_match.groups()
            qkv.setdefault((int(layer.group(1)), param), {})[projection] = tensor
        else:
            module, _, param = layer.group(2).rpartition(".")
            if module not in _OPEN_CLIP_LAYER_PARTS:
                unknown.append(full_key)
                continue
            name = f"model.transformer.resblocks.{layer.group(1)}.{_OPEN_CLIP_LAYER_PARTS[module]}"
            converted[f"{name}.{param}"] = tensor
    for (index, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            unknown.append(
                f"encoder.layers.{index}.self_attn.*_proj.{param} (only {sorted(parts)})"
            )
            continue
        name = f"model.transformer.resblocks.{index}.attn.in_proj_{param}"
        converted[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unknown:
        raise KeyError(f"text-encoder keys with no OpenCLIP name: {sorted(unknown)[:10]}")
    return converted
