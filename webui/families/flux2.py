"""FLUX.2: BFL's second transformer (shared modulation, fused single-block projections;
width 6144 for dev), Mistral text encoder. Names: diffusers Flux2Transformer2DModel."""

from webui.families.family import Family, patterns, shared

FAMILY = Family(
    name="FLUX.2",
    modelspec=("flux-2",),
    base_versions=(r"flux_?2",),
    civitai=("Flux.2 D", "Flux.2 Klein"),
    keys=patterns(
        r"single_transformer_blocks_\d+_attn_to_qkv_mlp_proj_",
        r"(double|single)_stream_modulation",
        r"(^|_)transformer_blocks_\d+_ff(_context)?_linear_(in|out)_",
    ),
    widths=(shared(r"double_blocks_\d+_(img|txt)_attn_qkv_|single_blocks_\d+_linear1_", 6144),),
    text_widths=frozenset({5120}),
    arch=None,
)
