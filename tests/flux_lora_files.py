"""A small kohya sd-scripts FLUX.1 LoRA for end-to-end tests, shaped after a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def write_flux_lora(path: Path, checkpoint: Path, *, double: bool = True) -> None:
    """A kohya sd-scripts FLUX.1 LoRA on the first double block's fused image qkv and the first
    single block's fused linear1 (q, k, v and MLP), shaped after the checkpoint's own weights."""
    prefix = "model.diffusion_model."
    with safe_open(checkpoint, "pt") as f:
        shapes = {
            name: f.get_slice(f"{prefix}{name}.weight").get_shape()
            for name in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1")
        }
    g = torch.Generator().manual_seed(7)
    tensors: dict[str, torch.Tensor] = {}
    for name, (rows, cols) in shapes.items():  # drawn in full either way: equal single parts
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_up.weight"] = torch.randn(rows, 4, generator=g) * 0.5
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, cols, generator=g) * 0.5
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    if not double:
        tensors = {k: v for k, v in tensors.items() if "double_blocks" not in k}
    save_file(tensors, path, metadata={"ss_base_model_version": "flux1"})
