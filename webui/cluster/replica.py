"""One generation replica: an Engine (one model, one job at a time) inside a Ray Serve
deployment. It reports what it holds to the router and its jobs' progress to the board."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve

from webui.cluster.affinity import LoraSet, switch_cost
from webui.cluster.board import JobRecord, board
from webui.cluster.job import ClusterJob, lora_key
from webui.cluster.turns import SetTurns
from webui.engine.generate import Engine, GenerationResult, Progress, Stage
from webui.engine.jobs import JobQueue
from webui.settings import Settings

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "GenerationReplica"
FILES_TTL_S = 10.0  # how long a listing of loras/ is trusted


class GenerationReplica:
    """Runs jobs on its own engine, those of the set it holds first (`SetTurns`) unless
    `group_sets` is off;
    `record_routing_stats` tells the router the checkpoint and LoRA set it holds and which
    LoRA files its node has."""

    def __init__(self, settings: Settings, group_sets: bool = True) -> None:
        self.settings = settings
        self.engine = Engine(settings)
        self.queue = JobQueue.for_engine(self.engine)
        # without grouping (behind Ray Serve's default router) jobs run in arrival order
        self.turns = SetTurns() if group_sets else SetTurns(max_skips=0)
        self.modules: dict[str, frozenset[str]] = {}
        self.tag = serve.get_replica_context().replica_id.unique_id
        self._files: tuple[float, frozenset[str]] = (0.0, frozenset())

    async def generate(self, job: ClusterJob) -> GenerationResult:
        return await asyncio.to_thread(self._run, job)

    @property
    def held(self) -> LoraSet:
        return self.turns.held

    def _run(self, job: ClusterJob) -> GenerationResult:
        with self.turns.turn(job.wanted, job.modules):
            return self._run_now(job)

    def _run_now(self, job: ClusterJob) -> GenerationResult:
        jobs = board()
        written = switch_cost(self.held, job.wanted, {**self.modules, **job.modules})
        switched = self.held.entries != job.wanted.entries
        if jobs is not None:
            record = JobRecord(
                job.job_id, job.name, job.request.prompt, self.tag, os.getpid(), job.attempt,
                time.time(),
            )  # fmt: skip
            ray.get(jobs.start.remote(record))

        def report(p: Progress) -> None:
            if jobs is None or p.stage is not Stage.DENOISE:
                return
            if ray.get(jobs.progress.remote(job.job_id, p.step, p.total)):
                self.queue.interrupt()

        try:
            result = self.queue.generate(job.request, on_progress=report, model=job.model)
        finally:
            if jobs is not None:
                jobs.finish.remote(job.job_id, written, switched)
        loaded = self.engine.model
        self.turns.held = LoraSet(loaded.name if loaded else None, job.wanted.entries)
        self.modules = {path: job.modules[path] for path in job.wanted.files if path in job.modules}
        return result

    def record_routing_stats(self) -> dict[str, Any]:
        return {
            "checkpoint": self.held.checkpoint,
            "entries": sorted(self.held.entries),
            "modules": {path: sorted(keys) for path, keys in self.modules.items()},
            "files": sorted(self._lora_files()),
        }

    def _lora_files(self) -> frozenset[str]:
        """The LoRA files this node has (listed again every FILES_TTL_S)."""
        listed_at, files = self._files
        if time.monotonic() - listed_at > FILES_TTL_S:
            root = Path(self.settings.loras_dir)
            found = (p for p in root.rglob("*") if p.is_file()) if root.is_dir() else ()
            files = frozenset(lora_key(p, root) for p in found)
            self._files = (time.monotonic(), files)
        return files
