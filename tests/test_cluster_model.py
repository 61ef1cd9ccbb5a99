"""The reference figure the cluster notes rest on: `time_free_minimum` (bench/cluster_model.py)
is the fewest set switches any scheduler makes, checked on streams small enough to solve by hand."""

from __future__ import annotations

import pytest

from bench.cluster_model import late_binding_run, time_free_minimum
from webui.cluster.affinity import LoraSet

A, B, C = (LoraSet("m", frozenset({(name, "1.0")})) for name in "ABC")


@pytest.mark.parametrize(
    ("stream", "clients", "replicas", "fewest"),
    [
        # one client, one replica: every request in turn, each one a switch
        ([A, B, A, B], 1, 1, 4),
        # two replicas hold A and B: two switches, then every job is free
        ([A, B, A, B], 1, 2, 2),
        # all four in at once: A's two jobs together, then B's
        ([A, B, A, B], 4, 1, 2),
        # window of 2 on one replica: A first, then A's next job while B waits, then both B
        ([A, B, A, B], 2, 1, 2),
        # taking the oldest (A) first costs 4 (A, B or C, then the other two); B first lets A's
        # two jobs run together: B, then A (the second A comes in meanwhile), then C
        ([A, B, C, A], 2, 1, 3),
    ],
)
def test_the_fewest_switches_match_the_hand_count(stream, clients, replicas, fewest) -> None:
    assert time_free_minimum(stream, clients, replicas) == fewest


def test_patience_trades_latency_for_switches() -> None:
    """Waiting longer for a job of the held set can only make latency worse on average; the
    reference rows in bench/README.md rely on it (same streams, patience 0 vs 4 job times)."""
    eager = [late_binding_run(seed, 0.0, 200, 4) for seed in range(3)]
    patient = [late_binding_run(seed, 4.0, 200, 4) for seed in range(3)]
    assert sum(s for s, _ in patient) < sum(s for s, _ in eager)
    assert sum(p for _, p in patient) > sum(p for _, p in eager)
