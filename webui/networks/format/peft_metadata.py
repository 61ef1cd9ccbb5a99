"""Alphas of PEFT-format files written by diffusers' `save_lora_weights`.

PEFT keeps `lora_alpha` in the adapter config, not in the tensors; diffusers stores that config
as JSON under the safetensors metadata key `lora_adapter_metadata`, flattened per component
(`unet.lora_alpha`, `unet.alpha_pattern`, `text_encoder.r`, ...). Files without it mean
alpha == rank (scale 1), which is also what diffusers assumes."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

METADATA_KEY = "lora_adapter_metadata"
_COMPONENTS = ("text_encoder_2", "text_encoder", "unet", "transformer")


@dataclass(frozen=True)
class PeftAlphas:
    """lora_alpha per component, with PEFT's per-module `alpha_pattern` overrides."""

    default: Mapping[str, float] = field(default_factory=dict)  # component -> lora_alpha
    patterns: Mapping[str, Mapping[str, float]] = field(
        default_factory=dict
    )  # component -> {pattern: alpha}

    def alpha_for(self, prefix: str) -> float | None:
        """The alpha for a module prefix such as `unet.down_blocks.0...to_q`, or None."""
        for component in _COMPONENTS:
            if prefix.startswith(component + "."):
                module = prefix[len(component) + 1 :]
                for pattern, alpha in self.patterns.get(component, {}).items():
                    # PEFT's rule: the pattern matches the end of the module name, at a dot
                    if re.match(rf"(.*\.)?({pattern})$", module):
                        return alpha
                return self.default.get(component)
        return None


def read_peft_alphas(metadata: Mapping[str, str]) -> PeftAlphas:
    """Parse diffusers' adapter metadata; empty when absent or unreadable (with a warning)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return PeftAlphas()
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        log.warning("ignoring unreadable %s metadata", METADATA_KEY)
        return PeftAlphas()
    default: dict[str, float] = {}
    patterns: dict[str, dict[str, float]] = {}
    for key, value in config.items():
        component, _, name = key.partition(".")
        if name == "lora_alpha" and isinstance(value, int | float):
            default[component] = float(value)
        elif name == "alpha_pattern" and isinstance(value, dict):
            patterns[component] = {
                str(k): float(v) for k, v in value.items() if isinstance(v, int | float)
            }
    return PeftAlphas(default, patterns)
