"""Lumina-Image 2.0: NextDiT (width 2304) with noise/context refiners, Gemma-2-2B text encoder
(2304). Names: sd-scripts lumina_models.py, diffusers Lumina2Transformer2DModel."""

from webui.families.family import Family, shared
from webui.families.shared_names import LLM, NEXT_DIT

FAMILY = Family(
    name="Lumina 2",
    modelspec=("lumina",),  # sd-scripts ARCH_LUMINA_2 "lumina-2", ARCH_LUMINA_UNKNOWN "lumina"
    base_versions=(r"lumina",),
    civitai=("Lumina",),
    widths=(shared(NEXT_DIT, 2304), shared(LLM, 2304)),
    text_widths=frozenset({2304}),
    arch=None,
)
