"""Benchmark: the memory a full-size FLUX.1 transformer's weights take with fp8 storage
(`--fp8-storage on`) against bf16, counted on the `meta` device (real names and shapes, no
memory): the transformer is made as an fp8 file loads it, then `keep_fp8` keeps what it keeps.

    python -m bench.fp8_memory --out bench/results/fp8_memory.json
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import diffusers.utils.logging
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel

from bench.lora_apply import environment, write_result
from webui.arch import Arch, FluxVariant
from webui.engine.fp8_storage import keep_fp8
from webui.engine.model_factory import ModelSize, ModelSpec, component_configs

GIB = 2**30


def stored_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters, by dtype."""
    by_dtype: Counter[str] = Counter()
    for param in model.parameters():
        by_dtype[str(param.dtype).removeprefix("torch.")] += param.numel() * param.element_size()
    return dict(by_dtype)


def transformer(variant: FluxVariant, dtype: torch.dtype) -> FluxTransformer2DModel:
    """The full-size transformer on `meta`, every weight in `dtype`."""
    config = component_configs(ModelSpec(Arch.FLUX1, size=ModelSize.FULL, variant=variant))
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config["transformer"])
    return model.to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=[v.value for v in FluxVariant], default="dev")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    diffusers.utils.logging.set_verbosity_error()  # its note on casting with to(): not ours
    variant = FluxVariant(args.variant)
    bf16 = stored_bytes(transformer(variant, torch.bfloat16))
    kept = transformer(variant, torch.float8_e4m3fn)
    layers = keep_fp8(kept, torch.bfloat16)  # what `--fp8-storage on` does at load
    fp8 = stored_bytes(kept)
    result = {
        "variant": variant.value,
        "fp8_linear_layers": layers,
        "bf16_gib": round(sum(bf16.values()) / GIB, 2),
        "fp8_storage_gib": round(sum(fp8.values()) / GIB, 2),
        "fp8_storage_by_dtype_gib": {k: round(v / GIB, 3) for k, v in fp8.items()},
        "environment": environment("bench.fp8_memory"),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
