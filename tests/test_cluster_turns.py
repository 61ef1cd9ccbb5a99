"""A replica's order of waiting jobs (no Ray): the set it holds first, the oldest among equals,
and no job passed over more than MAX_SKIPS times; costs worked by hand from small module sets."""

from __future__ import annotations

import threading
import time

import pytest

from webui.cluster.affinity import LoraSet
from webui.cluster.turns import MAX_SKIPS, SetTurns, Waiting, next_turn

MODULES = {"a": frozenset({"a1", "a2"}), "b": frozenset({"b1"}), "c": frozenset({"c1", "c2", "c3"})}


def lora(*paths: str) -> LoraSet:
    return LoraSet("m", frozenset((p, "1.0") for p in paths))


def test_the_held_set_runs_first_then_the_cheapest_then_the_oldest() -> None:
    waiting = [Waiting(0, lora("c")), Waiting(1, lora("b")), Waiting(2, lora("a"))]
    assert next_turn(waiting, lora("a"), MODULES) == 2  # nothing to write
    # from a: c costs a off + c on = 5 modules, b costs 3: b
    assert next_turn(waiting[:2], lora("a"), MODULES) == 1
    # equal costs (b from nothing is 1 module, twice): the older
    assert next_turn([Waiting(4, lora("b")), Waiting(5, lora("b"))], lora(), MODULES) == 0


def test_a_job_passed_over_max_skips_times_runs_next() -> None:
    waiting = [Waiting(0, lora("c"), skipped=MAX_SKIPS), Waiting(1, lora("a"))]
    assert next_turn(waiting, lora("a"), MODULES) == 0
    with pytest.raises(ValueError, match="no job"):
        next_turn([], lora(), MODULES)


def test_jobs_waiting_behind_a_running_one_run_by_set_and_none_waits_forever() -> None:
    turns = SetTurns()
    release = threading.Event()
    ran: list[str] = []

    def job(name: str, wanted: LoraSet, hold: bool = False) -> None:
        with turns.turn(wanted, MODULES):
            ran.append(name)
            if hold:
                release.wait(30)
            turns.held = wanted

    first = threading.Thread(target=job, args=("a0", lora("a"), True))
    first.start()
    while not ran:  # a0 runs; every later job waits behind it
        time.sleep(0.01)
    arrivals = [("c1", lora("c")), ("a2", lora("a")), ("c3", lora("c")), ("a4", lora("a")),
                ("a5", lora("a")), ("a6", lora("a"))]  # fmt: skip
    threads = []
    for count, (name, wanted) in enumerate(arrivals, start=1):
        threads.append(threading.Thread(target=job, args=(name, wanted)))
        threads[-1].start()
        while turns.waiting < count:  # arrival order is the order of this list
            time.sleep(0.01)
    release.set()
    for t in [first, *threads]:
        t.join(30)
    # a2 and a4 pass c1 (skipped twice), then c1 must run; c3 then joins c (held, and c3 was
    # passed twice too), then the a jobs that were left
    assert ran == ["a0", "a2", "a4", "c1", "c3", "a5", "a6"]


def test_max_skips_zero_is_arrival_order() -> None:
    waiting = [Waiting(0, lora("c")), Waiting(1, lora("a"))]
    assert next_turn(waiting, lora("a"), MODULES, max_skips=0) == 0
