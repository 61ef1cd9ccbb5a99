"""Benchmark: what new memory costs this machine, in the state `lora_apply.py` measures in.

Builds the same full-size UNet as `lora_apply.py` (random weights, no LoRA), then fills a new
tensor as large as every weight a LoRA of that benchmark touches, `--fills` times, freeing it in
between. The first fill takes pages the process has never had; the later ones get back pages it
has just freed. Their gap is what a patcher pays for writing into new memory instead of reused
memory, apart from any arithmetic.

    python -m bench.fresh_memory --arch sdxl --out bench/results/fresh_memory_sdxl.json
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from bench.lora_apply import (
    BenchArch,
    BenchSettings,
    build_pipeline,
    environment,
    lora_targets,
    resolve_dtype,
    write_result,
)
from webui.engine.model_factory import ModelSize


def fill_seconds(numel: int, dtype: torch.dtype) -> float:
    """Seconds to allocate and write `numel` elements of new memory."""
    started = time.perf_counter()
    block = torch.empty(numel, dtype=dtype)
    block.fill_(1)
    seconds = time.perf_counter() - started
    del block
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=[a.value for a in BenchArch], default="sdxl")
    parser.add_argument("--dtype", default="auto", help="auto, fp16, bf16 or fp32")
    parser.add_argument("--fills", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    arch, device = BenchArch(args.arch), torch.device("cpu")
    dtype = resolve_dtype(args.dtype, device, arch)
    settings = BenchSettings(arch, device, dtype, 32, 1, 8, ModelSize.FULL, unet_only=True)
    pipe = build_pipeline(settings)
    numel = sum(math.prod(t.shape) for t in lora_targets(pipe, arch))
    gigabytes = numel * torch.finfo(dtype).bits / 8 / 1e9
    fills = [fill_seconds(numel, dtype) for _ in range(args.fills)]
    result = {
        "environment": environment("bench.fresh_memory"),
        "arch": arch.value,
        "dtype": str(dtype).removeprefix("torch."),
        "touched_weights_gb": gigabytes,
        "fill_seconds": fills,
        "fill_gb_per_second": [gigabytes / s for s in fills],
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
