"""Wan 2.x: video DiT whose blocks are `blocks.N.self_attn.q` (original) or `blocks.N.attn1.to_q`
(diffusers WanTransformer3DModel); UMT5 text encoder."""

from webui.families.family import Family, patterns
from webui.families.shared_names import ROOT

FAMILY = Family(
    name="Wan",
    modelspec=("wan",),
    base_versions=(r"wan",),
    civitai=("Wan Video", "Wan Video 2.2 T2V-A14B", "Wan Video 14B t2v", "Wan Video 2.2 TI2V-5B"),
    keys=patterns(
        ROOT + r"blocks_\d+_(self|cross)_attn_[qkvo]_(?!proj)",
        ROOT + r"blocks_\d+_ffn_(0|2|net_0_proj|net_2)_",
        ROOT + r"blocks_\d+_attn[12]_(to_[qkv]|add_[kv]_proj)_",
        r"(^|_)condition_embedder_",
    ),
    text_widths=frozenset({4096}),
    arch=None,
)
