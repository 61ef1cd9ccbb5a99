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


def switch_cost(held: LoraSet, wanted: LoraSet, modules: Mapping[str, frozenset[str]]) -> int:
    """Modules a switch from `held` to `wanted` rewrites: every module of a network that is
    added, removed or changes strength (each module written once, however many touch it)."""
    changed = held.entries ^ wanted.entries
    touched: set[str] = set()
    for path, _ in changed:
        touched |= modules.get(path, frozenset())
    return len(touched)


def rank_replicas(
    views: Sequence[ReplicaView], wanted: LoraSet, modules: Mapping[str, frozenset[str]]
) -> list[list[str]]:
    """Replica ids best first, one list per rank: replicas lacking a file the request names are
    left out (one that has not reported its files yet is taken as having them) (unless every replica lacks one: then the job runs where it can and reports the
    missing file, as on one process); the loaded checkpoint first, then fewest modules to
    rewrite; ties share a rank, where Ray Serve picks the least loaded."""
    needed = wanted.files
    eligible = [v for v in views if v.files is None or needed <= v.files]
    if not eligible:
        eligible = list(views)
    known = {**_merged(v.modules for v in views), **modules}
    scored: dict[tuple[bool, int], list[str]] = {}
    for view in eligible:
        other_model = wanted.checkpoint is not None and view.held.checkpoint != wanted.checkpoint
        key = (other_model, switch_cost(view.held, wanted, known))
        scored.setdefault(key, []).append(view.replica)
    return [scored[key] for key in sorted(scored)]


def _merged(maps: Iterable[Mapping[str, frozenset[str]]]) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for m in maps:
        out.update(m)
    return out
