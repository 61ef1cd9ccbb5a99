"""Scale-out benchmark: 2 CPU replicas on the tiny model, 200 requests drawn from 8 LoRA sets with
Zipf(1.1) popularity, 4 concurrent clients; module writes, set switches and p50/p95 latency with
the LoRA-aware router and with Ray Serve's default router, in one run.

    RAY_AUTH_MODE=disabled python bench/cluster.py [--requests 200] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import ray
from lora_files import write_kohya_layers
from ray import serve

from webui.arch import Arch, Prediction
from webui.cluster.board import board
from webui.cluster.deployment import APP_NAME, ReplicaPlan, RouterChoice
from webui.cluster.front import (
    ClusterOptions,
    FrontEngine,
    cluster_front,
    connect,
    start_replicas,
)
from webui.engine.checkpoints import ModelKind, save_single_file
from webui.engine.generate import GenerationRequest
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.settings import DeviceChoice, Settings

SETS = 8
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def zipf_sets(count: int, s: float, seed: int) -> list[int]:
    weights = [1 / (k**s) for k in range(1, SETS + 1)]
    rng = random.Random(seed)
    return rng.choices(range(SETS), weights, k=count)


def prepare(root: Path) -> Settings:
    """The tiny SD1 model and 8 LoRAs, each over different modules (one projection kind)."""
    for name in ("models", "loras"):
        (root / name).mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(ModelSpec(Arch.SD1))
    save_single_file(
        pipe,
        ModelKind(Arch.SD1, Prediction.EPSILON),
        root / "models" / "tiny.safetensors",
        embed_configs=True,
    )
    for i, projection in enumerate(PROJECTIONS):
        write_kohya_layers(
            root / "loras" / f"set{i}.safetensors",
            pipe,
            Arch.SD1,
            include=lambda _c, path, p=projection: path.endswith("." + p),
            seed=i,
        )
    return Settings(
        models_dir=root / "models",
        loras_dir=root / "loras",
        outputs_dir=root / "out",
        cache_dir=root / "cache",
        device=DeviceChoice.CPU,
        save_outputs=False,
    )


def run(settings: Settings, router: RouterChoice, sets: list[int], steps: int) -> dict:
    plan = ReplicaPlan(replicas=2, router=router)
    handle = start_replicas(settings, ClusterOptions(plan=plan))
    queue = cluster_front(FrontEngine(settings), handle)
    jobs = board()
    warm = [queue.generate(GenerationRequest("warm", steps=1, width=64, height=64, seed=0))]
    del warm
    before = {r.job_id for r in ray.get(jobs.history.remote())}

    def one(i_set: tuple[int, int]) -> float:
        i, s = i_set
        start = time.perf_counter()
        request = GenerationRequest(
            f"request {i} <lora:set{s}>", steps=steps, width=64, height=64, seed=i
        )
        queue.generate(request)
        return time.perf_counter() - start

    started = time.perf_counter()
    with ThreadPoolExecutor(4) as clients:
        latencies = sorted(clients.map(one, enumerate(sets)))
    wall = time.perf_counter() - started
    records = [r for r in ray.get(jobs.history.remote()) if r.job_id not in before]
    serve.delete(APP_NAME)
    return {
        "router": router.value,
        "requests": len(records),
        "set_switches": sum(r.switched for r in records),
        "module_writes": sum(r.modules_written for r in records),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
        "wall_s": round(wall, 1),
        "per_replica": {
            rep: sum(1 for r in records if r.replica == rep) for rep in {r.replica for r in records}
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        settings = prepare(root)
        connect(ClusterOptions(temp_dir=str(root / "ray")))
        sets = zipf_sets(args.requests, 1.1, args.seed)
        results = [run(settings, r, sets, args.steps) for r in RouterChoice]
        print(json.dumps(results, indent=2))
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
