"""HiDream-I1: double/single stream blocks with mixture-of-experts feed-forward; CLIP-L, CLIP-G,
T5 and Llama-3.1-8B (4096). Names: diffusers HiDreamImageTransformer2DModel, OneTrainer."""

from webui.families.family import Family, patterns, shared
from webui.families.shared_names import LLM

FAMILY = Family(
    name="HiDream",
    modelspec=("hidream",),
    base_versions=(r"hidream",),
    civitai=("HiDream",),
    keys=patterns(
        r"(double|single)_stream_blocks_\d+_block_",
        r"_ff_i_(experts|shared_experts|gate)_",
        r"(^|_)caption_projection_\d+_",
    ),
    widths=(shared(LLM, 4096),),
    text_widths=frozenset({768, 1280, 4096}),
    arch=None,
)
