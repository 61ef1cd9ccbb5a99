"""Anima (CircleStone): Cosmos-Predict2 2B DiT (`blocks.N.self_attn.q_proj`, `mlp.layer1`, an LLM
adapter) with a Qwen3-0.6B text encoder (width 1024). Names: sd-scripts anima_train_network.py."""

from webui.families.family import Family, patterns, shared
from webui.families.shared_names import LLM, ROOT

FAMILY = Family(
    name="Anima",
    modelspec=("anima",),  # sd-scripts ARCH_ANIMA_PREVIEW "anima-preview"
    base_versions=(r"anima",),
    civitai=("Anima",),
    keys=patterns(
        ROOT + r"blocks_\d+_(self|cross)_attn_(q|k|v|output)_proj_",
        ROOT + r"blocks_\d+_mlp_layer[12]_",
        r"(^|_)llm_adapter_",
        r"_adaln_modulation_(self_attn|cross_attn|mlp)_",
    ),
    widths=(shared(LLM, 1024),),
    text_widths=frozenset({1024}),
    arch=None,
)
