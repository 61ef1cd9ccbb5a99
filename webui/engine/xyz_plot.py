"""A1111's X/Y/Z plot, the pure part: axis values (with A1111's number-range syntax), the cells
of a plot as requests derived from a base request, and the order they run in (checkpoint
outermost, then every cell of one LoRA set together) as opposed to the order they are shown."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from io import StringIO

from webui.engine.request import GenerationRequest, RequestError

PLOT_FIELD = "X/Y/Z plot"  # our infotext key: every axis with its values


class AxisKind(StrEnum):
    """What an axis varies; the value is the label the UI shows."""

    NOTHING = "Nothing"
    LORA_STRENGTH = "LoRA strength"
    LORA = "LoRA"
    LORA_TE = "LoRA text encoder strength"
    LORA_UNET = "LoRA UNet strength"
    LORA_IN = "LoRA in-blocks strength"
    LORA_MID = "LoRA mid-block strength"
    LORA_OUT = "LoRA out-blocks strength"
    LORA_LBW = "LoRA block weights (lbw)"
    PROMPT_SR = "Prompt S/R"
    SEED = "Seed"
    STEPS = "Steps"
    CFG = "CFG Scale"
    SAMPLER = "Sampler"
    CHECKPOINT = "Checkpoint name"

    @property
    def number_type(self) -> type | None:
        """int or float for the axes whose values may be written as ranges; None otherwise."""
        if self in (AxisKind.SEED, AxisKind.STEPS):
            return int
        if self in _STRENGTH_KEYS or self is AxisKind.CFG:
            return float
        return None

    @property
    def edits_lora(self) -> bool:
        """Whether the axis changes which LoRAs apply or how (the set the engine writes)."""
        return self is AxisKind.LORA or self in _STRENGTH_KEYS or self is AxisKind.LORA_LBW

    @property
    def needs_lora_name(self) -> bool:
        return self.edits_lora and self is not AxisKind.LORA


# the tag argument each strength axis writes ("" the first positional: the LoRA's strength)
_STRENGTH_KEYS: dict[AxisKind, str] = {
    AxisKind.LORA_STRENGTH: "",
    AxisKind.LORA_TE: "te",
    AxisKind.LORA_UNET: "unet",
    AxisKind.LORA_IN: "in",
    AxisKind.LORA_MID: "mid",
    AxisKind.LORA_OUT: "out",
}


class AxisError(RequestError):
    """An axis whose values cannot be read; the message names the axis and the value (a bad
    request: shown to the user as it is)."""


# A1111's four range forms: `a-b` and `a-b (+step)` (ends included), `a-b [count]` (evenly
# spaced, ends included); a sign is part of a number, so `-5--1` is a range of negatives.
_INT = r"[+-]?\s*\d+"
_UNSIGNED = r"(?:\d+(?:\.\d*)?|\.\d+)"
_FLOAT = rf"[+-]?\s*{_UNSIGNED}"
_STEP_INT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(\s*([+-]\d+)\s*\))?\s*")
_COUNT_INT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})\s*\[\s*(\d+)\s*\]\s*")
_STEP_FLOAT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(\s*([+-]{_UNSIGNED})\s*\))?\s*")
_COUNT_FLOAT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})\s*\[\s*(\d+)\s*\]\s*")
_MAX_VALUES = 1000  # one axis; a typo like `1-100000` fails fast instead of queuing for days


def _number(text: str, kind: type) -> float:
    return kind(text.replace(" ", ""))


def _arange(start: float, stop: float, step: float) -> list[float]:
    """numpy's `arange(start, stop, step)`: ceil((stop - start) / step) values."""
    count = max(0, math.ceil((stop - start) / step))
    if count > _MAX_VALUES:
        raise AxisError(f"more than {_MAX_VALUES} values")
    return [start + i * step for i in range(count)]


def _linspace(start: float, stop: float, count: int) -> list[float]:
    """numpy's `linspace`: `count` values, both ends included."""
    if count > _MAX_VALUES:
        raise AxisError(f"more than {_MAX_VALUES} values")
    if count == 1:
        return [start]
    return [start + (stop - start) * i / (count - 1) for i in range(count)]


def expand_numbers(item: str, kind: type) -> list[float] | list[int]:
    """One comma-separated item of a number axis as A1111 reads it: a number, `a-b` (step 1,
    both ends), `a-b (+s)` / `a-b (-s)` (step s), or `a-b [n]` (n evenly spaced values; for
    integers each one truncated). Float steps run as A1111's `arange(a, b + s, s)`.
    Raises AxisError for anything else."""
    if kind is int:
        if m := _STEP_INT.fullmatch(item):
            step = _number(m.group(3), int) if m.group(3) else 1
            if step == 0:
                raise AxisError(f"{item!r}: the step is 0")
            start, end = _number(m.group(1), int), _number(m.group(2), int)
            values = _arange(start, end + 1, step)
            return [int(v) for v in values]
        if m := _COUNT_INT.fullmatch(item):
            points = _linspace(_number(m.group(1), int), _number(m.group(2), int), int(m.group(3)))
            return [int(v) for v in points]
    else:
        if m := _STEP_FLOAT.fullmatch(item):
            step = _number(m.group(3), float) if m.group(3) else 1.0
            if step == 0:
                raise AxisError(f"{item!r}: the step is 0")
            start, end = _number(m.group(1), float), _number(m.group(2), float)
            return [_tidy(v) for v in _arange(start, end + step, step)]
        if m := _COUNT_FLOAT.fullmatch(item):
            start, end = _number(m.group(1), float), _number(m.group(2), float)
            return [_tidy(v) for v in _linspace(start, end, int(m.group(3)))]
    try:
        return [_number(item, kind)]
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise AxisError(
            f"{item.strip()!r} is not {noun} or a range (a-b, a-b (+step), a-b [count])"
        ) from None


def _tidy(value: float) -> float:
    """Drop float noise such as 0.6000000000000001 (values go into prompts and labels)."""
    return round(value, 10)


def split_values(text: str) -> list[str]:
    """A1111's comma list: CSV, so a value holding commas (an `lbw` vector) is quoted."""
    rows = list(csv.reader(StringIO(text), skipinitialspace=True))
    return [item.strip() for row in rows for item in row if item.strip()]


@dataclass(frozen=True)
class AxisSpec:
    """An axis as the user gave it: its kind, its values text and, for LoRA strength axes, the
    LoRA it changes ("" the LoRA of the plot's `LoRA` axis)."""

    kind: AxisKind = AxisKind.NOTHING
    values: str = ""
    lora: str = ""


@dataclass(frozen=True)
class Axis:
    """A parsed axis: one value per row/column/grid; `labels` as drawn on the grid."""

    kind: AxisKind
    values: tuple[object, ...]
    lora: str = ""
    source: str = ""  # the values text as typed, for the infotext

    @property
    def labels(self) -> tuple[str, ...]:
        if self.kind is AxisKind.NOTHING:
            return ("",)
        return tuple(f"{self.title}: {_shown(v)}" for v in self.values)

    @property
    def title(self) -> str:
        return f"{self.kind.value} ({self.lora})" if self.lora else self.kind.value

    def __len__(self) -> int:
        return len(self.values)


NOTHING = Axis(AxisKind.NOTHING, (None,))


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class AxisChoices:
    """What the values of some axes are checked against: LoRA names (`loras/` relative, no
    extension), samplers and checkpoints."""

    loras: Sequence[str] = ()
    samplers: Sequence[str] = ()
    checkpoints: Sequence[str] = ()


def parse_axis(spec: AxisSpec, choices: AxisChoices, name: str = "X") -> Axis:
    """The axis `spec` describes. Raises AxisError naming the axis (`name`) and the value."""
    if spec.kind is AxisKind.NOTHING:
        return NOTHING
    try:
        values = _values(spec, choices)
    except AxisError as exc:
        raise AxisError(f"{name} axis ({spec.kind.value}): {exc}") from None
    if not values:
        raise AxisError(f"{name} axis ({spec.kind.value}): no values")
    if spec.kind.needs_lora_name and spec.lora and spec.lora not in choices.loras:
        raise AxisError(f"{name} axis ({spec.kind.value}): no LoRA named {spec.lora!r}")
    return Axis(spec.kind, tuple(values), spec.lora.strip(), spec.values)


def _values(spec: AxisSpec, choices: AxisChoices) -> list[object]:
    items = split_values(spec.values)
    kind = spec.kind
    if kind.number_type is not None:
        return [v for item in items for v in expand_numbers(item, kind.number_type)]
    if kind is AxisKind.LORA:
        return [name for item in items for name in _lora_names(item, choices.loras)]
    if kind is AxisKind.SAMPLER:
        return [_pick(item, choices.samplers, "sampler") for item in items]
    if kind is AxisKind.CHECKPOINT:
        return [_pick(item, choices.checkpoints, "checkpoint") for item in items]
    return list(items)  # Prompt S/R and lbw presets/vectors: text, checked when used


def _lora_names(item: str, loras: Sequence[str]) -> list[str]:
    """A LoRA name, or `folder/` (or `folder/*`): every LoRA in that folder of loras/, sorted
    (e.g. one training run's epochs)."""
    folder = item.removesuffix("*")
    if folder.endswith("/"):
        found = sorted(n for n in loras if n.startswith(folder) and "/" not in n[len(folder) :])
        if not found:
            raise AxisError(f"no LoRA in folder {folder!r}")
        return found
    return [_pick(item, loras, "LoRA")]


def _pick(item: str, names: Sequence[str], noun: str) -> str:
    """`item` as one of `names` (case-insensitive); the exact spelling wins."""
    if item in names:
        return item
    folded = [n for n in names if n.casefold() == item.casefold()]
    if len(folded) == 1:
        return folded[0]
    shown = ", ".join(list(names)[:8])
    raise AxisError(f"unknown {noun} {item!r}" + (f" (known: {shown})" if shown else ""))


@dataclass(frozen=True)
class Cell:
    """One image of the plot: its place (x, y, z) and its request."""

    x: int
    y: int
    z: int
    request: GenerationRequest
    checkpoint: str | None = None  # None: the model loaded
    lora_key: tuple[int, ...] = ()  # indices of its LoRA-axis values: equal keys, same LoRA set


@dataclass(frozen=True)
class Plot:
    """The three axes (NOTHING where unused) and the cells in display order (x fastest, then y,
    then z)."""

    x: Axis
    y: Axis
    z: Axis
    cells: tuple[Cell, ...]

    @property
    def axes(self) -> tuple[Axis, Axis, Axis]:
        return self.x, self.y, self.z

    def index(self, cell: Cell) -> int:
        """The cell's place in display order."""
        return cell.x + cell.y * len(self.x) + cell.z * len(self.x) * len(self.y)

    def run_order(self) -> list[Cell]:
        """The cells in the order to render them: checkpoint outermost, then every cell of one
        LoRA set together, the display order within (a stable sort)."""
        checkpoints = {c.checkpoint: i for i, c in enumerate(self.cells)}  # first seen first
        return sorted(self.cells, key=lambda c: (checkpoints[c.checkpoint], c.lora_key))

    def infotext_fields(self) -> dict[str, str]:
        """A1111's `Script`, `X Type`, `X Values`... for the grid, and our `X/Y/Z plot` line."""
        fields = {"Script": "X/Y/Z plot"}
        described = []
        for name, axis in zip("XYZ", self.axes, strict=True):
            if axis.kind is AxisKind.NOTHING:
                continue
            fields[f"{name} Type"] = axis.kind.value
            fields[f"{name} Values"] = axis.source
            values = ", ".join(_shown(v) for v in axis.values)
            described.append(f"{name}: {axis.title} = {values}")
        fields[PLOT_FIELD] = "; ".join(described)
        return fields


def build_plot(base: GenerationRequest, x: Axis, y: Axis = NOTHING, z: Axis = NOTHING) -> Plot:
    """Every cell's request: the base request with each axis's value applied (LoRA axes edit the
    prompt's tags, so the normal LoRA path applies them). Raises AxisError for a value that
    cannot apply (a Prompt S/R search text absent from the prompts, a LoRA strength axis with
    no LoRA to change)."""
    axes = (x, y, z)
    # which LoRAs first, then their strengths: one LoRA's cells run together
    lora_axes = sorted(
        (i for i, a in enumerate(axes) if a.kind.edits_lora),
        key=lambda i: axes[i].kind is not AxisKind.LORA,
    )
    cells = []
    for iz in range(len(z)):
        for iy in range(len(y)):
            for ix in range(len(x)):
                at = (ix, iy, iz)
                request, checkpoint = _cell_request(base, axes, at)
                key = tuple(at[i] for i in lora_axes)
                cells.append(Cell(ix, iy, iz, request, checkpoint, key))
    return Plot(x, y, z, tuple(cells))


def _cell_request(
    base: GenerationRequest, axes: tuple[Axis, Axis, Axis], at: tuple[int, int, int]
) -> tuple[GenerationRequest, str | None]:
    request, checkpoint = base, None
    chosen_lora = next(
        (str(a.values[i]) for a, i in zip(axes, at, strict=True) if a.kind is AxisKind.LORA), ""
    )
    tag_edits: dict[str, dict[str, str]] = {}
    for name, axis, i in zip("XYZ", axes, at, strict=True):
        value = axis.values[i]
        kind = axis.kind
        if kind is AxisKind.SEED:
            request = replace(request, seed=int(value))  # type: ignore[call-overload]
        elif kind is AxisKind.STEPS:
            request = replace(request, steps=int(value))  # type: ignore[call-overload]
        elif kind is AxisKind.CFG:
            request = replace(request, cfg_scale=float(value))  # type: ignore[arg-type]
        elif kind is AxisKind.SAMPLER:
            request = replace(request, sampler=str(value))
        elif kind is AxisKind.CHECKPOINT:
            checkpoint = str(value)
        elif kind is AxisKind.PROMPT_SR:
            request = _search_replace(request, str(axis.values[0]), str(value), name)
        elif kind is AxisKind.LORA:
            tag_edits.setdefault(str(value), {})
        elif kind.edits_lora:
            lora = axis.lora or chosen_lora
            if not lora:
                raise AxisError(
                    f"{name} axis ({kind.value}): name the LoRA it changes, or add a LoRA axis"
                )
            key = "lbw" if kind is AxisKind.LORA_LBW else _STRENGTH_KEYS[kind]
            tag_edits.setdefault(lora, {})[key] = _shown(value)
    if tag_edits:
        request = replace(request, prompt=edit_lora_tags(request.prompt, tag_edits))
    return request, checkpoint


def _search_replace(
    request: GenerationRequest, search: str, value: str, name: str
) -> GenerationRequest:
    """A1111's Prompt S/R: every occurrence of the axis's first value, in both prompts."""
    if search not in request.prompt and search not in request.negative_prompt:
        raise AxisError(
            f"{name} axis (Prompt S/R): {search!r} is in neither the prompt nor the negative prompt"
        )
    return replace(
        request,
        prompt=request.prompt.replace(search, value),
        negative_prompt=request.negative_prompt.replace(search, value),
    )


_TAG = re.compile(r"<(lora|lyco):([^:>]*)((?::[^>]*)?)>", re.IGNORECASE)


def edit_lora_tags(prompt: str, edits: dict[str, dict[str, str]]) -> str:
    """`prompt` with each named LoRA's tag changed: `""` sets its strength (the first
    positional), any other key sets `key=value`; the tag's other arguments stay. A LoRA with
    no tag in the prompt gets one appended (strength 1 unless set)."""
    pending = dict(edits)

    def rewrite(match: re.Match[str]) -> str:
        name = match.group(2).strip()
        changes = pending.pop(name, None)
        if changes is None:
            return match.group(0)
        args = [a.strip() for a in match.group(3).split(":")[1:]]
        return _tag(match.group(1), name, args, changes)

    edited = _TAG.sub(rewrite, prompt)
    added = [_tag("lora", name, [], changes) for name, changes in pending.items()]
    return ", ".join([edited, *added]) if edited.strip() and added else edited + "".join(added)


def _tag(kind: str, name: str, args: list[str], changes: dict[str, str]) -> str:
    positional = [a for a in args if "=" not in a]
    named = [a for a in args if "=" in a]
    if "" in changes:
        positional = [changes[""], *positional[1:]]
    elif not positional:
        positional = ["1"]
    for key, value in changes.items():
        if key:
            named = [a for a in named if a.split("=", 1)[0].strip().lower() != key]
            named.append(f"{key}={value}")
    return f"<{kind}:{name}:{':'.join([*positional, *named])}>"


def parse_plot(
    base: GenerationRequest,
    specs: Sequence[AxisSpec],
    choices: AxisChoices,
    limit: Callable[[int], None] | None = None,
) -> Plot:
    """Parse up to three axis specs (X, Y, Z) and build the plot; `limit(cells)` may refuse a
    plot too large. Raises AxisError, or RequestError for a cell out of range."""
    axes = [parse_axis(spec, choices, name) for name, spec in zip("XYZ", specs, strict=False)]
    axes += [NOTHING] * (3 - len(axes))
    if all(a.kind is AxisKind.NOTHING for a in axes):
        raise AxisError("choose at least one axis")
    count = math.prod(len(a) for a in axes)
    if limit is not None:
        limit(count)
    plot = build_plot(base, *axes)
    for cell in plot.cells:
        try:
            cell.request.validate()
        except RequestError as exc:
            raise RequestError(f"cell {plot.index(cell) + 1}: {exc}") from None
    return plot
