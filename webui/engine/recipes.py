"""The generation recipe of each model family (one row per family)."""

from __future__ import annotations

from webui.arch import Arch, FluxVariant
from webui.engine.checkpoints import ModelKind
from webui.engine.flux_recipe import FluxRecipe
from webui.engine.recipe import GenerationRecipe
from webui.engine.sd_recipe import StableDiffusionRecipe


def recipe_for(kind: ModelKind) -> GenerationRecipe:
    """The recipe that generates with a model of this kind."""
    if kind.arch is Arch.FLUX1:
        return FluxRecipe(kind.variant or FluxVariant.DEV)
    return StableDiffusionRecipe(kind.arch)
