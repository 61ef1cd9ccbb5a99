"""What a replica holds and what a request wants, and the ranking of replicas by the cost of
switching to the request's LoRA set (pure: no Ray, no torch)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# (LoRA file relative to loras/, strengths as text): one applied network
Entry = tuple[str, str]


@dataclass(frozen=True)
class LoraSet:
    """A checkpoint and the networks applied to it (`checkpoint` None: whatever is loaded)."""

    checkpoint: str | None = None
    entries: frozenset[Entry] = frozenset()

    @property
    def files(self) -> frozenset[str]:
        return frozenset(path for path, _ in self.entries)


@dataclass(frozen=True)
class ReplicaView:
    """What the router knows of one replica: the set it holds (or will hold once its queued
    jobs ran), the LoRA files its node has (None: not reported yet) and its modules per file."""

    replica: str
    held: LoraSet = LoraSet()
    files: frozenset[str] | None = None
    modules: Mapping[str, frozenset[str]] = field(default_factory=dict)
    pending: frozenset[LoraSet] = frozenset()  # sets of the jobs sent there and not finished
    queued: int = 0  # those jobs, running or waiting
    last_sent: int = -1  # the router's count of sends when it last sent a job there


# jobs at the best-placed replica before an idle one takes the job, whatever it holds
MAX_AHEAD = 2


def switch_cost(held: LoraSet, wanted: LoraSet, modules: Mapping[str, frozenset[str]]) -> int:
    """Modules a switch from `held` to `wanted` rewrites: every module of a network that is
    added, removed or changes strength (each module written once, however many touch it)."""
    changed = held.entries ^ wanted.entries
    touched: set[str] = set()
    for path, _ in changed:
        touched |= modules.get(path, frozenset())
    return len(touched)


def switch_key(
    held: LoraSet, wanted: LoraSet, modules: Mapping[str, frozenset[str]]
) -> tuple[bool, int]:
    """What a switch from `held` to `wanted` costs, cheapest first: another checkpoint to
    load in place of a loaded one (`wanted.checkpoint` None: any will do; a replica with none
    loaded yet must load one to serve at all), then the modules to rewrite."""
    other_model = held.checkpoint not in (None, wanted.checkpoint) and wanted.checkpoint is not None
    return other_model, switch_cost(held, wanted, modules)


def rank_replicas(
    views: Sequence[ReplicaView], wanted: LoraSet, modules: Mapping[str, frozenset[str]]
) -> list[list[str]]:
    """Replica ids best first, one list per rank: replicas lacking a file the request names are
    left out (one that has not reported its files yet is taken as having them), unless every
    replica lacks one (then the job runs where it can and reports the missing file, as on one
    process); a replica with a job of the same set pending costs nothing (the replica runs
    jobs of one set together); then the loaded checkpoint first, then fewest modules to
    rewrite; then fewest jobs queued, then the replica sent a job longest ago (its set is the
    least recently used to evict); full ties share a rank, where Ray Serve picks. Bound: when every
    best-ranked replica has MAX_AHEAD jobs or more and another has none, the idle ones rank
    first (affinity never leaves a replica idle behind a queue)."""
    needed = wanted.files
    eligible = [v for v in views if v.files is None or needed <= v.files]
    if not eligible:
        eligible = list(views)
    known = {**_merged(v.modules for v in views), **modules}
    scored: dict[tuple[bool, int, int, int], list[str]] = {}
    for view in eligible:
        joins = any(_same_set(p, wanted) for p in view.pending)
        cost = (False, 0) if joins else switch_key(view.held, wanted, known)
        scored.setdefault((*cost, view.queued, view.last_sent), []).append(view.replica)
    ranks = [scored[key] for key in sorted(scored)]
    queued = {v.replica: v.queued for v in eligible}
    idle = [r for r in queued if queued[r] == 0]
    if idle and all(queued[r] >= MAX_AHEAD for r in ranks[0]):
        ranks = [idle] + [[r for r in rank if r not in idle] for rank in ranks]
        ranks = [rank for rank in ranks if rank]
    return ranks


def _same_set(pending: LoraSet, wanted: LoraSet) -> bool:
    return pending.entries == wanted.entries and wanted.checkpoint in (None, pending.checkpoint)


def _merged(maps: Iterable[Mapping[str, frozenset[str]]]) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for m in maps:
        out.update(m)
    return out
