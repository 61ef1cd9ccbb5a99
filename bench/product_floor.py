"""Benchmark: the arithmetic floor of an exact apply or switch.

Every module a `lora_apply.py` file touches gets base + the sum of the set's deltas, and an
exact patch computes that sum from the factors: one (out x 3r) @ (3r x in) product per module
for three rank-r networks. This times just those products, fp32 into a reused buffer, for every
module shape of the full-size UNet (built on the meta device: shapes only, no weights). Nothing
that recomputes the modules exactly can be faster than this.

    python -m bench.product_floor --arch sdxl --out bench/results/product_floor_sdxl.json
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from bench.lora_apply import BenchArch, UnetOnly, environment, lora_targets, write_result
from webui.engine.model_factory import ModelSize, ModelSpec, component_configs


def unet_target_shapes(arch: BenchArch) -> Counter[tuple[int, int]]:
    """(out, in·k·k) of every UNet module `lora_apply.py` writes a LoRA for, with counts."""
    config = component_configs(ModelSpec(arch.arch, size=ModelSize.FULL))["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return Counter(
        (target.shape[0], math.prod(target.shape[1:]))
        for target in lora_targets(UnetOnly(unet), arch)
    )


def product_seconds(shapes: Counter[tuple[int, int]], rank: int) -> float:
    """Seconds for one `up @ down` of inner size `rank` per module (after one warm-up each)."""
    largest = max(rows * cols for rows, cols in shapes)
    out = torch.empty(largest)
    factors = {
        (rows, cols): (torch.randn(rows, rank), torch.randn(rank, cols)) for rows, cols in shapes
    }
    for (rows, cols), (up, down) in factors.items():
        torch.mm(up, down, out=out[: rows * cols].view(rows, cols))
    started = time.perf_counter()
    for (rows, cols), count in shapes.items():
        up, down = factors[(rows, cols)]
        for _ in range(count):
            torch.mm(up, down, out=out[: rows * cols].view(rows, cols))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=[a.value for a in BenchArch], default="sdxl")
    parser.add_argument("--rank", type=int, default=32, help="rank of each of the 3 networks")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    arch = BenchArch(args.arch)
    shapes = unet_target_shapes(arch)
    inner = 3 * args.rank
    seconds = [product_seconds(shapes, inner) for _ in range(args.repeats)]
    flops = sum(2 * inner * rows * cols * count for (rows, cols), count in shapes.items())
    result = {
        "environment": environment("bench.product_floor"),
        "arch": arch.value,
        "modules": sum(shapes.values()),
        "weights": sum(rows * cols * count for (rows, cols), count in shapes.items()),
        "inner_size": inner,
        "seconds": seconds,
        "gflops": [flops / s / 1e9 for s in seconds],
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
