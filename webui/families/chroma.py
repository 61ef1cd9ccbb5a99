"""Chroma: FLUX.1-schnell derivative without per-block modulation (a distilled guidance layer
instead); same block names and width as FLUX.1, so metadata usually decides."""

from webui.families.family import Family, patterns

FAMILY = Family(
    name="Chroma",
    modelspec=("chroma",),  # sd-scripts ARCH_FLUX_1_CHROMA
    base_versions=(r"chroma",),
    civitai=("Chroma",),
    keys=patterns(r"(^|_)distilled_guidance_layer_"),
    text_widths=frozenset({4096}),
    arch=None,
)
