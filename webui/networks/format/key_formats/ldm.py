"""Original-layout dotted names (ComfyUI, BFL and SAI trainers): `model.diffusion_model.…`,
`diffusion_model.…`."""

from webui.networks.format.key_formats.format import KeyFormat

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def owns(prefix: str) -> bool:
    return prefix.startswith(_PREFIXES)


def canonical(prefix: str) -> str:
    return prefix


FORMAT = KeyFormat("original (LDM) layout", owns, canonical)
