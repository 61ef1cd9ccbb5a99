"""Benchmark: extracting one LoRA from a combination of two, on a full-size random-weight SD1.5
(or, with --quick, the tiny test model).

Writes the checkpoint (fp16 single file) and two synthetic kohya LoRAs of rank --rank (the
`bench.lora_apply` targets: every attention, feed-forward, proj_in/out, resnet conv and text
encoder projection), then extracts their combination (0.8 A + 0.6 B) at each --ranks value
(2 x rank reproduces it exactly) and records time, file size and the relative errors.

    python -m bench.extract --quick
    python -m bench.extract --device cpu --ranks 64,16 --out bench/results/extract_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.lora_apply import BenchArch, environment, lora_targets, peak_rss_gb, write_lora
from webui.arch import Arch, Prediction
from webui.engine.checkpoints import ModelKind, save_single_file
from webui.engine.extract import extract_combination, load_combination
from webui.engine.model_factory import ModelSize, ModelSpec, build_pipeline
from webui.networks.apply import RankRule

log = logging.getLogger("bench.extract")
STRENGTHS = (0.8, 0.6)


def run(
    size: ModelSize, rank: int, ranks: list[int], device: torch.device, work: Path
) -> dict[str, Any]:
    pipe = build_pipeline(ModelSpec(Arch.SD1, size=size), dtype=torch.float16)
    model = work / "sd15.safetensors"
    save_single_file(
        pipe, ModelKind(Arch.SD1, Prediction.EPSILON), model, embed_configs=size is ModelSize.TINY
    )
    targets = lora_targets(pipe, BenchArch.SD15)
    del pipe
    loras = []
    for seed, strength in enumerate(STRENGTHS):
        path = work / f"lora{seed}.safetensors"
        write_lora(path, targets, rank, seed, BenchArch.SD15)
        loras.append((path, strength))
    runs = []
    for kept in ranks:
        out = work / f"extracted-{kept}.safetensors"
        started = time.perf_counter()
        result = extract_combination(
            model, load_combination(loras), out, RankRule(rank=kept), device=device
        )
        runs.append(
            {
                "rank": kept,
                "seconds": round(time.perf_counter() - started, 1),
                "modules": len(result.modules),
                "file_mb": round(result.file_bytes / 2**20, 1),
                "sources_mb": round(result.source_bytes / 2**20, 1),
                "dense_mb": round(result.dense_bytes / 2**20, 1),
                "overall_relative_error": result.overall_error,
                "mean_relative_error": result.mean_error,
                "worst_relative_error": result.worst.relative_error,
                "worst_module": result.worst.name,
            }
        )
        log.info("%s", runs[-1])
    return {
        "model": f"SD1.5 {size.value}",
        "source_rank": rank,
        "strengths": STRENGTHS,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model: a smoke run")
    parser.add_argument("--device", default="cpu", help="where the SVDs run")
    parser.add_argument("--rank", type=int, default=32, help="rank of each source LoRA")
    parser.add_argument("--ranks", default="64,16", help="ranks to extract at, comma-separated")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    size = ModelSize.TINY if args.quick else ModelSize.FULL
    ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory() as work:
        result = run(size, args.rank, ranks, torch.device(args.device), Path(work))
    env = environment() | {"command": "python -m bench.extract " + " ".join(argv or sys.argv[1:])}
    result |= {"environment": env, "peak_rss_gb": peak_rss_gb(), "device": args.device}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
