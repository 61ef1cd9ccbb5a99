"""The cluster benchmark's workload on a simulated clock: 2 replicas, 4 closed-loop clients,
200 requests from 8 LoRA sets with Zipf(1.1) popularity, routed and ordered by the real decision
functions (`rank_replicas`, `next_turn`) or by Ray Serve's default (two random choices, shorter
queue; arrival order). Jobs take 1 time unit (+-20 %), a switch `--switch` more. It shows what
any routing can reach on this workload, free of the machine's noise.

    python bench/cluster_model.py [--seeds 20] [--switch 0.02] [--clients 4]

`oracle` is what an omniscient scheduler that never idles a replica reaches (`oracle_run`): with
4 clients it makes 1.5x fewer switches than the default, not 3x; with 16 clients, 4x.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from webui.cluster.affinity import LoraSet, ReplicaView, rank_replicas
from webui.cluster.turns import MAX_SKIPS, Waiting, next_turn

SETS = 8
MODULES = {f"set{i}": frozenset(f"set{i}.m{k}" for k in range(16)) for i in range(SETS)}
REPLICAS = 2


@dataclass
class Replica:
    held: LoraSet = field(default_factory=LoraSet)
    routed: LoraSet | None = None
    last_sent: int = -1
    waiting: list[Waiting] = field(default_factory=list)
    running: Waiting | None = None

    @property
    def pending(self) -> list[Waiting]:
        return self.waiting + ([self.running] if self.running else [])


def one_run(
    lora: bool, seed: int, switch_s: float, requests: int, clients: int
) -> tuple[int, float]:
    """(set switches, p95 latency in job times) of one run."""
    rng = random.Random(seed)
    weights = [1 / k**1.1 for k in range(1, SETS + 1)]
    sets = [LoraSet("m", frozenset({(f"set{i}", "1.0")})) for i in range(SETS)]
    stream = rng.choices(sets, weights, k=requests)
    replicas = [Replica() for _ in range(REPLICAS)]
    sent_at: dict[int, float] = {}
    events: list[tuple[float, int]] = []
    latencies: list[float] = []
    switches = sends = 0

    def route(wanted: LoraSet) -> int:
        if not lora:
            a, b = rng.sample(range(REPLICAS), 2)
            return a if len(replicas[a].pending) <= len(replicas[b].pending) else b
        views = [
            ReplicaView(str(i), r.routed or r.held, None, MODULES,
                        frozenset(w.wanted for w in r.pending), len(r.pending), r.last_sent)
            for i, r in enumerate(replicas)
        ]  # fmt: skip
        return int(rng.choice(rank_replicas(views, wanted, MODULES)[0]))

    def send(now: float) -> None:
        nonlocal sends
        if sends >= len(stream):
            return
        wanted, sends = stream[sends], sends + 1
        replica = replicas[route(wanted)]
        replica.routed, replica.last_sent = wanted, sends
        replica.waiting.append(Waiting(sends, wanted))
        sent_at[sends] = now
        start(now)

    def start(now: float) -> None:
        nonlocal switches
        for i, r in enumerate(replicas):
            if r.running or not r.waiting:
                continue
            chosen = next_turn(r.waiting, r.held, MODULES, MAX_SKIPS if lora else 0)
            r.running = r.waiting[chosen]
            r.waiting = [
                Waiting(w.ticket, w.wanted, w.skipped + 1) for w in r.waiting[:chosen]
            ] + r.waiting[chosen + 1 :]
            took = 1.0 + rng.uniform(-0.2, 0.2)
            if r.running.wanted != r.held:
                switches, took = switches + 1, took + switch_s
            r.held = r.running.wanted
            heapq.heappush(events, (now + took, i))

    for _ in range(clients):
        send(0.0)
    while events:
        now, i = heapq.heappop(events)
        done, replicas[i].running = replicas[i].running, None
        latencies.append(now - sent_at[done.ticket])
        start(now)
        send(now)  # that client's next request
    latencies.sort()
    return switches, latencies[int(0.95 * (len(latencies) - 1))]


def oracle_run(seed: int, requests: int, clients: int) -> int:
    """Switches of an omniscient scheduler that never idles a replica (idling would cost the
    latency the issue keeps): one global pool of every waiting request (late binding, which
    Serve's routing cannot do), a free replica takes a request of the set it holds if one waits,
    else one of the set most requests wait for. Same stream and closed-loop clients as
    `one_run`."""
    rng = random.Random(seed)
    weights = [1 / k**1.1 for k in range(1, SETS + 1)]
    sets = [LoraSet("m", frozenset({(f"set{i}", "1.0")})) for i in range(SETS)]
    stream = rng.choices(sets, weights, k=requests)
    pool = list(stream[:clients])
    sent = len(pool)
    held: list[LoraSet | None] = [None] * REPLICAS
    events = [(0.0, i) for i in range(REPLICAS)]
    idle: list[int] = []
    switches = 0

    def take(now: float, i: int) -> None:
        nonlocal switches
        same = [k for k, wanted in enumerate(pool) if wanted == held[i]]
        if same:
            wanted = pool.pop(same[0])
        else:
            most = max(pool, key=pool.count)
            wanted = pool.pop(pool.index(most))
        switches += wanted != held[i]
        held[i] = wanted
        heapq.heappush(events, (now + 1.0 + rng.uniform(-0.2, 0.2), -1 - i))

    heapq.heapify(events)
    while events:
        now, slot = heapq.heappop(events)
        if slot < 0:  # a job finished: its client sends the next request
            i = -1 - slot
            if sent < requests:
                pool.append(stream[sent])
                sent += 1
        else:
            i = slot
        idle.append(i)
        while idle and pool:
            take(now, idle.pop(0))
    return switches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--switch", type=float, default=0.02, help="a switch's time, in jobs")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    for lora in (True, False):
        runs = [
            one_run(lora, s, args.switch, args.requests, args.clients) for s in range(args.seeds)
        ]
        print(
            f"{'lora' if lora else 'default':8} switches {statistics.mean(r[0] for r in runs):6.1f}"
            f"  p95 {statistics.mean(r[1] for r in runs):.2f} job times"
        )
    bound = [oracle_run(s, args.requests, args.clients) for s in range(args.seeds)]
    print(f"{'oracle':8} switches {statistics.mean(bound):6.1f}  (omniscient, never idle)")


if __name__ == "__main__":
    main()
