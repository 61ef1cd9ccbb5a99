"""Textual-inversion embeddings: what their tensors mean, as A1111 reads them.

Bundled in a LoRA file: OneTrainer's `bundle_emb.NAME.clip_l` ([n, 768]) / `.clip_g`
([n, 1280]) and A1111's `bundle_emb.NAME.string_to_param.*`; they are set aside as embeddings,
never counted as LoRA modules. Standalone files: A1111's `.pt` (`string_to_param: {'*': t}`),
a single tensor (`emb_params`, diffusers concepts) or SDXL's `clip_l` + `clip_g`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import torch

_PREFIX = "bundle_emb."
MAX_VECTORS: Final = 75
"""One prompt chunk: A1111 cannot place an embedding with more vectors."""


class EmbeddingDataError(ValueError):
    """Tensors that are not a textual-inversion embedding A1111 could use."""


def is_embedding_key(key: str) -> bool:
    """Whether a file key belongs to a bundled embedding."""
    return key.startswith(_PREFIX)


def embedding_name(key: str) -> str:
    """The embedding's name (`bundle_emb.NAME.clip_l` -> NAME)."""
    return key[len(_PREFIX) :].split(".", 1)[0]


def bundled_embedding_data(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """A LoRA file's bundled embeddings: name -> {rest of key: tensor}, as A1111 groups them
    (`bundle_emb.NAME.string_to_param.*` -> {"string_to_param.*": t})."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        if is_embedding_key(key) and "." in key[len(_PREFIX) :]:
            rest = key[len(_PREFIX) :].split(".", 1)[1]
            grouped.setdefault(embedding_name(key), {})[rest] = tensor
    return grouped


def _matrix(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise EmbeddingDataError(f"{what} is not a float tensor")
    matrix = value.detach().to("cpu", torch.float32)
    if matrix.dim() == 1:  # diffusers concepts store one vector flat
        matrix = matrix.unsqueeze(0)
    if matrix.dim() != 2 or not 1 <= matrix.shape[0] <= MAX_VECTORS or matrix.shape[1] == 0:
        raise EmbeddingDataError(
            f"{what} has shape {list(value.shape)}; expected [vectors (1..{MAX_VECTORS}), width]"
        )
    return matrix


def embedding_vectors(data: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    """An embedding's vectors, one [n, width] matrix per text encoder in the model's order:
    one for SD1/SD2 files, (clip_l, clip_g) for SDXL files. Follows A1111's order of tests:
    `string_to_param` (exactly one entry), then SDXL's `clip_l` + `clip_g`, then a single
    tensor of any name (`emb_params`, diffusers concepts, a bundled `string_to_param.*`)."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            count = len(params) if isinstance(params, Mapping) else type(params).__name__
            raise EmbeddingDataError(f"string_to_param must hold exactly one tensor ({count})")
        return (_matrix(next(iter(params.values())), "string_to_param"),)
    if "clip_l" in data and "clip_g" in data:
        clip_l, clip_g = _matrix(data["clip_l"], "clip_l"), _matrix(data["clip_g"], "clip_g")
        if clip_l.shape[0] != clip_g.shape[0]:
            raise EmbeddingDataError(
                f"clip_l has {clip_l.shape[0]} vectors but clip_g has {clip_g.shape[0]}"
            )
        return clip_l, clip_g
    tensors = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
    if len(tensors) != 1:
        raise EmbeddingDataError(
            f"not an embedding: expected string_to_param, clip_l + clip_g or one tensor, "
            f"found {sorted(map(str, data))}"
        )
    key, value = next(iter(tensors.items()))
    return (_matrix(value, str(key)),)
