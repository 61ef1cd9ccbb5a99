"""The order in which one replica runs its waiting jobs: jobs of the set it holds first, so
jobs of one set run together, with an aging bound so that no job is passed over forever."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from webui.cluster.affinity import LoraSet, switch_key

# times a waiting job may be passed over by later ones before it runs next
MAX_SKIPS = 2


@dataclass(frozen=True)
class Waiting:
    """A job waiting at a replica: its set, its arrival number and how often it was passed."""

    ticket: int
    wanted: LoraSet
    skipped: int = 0


def next_turn(
    waiting: Sequence[Waiting],
    held: LoraSet,
    modules: Mapping[str, frozenset[str]],
    max_skips: int = MAX_SKIPS,
) -> int:
    """Index in `waiting` (oldest first) of the job to run next: the oldest job passed over
    `max_skips` times, else the cheapest switch from `held`, the oldest among equals
    (`max_skips` 0: arrival order)."""
    if not waiting:
        raise ValueError("no job is waiting")
    for i, job in enumerate(waiting):
        if job.skipped >= max_skips:
            return i
    costs = [switch_key(held, job.wanted, modules) for job in waiting]
    return costs.index(min(costs))  # index() finds the first, the oldest, of the cheapest


class SetTurns:
    """One job at a time, chosen by `next_turn` when the running one ends; a job that finds
    the replica idle runs at once. Safe to use from many threads."""

    def __init__(self, max_skips: int = MAX_SKIPS) -> None:
        self.max_skips = max_skips
        self.held = LoraSet()
        self._cond = threading.Condition()
        self._waiting: list[Waiting] = []
        self._tickets = 0
        self._current: int | None = None  # ticket of the running job
        self._modules: dict[str, frozenset[str]] = {}

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    @contextmanager
    def turn(self, wanted: LoraSet, modules: Mapping[str, frozenset[str]]) -> Iterator[None]:
        """Wait for this job's turn, run the body, then hand the turn on; the body sets `held`
        to what the replica holds once it ran (what the next choice is judged against)."""
        with self._cond:
            ticket = self._tickets
            self._tickets += 1
            if self._current is None and not self._waiting:
                self._current = ticket
            else:
                self._waiting.append(Waiting(ticket, wanted))
                self._modules.update(modules)
                self._cond.wait_for(lambda: self._current == ticket)
        try:
            yield
        finally:
            with self._cond:
                self._hand_on()

    def _hand_on(self) -> None:
        if not self._waiting:
            self._current = None
            return
        chosen = next_turn(self._waiting, self.held, self._modules, self.max_skips)
        passed = self._waiting[:chosen]
        job = self._waiting[chosen]
        self._waiting = [
            Waiting(w.ticket, w.wanted, w.skipped + 1) for w in passed
        ] + self._waiting[chosen + 1 :]
        self._current = job.ticket
        self._cond.notify_all()
