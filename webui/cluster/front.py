"""The front: the same A1111 API and UI as `python app.py`, with a job queue that sends each
job to a replica through Ray Serve (routing, retries once when a replica is lost) and reads
progress and interrupts through the job board."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from webui.cluster.board import NAMESPACE, board
from webui.cluster.deployment import APP_NAME, ReplicaPlan, replica_app
from webui.cluster.job import ClusterJob, wanted_set
from webui.cluster.replica import DEPLOYMENT_NAME
from webui.engine.checkpoints import CheckpointError
from webui.engine.generate import (
    Engine,
    GenerationRequest,
    GenerationResult,
    Progress,
    ProgressCallback,
)
from webui.engine.jobs import JobQueue, JobStatus
from webui.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_S = 0.25  # how often a waiting job's progress is read from the board
_LOST = (RayActorError, ActorUnavailableError)


class ReplicaLostError(RuntimeError):
    """A job's replica died twice (its process or node went away); nothing was made."""


class FrontEngine(Engine):
    """The front's engine: lists checkpoints and LoRAs and never loads a model; the model it
    names (`default_model`, what /options and the UI's picker show) is the one every job is
    sent with, so each replica runs the model the front reports."""

    chosen: str | None = None  # set through /options or the UI's model picker

    def default_model(self) -> str:
        return self.chosen if self.chosen in self.model_choices() else super().default_model()


class ClusterJobQueue(JobQueue):
    """`JobQueue` over the replicas: jobs run side by side, one per replica at a time."""

    engine: FrontEngine

    def __init__(self, engine: FrontEngine, handle: Any, jobs: Any) -> None:
        super().__init__(engine)
        self.handle = handle
        self.jobs = jobs
        self._count = threading.Lock()
        self._in_flight = 0

    def generate(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None = None,
        model: str | None = None,
        name: str = "txt2img",
    ) -> GenerationResult:
        request.validate()
        model = model or self.engine.default_model()
        wanted, modules = wanted_set(self.engine, request, model)
        job = ClusterJob(uuid.uuid4().hex, name, request, model, wanted, modules)
        with self._count:
            self._in_flight += 1
        try:
            try:
                return self._send(job, on_progress)
            except _LOST as first:
                log.warning("replica lost during job %s (%s); retrying once", job.job_id, first)
                self.jobs.drop.remote(job.job_id)
            try:
                return self._send(dataclasses.replace(job, attempt=2), on_progress)
            except _LOST as second:
                self.jobs.drop.remote(job.job_id)
                raise ReplicaLostError(
                    "the replica running this job was lost twice (process or node gone); "
                    "no image was made: send it again"
                ) from second
        finally:
            with self._count:
                self._in_flight -= 1

    def _send(self, job: ClusterJob, on_progress: ProgressCallback | None) -> GenerationResult:
        response = self.handle.generate.remote(job)
        while True:
            try:
                return response.result(timeout_s=POLL_S)
            except TimeoutError:
                if on_progress is not None:
                    mine = [
                        r for r in ray.get(self.jobs.running.remote()) if r.job_id == job.job_id
                    ]
                    if mine and mine[0].total:
                        on_progress(Progress(mine[0].step, mine[0].total))

    def load(self, model: str) -> Any:
        """Replicas load checkpoints as jobs name them: remember it for the next jobs."""
        if model not in self.engine.model_choices():
            raise CheckpointError(
                f"no checkpoint named {model!r} in {self.engine.settings.models_dir}"
            )
        self.engine.chosen = model
        return None

    def interrupt(self) -> None:
        ray.get(self.jobs.interrupt.remote())

    def status(self) -> JobStatus:
        running = ray.get(self.jobs.running.remote())
        with self._count:
            count = self._in_flight
        if not running:
            return JobStatus(job_count=count)
        first = running[0]
        return JobStatus(
            job=first.name,
            job_count=count,
            job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(first.started)),
            step=first.step,
            total=first.total,
            interrupted=first.interrupted,
            elapsed=time.time() - first.started,
        )

    def run(self, name: str, work: Callable[[ProgressCallback], T]) -> T:
        raise NotImplementedError("cluster jobs are generations; see ClusterJobQueue.generate")


@dataclass(frozen=True)
class ClusterOptions:
    """Where the cluster is and what to start on it."""

    address: str | None = None  # None: a local Ray on 127.0.0.1
    plan: ReplicaPlan = field(default_factory=ReplicaPlan)
    attach: bool = False  # the replicas were deployed with `serve deploy`: only serve the front
    temp_dir: str | None = None  # a local Ray's session folder (default: Ray's own)


def connect(options: ClusterOptions) -> None:
    """Join the cluster at `address`, or start a local one that listens on loopback only."""
    if options.address:
        ray.init(address=options.address, namespace=NAMESPACE, logging_level=logging.WARNING)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        _node_ip_address="127.0.0.1",
        namespace=NAMESPACE,
        include_dashboard=False,
        num_cpus=max(os.cpu_count() or 1, int(options.plan.replicas * options.plan.cpus) + 1),
        logging_level=logging.WARNING,
        _temp_dir=options.temp_dir,
    )


def start_replicas(settings: Settings, options: ClusterOptions) -> Any:
    """The replicas' handle, after deploying them unless `attach`."""
    if not options.attach:
        serve.start(proxy_location="Disabled")
        serve.run(replica_app(settings, options.plan), name=APP_NAME, route_prefix=None)
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)


def cluster_front(engine: FrontEngine, handle: Any) -> ClusterJobQueue:
    """Make the engine's queue the cluster's (the UI and API ask `JobQueue.for_engine`)."""
    queue = ClusterJobQueue(engine, handle, board(create=True))
    JobQueue.install(engine, queue)
    return queue


def add_cluster_routes(app: FastAPI, queue: ClusterJobQueue) -> None:
    """`/cluster/jobs` (which replica ran what) and a clear 503 for lost replicas."""

    def jobs() -> dict[str, Any]:
        running = ray.get(queue.jobs.running.remote())
        done = ray.get(queue.jobs.history.remote())
        return {
            "running": [dataclasses.asdict(r) for r in running],
            "done": [dataclasses.asdict(r) for r in done],
        }

    async def lost(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    app.add_api_route("/cluster/jobs", jobs, methods=["GET"])
    app.router.routes.insert(0, app.router.routes.pop())  # ahead of the UI mounted at /
    app.add_exception_handler(ReplicaLostError, lost)


def serve_cluster(settings: Settings, options: ClusterOptions, access: Any, verbose: bool) -> None:
    """Connect, start the replicas, then serve the UI and API in front of them until stopped."""
    from webui.server import build_app
    from webui.server import serve as serve_http

    connect(options)
    handle = start_replicas(settings, options)
    engine = FrontEngine(settings)
    queue = cluster_front(engine, handle)
    app = build_app(engine, access)
    add_cluster_routes(app, queue)
    log.info("%d replica(s) behind the %s router", options.plan.replicas, options.plan.router)
    serve_http(app, settings.host, settings.port, verbose=verbose)
