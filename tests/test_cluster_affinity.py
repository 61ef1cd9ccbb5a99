"""The router's ranking, without Ray: module counts worked by hand from small module sets."""

from __future__ import annotations

from webui.cluster.affinity import LoraSet, ReplicaView, rank_replicas, switch_cost

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
