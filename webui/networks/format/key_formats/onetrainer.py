"""OneTrainer / OMI names (OneTrainer modules/util/convert/lora/convert_sdxl_lora.py, convert_clip.py):
`unet.` + original LDM paths, `clip_l.` (first text encoder), `clip_g.` (second, with
`text_projection`), and `bundle_emb.NAME.clip_l|clip_g` embeddings, which are set aside."""

from webui.networks.format.key_formats.format import KeyFormat

_COMPONENTS = (("clip_l.", "text_encoder."), ("clip_g.", "text_encoder_2."))


def owns(prefix: str) -> bool:
    return prefix.startswith(tuple(p for p, _ in _COMPONENTS))


def canonical(prefix: str) -> str:
    for mine, ours in _COMPONENTS:
        if prefix.startswith(mine):
            return ours + prefix[len(mine) :]
    return prefix


FORMAT = KeyFormat("OneTrainer", owns, canonical)
