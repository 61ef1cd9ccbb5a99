"""kohya sd-scripts and LyCORIS-in-kohya names: `lora_unet_…`, `lora_te_…`, `lora_te1_…`, `lora_te2_…`
(networks/lora.py: the module path with dots replaced by underscores). diffusers'
`convert_state_dict_to_kohya` leaves the last dots of some keys (`…_attn1.to_k.lora_magnitude_vector`),
so every dot of the prefix is flattened: both spellings of one module become one name. TheLastBen's
FLUX.1 files (sd-scripts' networks on diffusers' transformer) end each name with `_`
(`lora_unet_transformer_blocks_0_attn_to_q_.alpha`): no module path ends with `_`, so it is dropped."""

import re

from webui.networks.format.key_formats.format import KeyFormat

_PREFIX = re.compile(r"^(lora|oft)_(unet|te[1-4]?|transformer)[._]")


def owns(prefix: str) -> bool:
    return _PREFIX.match(prefix) is not None


def canonical(prefix: str) -> str:
    return prefix.replace(".", "_").rstrip("_")


FORMAT = KeyFormat("kohya", owns, canonical)
