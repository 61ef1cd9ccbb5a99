"""Benchmark: what a switch costs besides the arithmetic.

Builds the full SD1.5 or SDXL UNet *structure* (every block, every transformer layer: the same
250 / 767 modules a `lora_apply.py` file touches) with narrow channels, so that each module's
product is a few thousand multiply-adds. Then it switches between two sets of three rank-4
LoRAs. What is left is what every module costs regardless of its size: Python, planning, op
dispatch and, on a GPU, kernel launches. That cost bounds a full-size switch from below, where
the products are fast (the <= 50 ms SDXL switch target on a GPU).

    python -m bench.switch_overhead --arch sdxl --out bench/results/switch_overhead_sdxl_cpu.json
    python -m bench.switch_overhead --arch sdxl --device cuda --out bench/results/switch_overhead_sdxl_cuda.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from bench.lora_apply import (
    BenchArch,
    UnetOnly,
    environment,
    lora_targets,
    write_lora,
    write_result,
)
from webui.engine.model_factory import ModelSize, ModelSpec, component_configs
from webui.networks.apply import NetworkPatcher
from webui.networks.format import read_network

# channels per block and attention heads; the block and layer counts stay those of the model
_NARROW = {
    BenchArch.SD15: {"block_out_channels": [32, 32, 64, 64], "attention_head_dim": 2},
    BenchArch.SDXL: {"block_out_channels": [32, 64, 128], "attention_head_dim": [1, 2, 4]},
}


def narrow_unet(arch: BenchArch) -> UNet2DConditionModel:
    config = dict(component_configs(ModelSpec(arch.arch, size=ModelSize.FULL))["unet"])
    config |= _NARROW[arch] | {"norm_num_groups": 8, "cross_attention_dim": 64}
    if arch is BenchArch.SDXL:  # the added time embedding: text embeds plus 6 time ids
        config |= {"addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 64 + 48}
    return UNet2DConditionModel.from_config(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=[a.value for a in BenchArch], default="sdxl")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16")
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    arch, device = BenchArch(args.arch), torch.device(args.device)
    model = UnetOnly(narrow_unet(arch).to(device, getattr(torch, args.dtype)))
    targets = lora_targets(model, arch)
    with tempfile.TemporaryDirectory() as work:
        paths = [Path(work) / f"{name}.safetensors" for name in "ABCD"]
        for seed, path in enumerate(paths):
            write_lora(path, targets, 4, seed, arch)
        a, b, c, d = (read_network(path) for path in paths)
    sets = ([(a, 0.8), (b, 0.6), (c, 0.5)], [(a, 0.8), (b, 0.6), (d, 0.5)])
    patcher = NetworkPatcher(model, arch.arch)
    patcher.apply(sets[0])
    patcher.apply(sets[1])  # warm-up: buffers, first patches
    seconds: list[float] = []
    for i in range(args.switches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        patcher.apply(sets[i % 2])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    write_result(
        {
            "environment": environment("bench.switch_overhead"),
            "arch": arch.value,
            "device": str(device),
            "dtype": args.dtype,
            "modules": len(targets),
            "switch_ms": [s * 1000 for s in seconds],
            "median_ms": median * 1000,
            "per_module_us": median / len(targets) * 1e6,
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
