"""Z-Image (Tongyi): single-stream DiT (width 3840) with noise/context refiners, Qwen3-4B text
encoder (2560). Names: diffusers ZImageTransformer2DModel."""

from webui.families.family import Family, patterns, shared
from webui.families.shared_names import LLM, NEXT_DIT

FAMILY = Family(
    name="Z-Image",
    modelspec=("z-image",),
    base_versions=(r"z_?image",),
    civitai=("ZImageTurbo", "Z-Image Turbo", "Z-Image"),
    keys=patterns(r"(^|_)all_(x_embedder|final_layer)_"),
    widths=(shared(NEXT_DIT, 3840), shared(LLM, 2560)),
    text_widths=frozenset({2560}),
    arch=None,
)
