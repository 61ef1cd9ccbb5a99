"""What a model family's generation needs, as one Protocol: its defaults, request checks,
scheduler, prompt conditioning, guidance arguments and infotext fields. Each family implements
it in its own module (`sd_recipe.py`, `flux_recipe.py`); `recipes.recipe_for` picks one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from webui.engine.hires import StrengthRounding
from webui.engine.request import GenerationRequest
from webui.networks.library import Embedding


@dataclass(frozen=True)
class GenerationDefaults:
    """The values a family's model is meant to run with, for fields a caller left unset."""

    steps: int
    cfg_scale: float
    sampler: str


class GenerationRecipe(Protocol):
    """One family's generation path; the engine's loop (batches, seeds, progress) is shared."""

    @property
    def defaults(self) -> GenerationDefaults: ...

    @property
    def applies_loras(self) -> bool: ...

    @property
    def uses_embeddings(self) -> bool: ...

    @property
    def runs_hires(self) -> bool:
        """Whether this family runs A1111's hires fix (a second, img2img pass)."""
        ...

    @property
    def size_multiple(self) -> int:
        """What width and height (the hires size too) must be a multiple of."""
        ...

    @property
    def img2img_rounding(self) -> StrengthRounding:
        """How the family's img2img pipeline turns `strength` into steps run."""
        ...

    def unpack_latents(
        self, pipe: Any, latents: torch.Tensor, width: int, height: int
    ) -> torch.Tensor:
        """The pipeline's `output_type="latent"` output as (batch, channels, h, w) latents in
        the space its img2img twin takes as `image` (scaled, unshifted)."""
        ...

    def img2img_size(self, width: int, height: int) -> dict[str, int]:
        """The img2img pipeline's keyword arguments that set its output size (none when it
        follows the input's size)."""
        ...

    def noise_shape(self, pipe: Any, request: GenerationRequest) -> tuple[int, int, int]:
        """One image's initial noise as the pipeline draws it: (channels, height, width)."""
        ...

    def pack_noise(self, pipe: Any, noise: Any) -> Any:
        """A batch of such noise as the pipeline's `latents` argument."""
        ...

    def resolve(self, request: GenerationRequest, warnings: list[str]) -> GenerationRequest:
        """The request as it will run (sampler named); raises RequestError for a field this
        family cannot take; adds a warning for each field it replaces or ignores."""
        ...

    def scheduler(self, config: Mapping[str, Any], request: GenerationRequest) -> SchedulerMixin:
        """A fresh scheduler for the resolved request, from the model's scheduler config."""
        ...

    def conditioning(
        self, pipe: Any, request: GenerationRequest, embeddings: Sequence[Embedding]
    ) -> dict[str, Any]:
        """The prompts encoded, as pipeline keyword arguments (one row per image of a batch)."""
        ...

    def guidance(self, request: GenerationRequest) -> dict[str, Any]:
        """The pipeline's guidance keyword arguments."""
        ...

    def sampling_fields(self, request: GenerationRequest) -> dict[str, str]:
        """Infotext fields after `Steps`: `Sampler`, `CFG scale` and the family's own."""
        ...

    def module_fields(self, parts: Mapping[str, Path]) -> dict[str, str]:
        """Infotext fields naming the separate files the model was assembled from."""
        ...
