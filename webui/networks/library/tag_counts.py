"""Caption tags with their training counts, most frequent first, as the catalog keeps them.

The catalog cache stores them as two strings (tags joined by newlines, counts by spaces), and a
`TagCounts` keeps that packed form until someone reads the pairs: most entries are never opened,
and decoding every entry's pairs up front was a quarter of a warm start with 5,000 files."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import overload

Pair = tuple[str, int]


class TagCounts(Sequence[Pair]):
    """An immutable sequence of (tag, count) pairs, decoded from its packed form on first use.
    Compares equal to a tuple of the same pairs."""

    __slots__ = ("_counts", "_pairs", "_tags")

    def __init__(self, tags: str = "", counts: str = "") -> None:
        """`tags` newline-separated, `counts` space-separated, in the same order (see `packed`)."""
        self._tags = tags
        self._counts = counts
        self._pairs: tuple[Pair, ...] | None = None if tags else ()

    @classmethod
    def of(cls, pairs: Iterable[Pair]) -> TagCounts:
        """Wrap pairs (a TagCounts is returned as it is)."""
        if isinstance(pairs, TagCounts):
            return pairs
        decoded = tuple((str(tag), int(count)) for tag, count in pairs)
        if any(not tag or "\n" in tag for tag, _ in decoded):
            raise ValueError("a caption tag must be non-empty and on one line")
        packed = cls("\n".join(t for t, _ in decoded), " ".join(str(c) for _, c in decoded))
        packed._pairs = decoded
        return packed

    @property
    def packed(self) -> tuple[str, str]:
        """The (tags, counts) strings this sequence round-trips through."""
        return self._tags, self._counts

    def top(self, n: int) -> tuple[str, ...]:
        """The `n` most frequent tags, without decoding the rest."""
        if self._pairs is not None:
            return tuple(tag for tag, _ in self._pairs[:n])
        return tuple(self._tags.split("\n", n)[:n]) if n > 0 else ()

    def _decoded(self) -> tuple[Pair, ...]:
        if self._pairs is None:
            tags, counts = self._tags.split("\n"), self._counts.split()
            if len(tags) != len(counts):
                raise ValueError(f"{len(tags)} tags but {len(counts)} counts")
            self._pairs = tuple(zip(tags, map(int, counts), strict=True))
        return self._pairs

    @overload
    def __getitem__(self, index: int) -> Pair: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Pair, ...]: ...

    def __getitem__(self, index: int | slice) -> Pair | tuple[Pair, ...]:
        return self._decoded()[index]

    def __len__(self) -> int:
        if self._pairs is not None:
            return len(self._pairs)
        return self._tags.count("\n") + 1

    def __iter__(self) -> Iterator[Pair]:
        return iter(self._decoded())

    def __bool__(self) -> bool:
        return bool(self._tags)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TagCounts):
            return self.packed == other.packed
        if isinstance(other, tuple):
            return self._decoded() == other
        return NotImplemented

    def __hash__(self) -> int:  # equal to a tuple of the same pairs, so hashed like one
        return hash(self._decoded())

    def __repr__(self) -> str:
        return f"TagCounts({self._decoded()!r})"


__all__ = ["Pair", "TagCounts"]
