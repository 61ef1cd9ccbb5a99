"""Old diffusers attention-processor LoRAs (diffusers < 0.21 `AttnProcsLayers`):
`….attn1.processor.to_q_lora.down.weight`, `….processor.to_out_lora.up.weight`; canonical: the
projection itself (`….attn1.to_q`, `….attn1.to_out.0`)."""

import re

from webui.networks.format.key_formats.format import KeyFormat

_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


def owns(prefix: str) -> bool:
    return _PROCESSOR.search(prefix) is not None


def canonical(prefix: str) -> str:
    name = _PROCESSOR.sub(
        lambda m: ".to_out.0" if m.group(1) == "to_out" else f".{m.group(1)}", prefix
    )
    # bare processor dicts name no component; they were UNet-only
    return name if name.startswith(("unet.", "base_model.")) else "unet." + name


FORMAT = KeyFormat("diffusers attention-processor", owns, canonical)
