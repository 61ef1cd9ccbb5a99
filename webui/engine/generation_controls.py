"""What txt2img offers for a model family: its defaults and which controls apply, read from
the family's recipe (one row per recipe type), so the UI never branches on architectures."""

from __future__ import annotations

from dataclasses import dataclass

from webui.engine import flux_recipe
from webui.engine.checkpoints import ModelKind
from webui.engine.recipe import GenerationDefaults
from webui.engine.recipes import recipe_for
from webui.engine.samplers import FLOW_MATCH_EULER, sampler_names
from webui.engine.token_count import PromptEncoder

SD_SIZE_STEP = 8  # the VAE's downscale; GenerationRequest.validate's multiple


@dataclass(frozen=True)
class GenerationControls:
    """The loaded family's defaults and capabilities; two families with equal controls (SD1 and
    SDXL) look the same to the page, so switching between them keeps the user's values."""

    defaults: GenerationDefaults
    samplers: tuple[str, ...]
    size_step: int
    distilled_cfg: bool  # a distilled-guidance input (FLUX.1 [dev])
    negative_needs_cfg: bool  # the negative prompt counts only with CFG above 1 (true CFG)
    clip_skip: bool  # the prompt goes through CLIP's layers only (SD), so a skip means something
    loras: bool  # LoRAs are applied (their backend and trigger words mean something)
    hires: bool  # A1111's hires fix runs (the recipe's `runs_hires`)
    trigger_words: bool  # LoRAs apply, so adding their trigger words to the prompt means something
    prompt_encoder: PromptEncoder  # reads the prompt's words: its tokens counted, weighted, chunked


def controls_for(kind: ModelKind) -> GenerationControls:
    """The controls of a model of this kind."""
    recipe = recipe_for(kind)
    if isinstance(recipe, flux_recipe.FluxRecipe):
        return GenerationControls(
            defaults=recipe.defaults,
            samplers=(FLOW_MATCH_EULER.name,),
            size_step=flux_recipe.SIZE_MULTIPLE,
            distilled_cfg=recipe.guided,
            negative_needs_cfg=True,
            clip_skip=False,
            loras=recipe.applies_loras,  # native or the diffusers fallback's FLUX.1 loader
            hires=recipe.runs_hires,
            trigger_words=recipe.applies_loras,
            prompt_encoder=PromptEncoder.T5,  # flux_encoding: emphasis on T5, CLIP-L pooled only
        )
    return GenerationControls(
        defaults=recipe.defaults,
        samplers=tuple(sampler_names()),
        size_step=SD_SIZE_STEP,
        distilled_cfg=False,
        negative_needs_cfg=False,
        clip_skip=True,
        loras=recipe.applies_loras,
        hires=recipe.runs_hires,
        trigger_words=recipe.applies_loras,
        prompt_encoder=PromptEncoder.CLIP,
    )
