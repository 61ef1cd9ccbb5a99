"""LyCORIS' own wrapper (`LycorisNetwork`, used by SimpleTuner's LyCORIS exports): the wrapped
model's module paths flattened under `lycoris_`. For an SD model that model is the UNet."""

from webui.networks.format.key_formats.format import KeyFormat

_PREFIX = "lycoris_"


def owns(prefix: str) -> bool:
    return prefix.startswith(_PREFIX)


def canonical(prefix: str) -> str:
    return "lora_unet_" + prefix[len(_PREFIX) :].replace(".", "_")


FORMAT = KeyFormat("LyCORIS", owns, canonical)
