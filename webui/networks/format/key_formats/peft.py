"""PEFT / diffusers names (`save_lora_weights`, SimpleTuner, ai-toolkit): `unet.…`, `text_encoder.…`,
`text_encoder_2.…`, `transformer.…`, optionally behind PEFT's `base_model.model.`; the adapter
name between `lora_A` and `weight` is part of the tensor suffix, not of the module."""

from webui.networks.format.key_formats.format import KeyFormat

_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.", "base_model.model.")


def owns(prefix: str) -> bool:
    return prefix.startswith(_PREFIXES)


def canonical(prefix: str) -> str:
    return prefix


FORMAT = KeyFormat("PEFT/diffusers", owns, canonical)
