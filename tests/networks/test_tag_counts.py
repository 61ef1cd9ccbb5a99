"""TagCounts: the packed (tags, counts) form the catalog cache keeps, decoded on first use."""

from __future__ import annotations

import pytest

from webui.networks.library.tag_counts import TagCounts

PAIRS = (("1girl", 15), ("ink wash", 30), ("scenery", 8))


def test_packs_to_two_strings_and_back() -> None:
    packed = TagCounts.of(PAIRS)
    assert packed.packed == ("1girl\nink wash\nscenery", "15 30 8")
    unpacked = TagCounts(*packed.packed)
    assert unpacked == PAIRS
    assert PAIRS == unpacked  # noqa: SIM300 - the tuple on the left is the point
    assert hash(unpacked) == hash(PAIRS)
    assert (len(unpacked), unpacked[1], unpacked[:2]) == (3, ("ink wash", 30), PAIRS[:2])
    assert list(unpacked) == list(PAIRS)


def test_top_reads_only_the_first_tags() -> None:
    tags = TagCounts("a\nb\nc\nd", "4 3 2 1")
    assert tags.top(2) == ("a", "b")
    assert tags._pairs is None  # nothing decoded
    assert tags.top(9) == ("a", "b", "c", "d")
    assert tags.top(0) == ()


def test_empty() -> None:
    empty = TagCounts()
    assert (len(empty), bool(empty), tuple(empty), empty.top(5)) == (0, False, (), ())
    assert empty == () and TagCounts.of(()) == empty


@pytest.mark.parametrize("bad", [(("two\nlines", 1),), (("", 1),)])
def test_tags_that_cannot_be_packed_are_refused(bad: tuple[tuple[str, int], ...]) -> None:
    with pytest.raises(ValueError, match="one line"):
        TagCounts.of(bad)


def test_mismatched_counts_are_reported() -> None:
    with pytest.raises(ValueError, match="2 tags but 1 counts"):
        tuple(TagCounts("a\nb", "1"))
