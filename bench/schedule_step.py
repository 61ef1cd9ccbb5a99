"""Per-step cost of a LoRA strength schedule: how long `NetworkPatcher.set_step` takes between
denoising steps when a UNet strength changes every step (`unet=0@0,1@N`), next to the cost of
one UNet step. Full-size SD1.5 (random weights), one synthetic rank-32 kohya LoRA.

    python -m bench.schedule_step --steps 6 --out bench/results/schedule_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.lora_apply import (
    BenchArch,
    BenchSettings,
    build_pipeline,
    lora_targets,
    unet_inputs,
    unet_step,
    write_lora,
    write_result,
)
from webui.engine.model_factory import ModelSize
from webui.networks.apply import NetworkPatcher, Strengths
from webui.networks.format import read_network
from webui.prompt import parse_prompt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = BenchSettings(
        arch=BenchArch("sd15"),
        device=torch.device("cpu"),
        dtype=torch.float32,
        rank=args.rank,
        repeats=1,
        latent=args.latent,
        size=ModelSize.FULL,
        unet_only=True,
    )
    pipe = build_pipeline(settings)
    folder = Path(tempfile.mkdtemp())
    write_lora(
        folder / "a.safetensors", lora_targets(pipe, settings.arch), args.rank, 1, settings.arch
    )
    network = read_network(folder / "a.safetensors")
    tag = parse_prompt(f"<lora:a:unet=0@0,1@{args.steps}>").tags[0]
    strengths = Strengths(
        te=tag.te1, unet=tag.unet, in_blocks=tag.in_blocks, mid=tag.mid, out=tag.out
    )
    patcher = NetworkPatcher(pipe, settings.arch.arch)
    started = time.perf_counter()
    patcher.apply([(network, strengths)], step=1, total_steps=args.steps)
    first_apply = time.perf_counter() - started
    per_step = []
    for step in range(2, args.steps + 1):
        started = time.perf_counter()
        report = patcher.set_step(step, args.steps)
        per_step.append(time.perf_counter() - started)
        assert report is not None and report.modules_changed > 0
    step_fn = unet_step(pipe, unet_inputs(pipe, settings))
    started = time.perf_counter()
    step_fn()
    unet_seconds = time.perf_counter() - started
    result = {
        "modules": report.modules_changed,
        "first_apply_s": first_apply,
        "set_step_median_s": statistics.median(per_step),
        "set_step_all_s": per_step,
        "unet_step_s": unet_seconds,
        "latent": args.latent,
        "torch": torch.__version__,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
