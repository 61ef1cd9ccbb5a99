"""What diffusers 0.42.1's FLUX.1 LoRA loader (`FluxLoraLoaderMixin.load_lora_weights`) cannot
take, told from a file's keys alone, so that the fallback refuses it in one sentence before
diffusers sees it.

Checked on the tiny test transformer (2 heads x 16) and against diffusers' converters: PEFT
`transformer.`/`text_encoder.` names, kohya (`lora_unet_`, ComfyUI's `diffusion_model.` with
`lora_down`), XLabs and OneTrainer load at any width, and kohya's fused `qkv` is split evenly; but
- the kohya converter splits single-block `linear1` at the full model's rows only (an assert);
- OneTrainer's converter reads an `alpha` for every layer (a KeyError without);
- any key holding `base_model` is read as fal's BFL layout of the full 19 + 38 blocks;
- T5 is not a LoRA component of FluxPipeline: its layers are dropped with a log line."""

from __future__ import annotations

import re

from webui.networks.format.modules.lora import LoraModule
from webui.networks.format.network import Network

FULL_WIDTH = 3072
FULL_MLP = 12288
FULL_LINEAR1_ROWS = 3 * FULL_WIDTH + FULL_MLP  # q, k, v and the MLP input of one single block
_T5_PREFIXES = ("lora_te2_", "lora_te3_", "text_encoder_2.", "text_encoders.t5xxl.")
_LINEAR1 = re.compile(r"single_blocks[._]\d+[._]linear1$")
_ONETRAINER = "lora_transformer_"
_PEFT_WRAPPER = "base_model.model."
# fal's converter knows these BFL roots; diffusers names under `base_model.model.` break it
_BFL_ROOTS = ("double_blocks.", "single_blocks.", "final_layer.", "img_in", "txt_in", "time_in")
_XLABS = "XLabs"


def flux_refusal(network: Network) -> str | None:
    """Why diffusers' FLUX.1 loader cannot load `network` correctly (None: it can try)."""
    prefixes = list(network.modules) + list(network.unsupported)
    t5 = [p for p in prefixes if p.removeprefix(_PEFT_WRAPPER).startswith(_T5_PREFIXES)]
    if t5:
        return (
            f"T5 (te2) layers such as {t5[0]}, which diffusers' FLUX.1 loader drops "
            "(it loads the transformer and CLIP-L only)"
        )
    wrapped = [p for p in prefixes if p.startswith(_PEFT_WRAPPER)]
    if any(not p[len(_PEFT_WRAPPER) :].startswith(_BFL_ROOTS) for p in wrapped):
        return (
            f"PEFT `{_PEFT_WRAPPER}` names on diffusers layers, which diffusers' FLUX.1 loader "
            "mistakes for fal's BFL layout"
        )
    if network.base.key_format != _XLABS:
        rows = sorted(
            {
                module.up.shape[0]
                for prefix, module in network.modules.items()
                if isinstance(module, LoraModule) and _LINEAR1.search(prefix)
            }
            - {FULL_LINEAR1_ROWS}
        )
        if rows:
            return (
                f"fused single-block linear1 layers of {rows[0]} rows, which diffusers' FLUX.1 "
                f"converter splits only at the full model's {FULL_LINEAR1_ROWS} "
                f"({FULL_WIDTH} x 3 + {FULL_MLP})"
            )
    if any(p.startswith(_ONETRAINER) for p in prefixes):
        no_alpha = [
            p
            for p, m in network.modules.items()
            if isinstance(m, LoraModule) and getattr(m, "alpha", None) is None
        ]
        if no_alpha:
            return (
                f"OneTrainer layers without alpha such as {no_alpha[0]}, which diffusers' "
                "FLUX.1 converter requires"
            )
    return None
