"""XLabs' FLUX.1 trainer (x-flux): `double_blocks.N.processor.{qkv,proj}_lora{1,2}` with
`down`/`up` tensors; 1 is the image stream, 2 the text stream. Canonical: the BFL module name
behind ComfyUI's `diffusion_model.` prefix (`…img_attn.qkv`, `…txt_attn.proj`)."""

import re

from webui.networks.format.key_formats.format import KeyFormat

_NAME = re.compile(
    r"^(?:diffusion_model\.)?(double_blocks\.\d+)\.processor\.(qkv|proj)_lora([12])$"
)
_STREAM = {"1": "img", "2": "txt"}


def owns(prefix: str) -> bool:
    return _NAME.match(prefix) is not None


def canonical(prefix: str) -> str:
    match = _NAME.match(prefix)
    assert match is not None
    block, kind, stream = match.groups()
    return f"diffusion_model.{block}.{_STREAM[stream]}_attn.{kind}"


FORMAT = KeyFormat("XLabs", owns, canonical)
