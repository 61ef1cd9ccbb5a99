"""OneTrainer / OMI names (OneTrainer modules/util/convert/lora/convert_sdxl_lora.py, convert_clip.py,
convert_flux_lora.py): `unet.` + original LDM paths, `clip_l.` (first text encoder), `clip_g.`
(second, with `text_projection`), `t5.` (FLUX.1's T5), `transformer.` + FLUX.1's BFL paths with
the fused weights split (`img_attn.qkv.0/1/2` = q/k/v, `linear1.0..3` = q/k/v/MLP, `img_in.proj`
= `img_in`), and `bundle_emb.NAME.clip_l|clip_g` embeddings, which are set aside."""

import re

from webui.networks.format.key_formats.format import KeyFormat

_COMPONENTS = (
    ("clip_l.", "text_encoder."),
    ("clip_g.", "text_encoder_2."),
    ("t5.", "text_encoder_2."),
)
_BFL = re.compile(
    r"^transformer\.((?:double_blocks|single_blocks)\.\d+\..+|final_layer\..+"
    r"|(?:img_in|txt_in|time_in|vector_in|guidance_in)(?:\..+)?)$"
)
# OMI splits BFL's fused weights by row block; each block is one diffusers module.
_SPLIT = re.compile(r"^(double|single)_blocks\.(\d+)\.(img_attn\.qkv|txt_attn\.qkv|linear1)\.(\d)$")
_SPLIT_NAMES = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}


def owns(prefix: str) -> bool:
    return prefix.startswith(tuple(p for p, _ in _COMPONENTS)) or _BFL.match(prefix) is not None


def canonical(prefix: str) -> str:
    for mine, ours in _COMPONENTS:
        if prefix.startswith(mine):
            return ours + prefix[len(mine) :]
    bfl = _BFL.match(prefix)
    if bfl is None:
        return prefix
    name = bfl.group(1)
    split = _SPLIT.match(name)
    if split is not None:
        kind, block, fused, part = split.groups()
        blocks = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
        parts = _SPLIT_NAMES[fused]
        return (
            f"transformer.{blocks}.{block}.{parts[int(part)]}" if int(part) < len(parts) else prefix
        )
    return "diffusion_model." + ("img_in" if name == "img_in.proj" else name)


FORMAT = KeyFormat("OneTrainer", owns, canonical)
