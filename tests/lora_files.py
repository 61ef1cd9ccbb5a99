"""LoRA files for tests, written the way kohya's trainer names them."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from webui.arch import Arch
from webui.engine.model_factory import ModelSpec, build_pipeline


def write_kohya_lora(path: Path, arch: Arch, metadata: dict[str, str] | None = None) -> None:
    """A kohya-format LoRA over every attention projection of the tiny model's UNet and text
    encoder, with random values (names built from the modules' diffusers paths, as kohya does)."""
    pipe = build_pipeline(ModelSpec(arch))
    generator = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    models = [
        ("lora_unet", pipe.unet),
        ("lora_te" if arch is not Arch.SDXL else "lora_te1", pipe.text_encoder),
    ]
    if arch is Arch.SDXL:
        models.append(("lora_te2", pipe.text_encoder_2))
    for prefix, model in models:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in (
                "to_q",
                "to_k",
                "to_v",
                "q_proj",
                "v_proj",
            ):
                key = f"{prefix}_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = (
                    torch.randn(4, module.in_features, generator=generator) * 0.3
                )
                tensors[f"{key}.lora_up.weight"] = (
                    torch.randn(module.out_features, 4, generator=generator) * 0.3
                )
                tensors[f"{key}.alpha"] = torch.tensor(2.0)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
