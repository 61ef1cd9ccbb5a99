"""The replicas as a Ray Serve application: one engine per replica (`num_gpus` each), behind
the LoRA-aware router or Ray Serve's default one. `build` is the `serve deploy` entry point."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from webui.cluster.replica import DEPLOYMENT_NAME, GenerationReplica
from webui.settings import Settings

APP_NAME = "lora-webui"
LORA_ROUTER = "webui.cluster.router:LoraAwareRouter"


class RouterChoice(StrEnum):
    LORA = "lora"  # what each replica holds decides, then load; replicas group jobs by set
    DEFAULT = "default"  # Ray Serve's own (power of two choices on queue length), arrival order


@dataclass(frozen=True)
class ReplicaPlan:
    """How many replicas, what each takes from the cluster, and how requests reach them."""

    replicas: int = 2
    gpus: float = 0.0  # per replica: 1 is one replica per GPU, 0.5 two per GPU
    cpus: float = 1.0
    router: RouterChoice = RouterChoice.LORA
    max_queued: int = 8  # jobs waiting at one replica


def replica_app(settings: Settings, plan: ReplicaPlan) -> serve.Application:
    router = (
        RequestRouterConfig(
            request_router_class=LORA_ROUTER,
            # what a replica holds is reported every second; the router knows its own sends
            request_routing_stats_period_s=1,
            request_routing_stats_timeout_s=5,
        )
        if plan.router is RouterChoice.LORA
        else RequestRouterConfig()
    )
    deployment = serve.deployment(
        GenerationReplica,
        name=DEPLOYMENT_NAME,
        num_replicas=plan.replicas,
        max_ongoing_requests=plan.max_queued,
        ray_actor_options={"num_gpus": plan.gpus, "num_cpus": plan.cpus},
        request_router_config=router,
        health_check_period_s=2,
        health_check_timeout_s=30,
    )
    return deployment.bind(settings, group_sets=plan.router is RouterChoice.LORA)


def build(args: dict[str, Any]) -> serve.Application:
    """`serve deploy` builder: args `models_dir`, `loras_dir`, `embeddings_dir`, `replicas`,
    `gpus_per_replica`, `router` (see docs/scale-out.md)."""
    defaults = Settings()
    settings = Settings(
        models_dir=Path(args.get("models_dir", defaults.models_dir)),
        loras_dir=Path(args.get("loras_dir", defaults.loras_dir)),
        embeddings_dir=Path(args.get("embeddings_dir", defaults.embeddings_dir)),
        save_outputs=False,
    )
    plan = ReplicaPlan(
        replicas=int(args.get("replicas", 2)),
        gpus=float(args.get("gpus_per_replica", 1)),
        router=RouterChoice(args.get("router", "lora")),
    )
    return replica_app(settings, plan)
