"""The router's ranking, without Ray: module counts worked by hand from small module sets."""

from __future__ import annotations

from webui.cluster.affinity import (
    MAX_AHEAD,
    LoraSet,
    ReplicaView,
    rank_replicas,
    switch_cost,
)

MODULES = {
    "a.safetensors": frozenset({"q1", "q2", "k1"}),
    "b.safetensors": frozenset({"k1", "v1"}),
    "c.safetensors": frozenset({"o1"}),
}
A, B, C = ("a.safetensors", "1.0"), ("b.safetensors", "1.0"), ("c.safetensors", "1.0")
ALL_FILES = frozenset(MODULES)


def held(*entries: tuple[str, str], checkpoint: str | None = "m") -> LoraSet:
    return LoraSet(checkpoint, frozenset(entries))


def test_switch_cost_counts_each_module_once() -> None:
    assert switch_cost(held(), held(A), MODULES) == 3
    assert switch_cost(held(A), held(A), MODULES) == 0
    # a and b both touch k1: {q1, q2, k1} | {k1, v1} is 4 modules, not 5
    assert switch_cost(held(A), held(B), MODULES) == 4
    assert switch_cost(held(A, B), held(A), MODULES) == 2  # b off: k1, v1
    # a strength change rewrites a's modules
    assert switch_cost(held(A), held(("a.safetensors", "0.5")), MODULES) == 3


def test_the_replica_holding_the_set_ranks_first_then_the_cheapest_switch() -> None:
    views = [
        ReplicaView("r1", held(B), ALL_FILES),  # to {a, c}: b off, a and c on: 5 modules
        ReplicaView("r2", held(A), ALL_FILES),  # c on: 1 module
        ReplicaView("r3", held(A, C), ALL_FILES),  # nothing to write
        ReplicaView("r4", held(A, C), ALL_FILES),
    ]
    assert rank_replicas(views, held(A, C), MODULES) == [["r3", "r4"], ["r2"], ["r1"]]


def test_another_checkpoint_ranks_after_every_replica_with_the_right_one() -> None:
    views = [
        ReplicaView("other", held(A, checkpoint="x"), ALL_FILES),
        ReplicaView("same", held(B, C), ALL_FILES),
    ]
    assert rank_replicas(views, held(A), MODULES) == [["same"], ["other"]]


def test_a_replica_with_no_model_loaded_yet_ranks_by_its_module_cost() -> None:
    # nothing loaded: it loads the checkpoint whatever happens; b on is 2 modules against
    # a off + b on (4) at the replica holding a
    views = [ReplicaView("fresh", LoraSet(), ALL_FILES), ReplicaView("holds-a", held(A), ALL_FILES)]
    assert rank_replicas(views, held(B), MODULES) == [["fresh"], ["holds-a"]]


def test_a_replica_without_a_named_file_is_never_chosen() -> None:
    views = [
        ReplicaView("lacks-a", held(A), ALL_FILES - {"a.safetensors"}),
        ReplicaView("has-all", held(B), ALL_FILES),
    ]
    assert rank_replicas(views, held(A), MODULES) == [["has-all"]]


def test_a_replica_not_yet_reported_ranks_by_its_switch_cost() -> None:
    # a fresh replica holds nothing: 3 modules to apply a, against 4 from b
    views = [ReplicaView("known", held(B), ALL_FILES), ReplicaView("new", held())]
    assert rank_replicas(views, held(A, checkpoint=None), MODULES) == [["new"], ["known"]]


def test_a_replica_with_a_job_of_the_set_pending_costs_nothing() -> None:
    # "b-tail" last got a job of b (4 modules to a), but a job of a still waits there
    views = [
        ReplicaView("b-tail", held(B), ALL_FILES, pending=frozenset({held(A), held(B)}), queued=2),
        ReplicaView("c-held", held(C), ALL_FILES, queued=1),  # a on, c off: 4 modules
    ]
    assert rank_replicas(views, held(A), MODULES) == [["b-tail"], ["c-held"]]


def test_an_idle_replica_ranks_first_once_the_best_has_max_ahead_jobs() -> None:
    def views(queued: int) -> list[ReplicaView]:
        return [
            ReplicaView("holder", held(A), ALL_FILES, pending=frozenset({held(A)}), queued=queued),
            ReplicaView("idle", held(B), ALL_FILES),
        ]

    assert rank_replicas(views(MAX_AHEAD - 1), held(A), MODULES) == [["holder"], ["idle"]]
    assert rank_replicas(views(MAX_AHEAD), held(A), MODULES) == [["idle"], ["holder"]]
    # the bound never sends a job to a replica lacking its file
    lacking = [
        ReplicaView("holder", held(A), ALL_FILES, queued=MAX_AHEAD + 3),
        ReplicaView("idle", held(B), ALL_FILES - {"a.safetensors"}),
    ]
    assert rank_replicas(lacking, held(A), MODULES) == [["holder"]]


def test_requests_go_to_the_replica_holding_their_set() -> None:
    """The routing decision replayed over alternating sets, one request at a time, from the
    state that made the end-to-end test flaky: each replica holds a set that costs the same to
    leave (q-like and v-like files of 3 modules each), so every step used to be a tie that
    Ray Serve broke at random. The router's own record (last set sent, jobs pending, when it
    last sent there) must place each set on one replica, the two on different ones."""
    modules = {
        "q.safetensors": frozenset({"q1", "q2", "q3"}),
        "k.safetensors": frozenset({"k1", "k2", "k3"}),
        "v.safetensors": frozenset({"v1", "v2", "v3"}),
    }
    files = frozenset(modules)
    q, k = ("q.safetensors", "1.0"), ("k.safetensors", "1.0")
    state = {"r1": held(("q.safetensors", "0.8")), "r2": held(("v.safetensors", "1.0"))}
    last_sent = {"r1": -1, "r2": -1}
    placed: dict[tuple[str, str], set[str]] = {}
    for sends, entry in enumerate([q, k, q, k, q, k]):
        views = [ReplicaView(r, state[r], files, modules, last_sent=last_sent[r]) for r in state]
        ranks = rank_replicas(views, held(entry), modules)
        if sends:  # the first request costs 3 modules on both, neither sent to yet: a tie
            assert len(ranks[0]) == 1, f"step {sends}: a tie left to chance: {ranks}"
        chosen = ranks[0][0]
        placed.setdefault(entry, set()).add(chosen)
        state[chosen], last_sent[chosen] = held(entry), sends
    assert len(placed[q]) == 1 and len(placed[k]) == 1 and placed[q] != placed[k]
