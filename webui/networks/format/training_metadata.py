"""What kohya training metadata in a file's header says: training facts and caption tag counts
(pure parsing of untrusted strings: unreadable values are ignored, never raised)."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

# A caption tag's count above this is garbage, not a training run; the bound also keeps summed
# counts far below Python's limit on digits for int/str conversion.
MAX_TAG_COUNT = 2**53


@dataclass(frozen=True)
class TrainingFacts:
    """What the trainer recorded (kohya `ss_*` metadata); None where it did not."""

    base_checkpoint: str | None = None  # ss_sd_model_name
    resolution: str | None = None  # ss_resolution, e.g. "(512, 512)"
    epochs: int | None = None  # ss_num_epochs, else ss_epoch
    images: int | None = None  # ss_num_train_images
    steps: int | None = None  # ss_max_train_steps, else ss_steps


def finite_float(value: str | None) -> float | None:
    """A finite number, or None for missing, unreadable, infinite and NaN values."""
    try:
        number = float(value) if value not in (None, "", "None") else None  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return number if number is not None and math.isfinite(number) else None


def finite_int(value: str | None) -> int | None:
    number = finite_float(value)
    return int(number) if number is not None else None


def _first(metadata: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = metadata.get(name)
        if value not in (None, "", "None"):
            return value
    return None


def training_facts(metadata: Mapping[str, str]) -> TrainingFacts:
    """The kohya training facts in a header's metadata."""
    return TrainingFacts(
        base_checkpoint=_first(metadata, "ss_sd_model_name"),
        resolution=_first(metadata, "ss_resolution"),
        epochs=finite_int(_first(metadata, "ss_num_epochs", "ss_epoch")),
        images=finite_int(_first(metadata, "ss_num_train_images")),
        steps=finite_int(_first(metadata, "ss_max_train_steps", "ss_steps")),
    )


def tag_frequency(raw: str | None, limit: int | None = None) -> tuple[tuple[str, int], ...]:
    """kohya's `ss_tag_frequency` ({dataset folder: {caption tag: count}}) as caption tags summed
    over all dataset folders, most frequent first (ties in first-seen order), at most `limit`."""
    if not raw:
        return ()
    try:
        datasets = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON, integers past the digit limit, deep nesting
        log.warning("ignoring unreadable ss_tag_frequency metadata")
        return ()
    totals: Counter[str] = Counter()
    if isinstance(datasets, dict):
        for tags in datasets.values():
            if not isinstance(tags, dict):
                continue
            for tag, count in tags.items():
                # the hot loop of a cold scan: exact type checks, no conversions for the usual int;
                # the range check also drops NaN and infinities (a count of 1e999 parses as inf)
                if type(count) is int:
                    if 0 < count <= MAX_TAG_COUNT:
                        totals[" ".join(tag.split())] += count
                elif type(count) is float and 1.0 <= count <= MAX_TAG_COUNT:
                    totals[" ".join(tag.split())] += int(count)
    totals.pop("", None)
    return tuple(totals.most_common(limit))
