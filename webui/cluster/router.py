"""LoRA-aware request routing as a Ray Serve `RequestRouter`: each job goes to a replica that
has its files, holds its checkpoint and needs the fewest module writes to switch to its LoRA
set; Ray Serve then takes the least loaded of the best rank."""

from __future__ import annotations

from collections.abc import Mapping

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from webui.cluster.affinity import LoraSet, ReplicaView, rank_replicas
from webui.cluster.job import ClusterJob


def view_of(
    replica: RunningReplica,
    routed: LoraSet | None,
    pending: Mapping[str, LoraSet],
    last_sent: int = -1,
) -> ReplicaView:
    """The router's view of `replica`: the set its last routed job will leave applied (this
    router knows it first), else what the replica last reported; `pending`: the sets of the
    jobs this router sent there that have not finished, by request id."""
    stats = replica.routing_stats or {}
    files = stats.get("files")
    modules = {path: frozenset(keys) for path, keys in stats.get("modules", {}).items()}
    reported = LoraSet(
        stats.get("checkpoint"), frozenset(tuple(e) for e in stats.get("entries", ()))
    )
    return ReplicaView(
        replica.replica_id.unique_id,
        routed if routed is not None else reported,
        None if files is None else frozenset(files),
        modules,
        frozenset(pending.values()),
        len(pending),
        last_sent,
    )


class LoraAwareRouter(RequestRouter):
    """Ranks replicas with `rank_replicas`; requests that are not jobs rank all replicas alike."""

    def initialize_state(self, **kwargs: object) -> None:
        self._routed: dict[str, LoraSet] = {}  # replica -> set of the last job sent there
        self._modules: dict[str, frozenset[str]] = {}
        self._pending: dict[str, dict[str, LoraSet]] = {}  # replica -> request id -> set
        self._sends = 0
        self._last_sent: dict[str, int] = {}  # replica -> self._sends at its last job

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        job = _job_of(pending_request)
        if job is None:
            return [candidate_replicas]
        self._modules.update(job.modules)
        views = [
            view_of(
                r,
                self._routed.get(r.replica_id.unique_id),
                self._pending_at(r.replica_id),
                self._last_sent.get(r.replica_id.unique_id, -1),
            )
            for r in candidate_replicas
        ]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranks = rank_replicas(views, job.wanted, self._modules)
        if len(ranks[0]) == 1:  # requests routed at once must see each other's choice
            self._record(pending_request, ranks[0][0], job)
        return [[by_id[replica] for replica in rank] for rank in ranks]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        job = _job_of(pending_request)
        if job is not None:
            self._record(pending_request, replica_id.unique_id, job)

    def _record(self, pending_request: PendingRequest, replica: str, job: ClusterJob) -> None:
        """`job` goes to `replica` (chosen, then confirmed once routed: a move if Ray Serve
        took another replica of the rank)."""
        request_id = pending_request.metadata.internal_request_id
        for jobs in self._pending.values():
            jobs.pop(request_id, None)
        after = _after(job.wanted, self._routed, replica)
        self._routed[replica] = after
        self._pending.setdefault(replica, {})[request_id] = after
        self._sends += 1
        self._last_sent[replica] = self._sends

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._pending_at(replica_id).pop(internal_request_id, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self._routed.pop(replica_id.unique_id, None)
        self._pending.pop(replica_id.unique_id, None)
        super().on_replica_actor_died(replica_id)

    def _pending_at(self, replica_id: ReplicaID) -> dict[str, LoraSet]:
        return self._pending.get(replica_id.unique_id, {})


def _after(wanted: LoraSet, routed: dict[str, LoraSet], replica: str) -> LoraSet:
    """A job with no checkpoint named keeps the replica's."""
    if wanted.checkpoint is not None:
        return wanted
    before = routed.get(replica)
    return LoraSet(before.checkpoint if before else None, wanted.entries)


def _job_of(pending_request: PendingRequest | None) -> ClusterJob | None:
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    return first if isinstance(first, ClusterJob) else None
