"""The noise floor of `lora_apply.py`'s paired step times: the same pairing (ABBA, one warm-up
step, the parameters pointed at one weight set or the other), but both sets hold the *same*
values: the model's own weights against a copy of them in new memory. Any ratio away from 1 here
is the machine, not the weights.

    python -m bench.step_noise --arch sd15 --latent 32 --pairs 10 --out bench/results/step_noise_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from bench.lora_apply import (
    BenchArch,
    BenchSettings,
    build_pipeline,
    environment,
    paired_steps,
    resolve_dtype,
    unet_inputs,
    unet_parameters,
    write_result,
)
from webui.engine.model_factory import ModelSize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    arch = BenchArch(args.arch)
    device = torch.device("cpu")
    settings = BenchSettings(
        arch=arch,
        device=device,
        dtype=resolve_dtype("auto", device, arch),
        rank=0,
        repeats=1,
        latent=args.latent,
        size=ModelSize.FULL,
        unet_only=True,
    )
    pipe = build_pipeline(settings)
    inputs = unet_inputs(pipe, settings)
    copy = unet_parameters(pipe.unet, copy=True)
    # "base" is the copy, "patched" the model's own tensors: identical values
    pairs = paired_steps(device, pipe, inputs, copy, args.pairs)
    ratios = [own.wall / copied.wall for copied, own in pairs]
    result = {
        "environment": environment("bench.step_noise"),
        "arch": arch.value,
        "dtype": str(settings.dtype).removeprefix("torch."),
        "latent": args.latent,
        "own_over_copy_per_pair": ratios,
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
