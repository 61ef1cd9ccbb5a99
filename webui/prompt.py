"""Network tags in prompts, in the grammar A1111/SD.Next users know, removed from the text sent to
the text encoder and returned as typed `NetworkTag`s with every default resolved. Pure: imports
nothing of ours.

Grammar (`kind` is `lora` or its alias `lyco`, case-insensitive; arguments are split on `:` and
stripped; an argument containing `=` is named, any other is positional):

    tag       := "<" kind ":" NAME (":" argument)* ">"
    argument  := positional | key "=" value
    positional fill, in order: strength (te), unet, dyn        (an empty one counts as not given)
    key       := te | te1 | te2 | unet | transformer | in | mid | out | dyn | lbw
                                              (case-insensitive; transformer is unet's alias)
    strength  := NUMBER | schedule
    schedule  := point ("," point)*
    point     := NUMBER "@" step
    step      := DIGITS                       -> step number, as the sampler counts them
               | DIGITS? "." DIGITS?          -> fraction of the run, 0 <= f <= 1 (1.0 = last step)
    dyn       := DIGITS
    lbw       := PRESET | NUMBER ("," NUMBER)*     with 12, 17, 20, 26 (SD) or 61 (FLUX.1) numbers

Defaults, as A1111: te = the first positional or 1.0; unet = te; te1 = te2 = te;
in = mid = out = unet. `transformer=` (FLUX.1's denoiser) is `unet=` under another name. A named argument wins over its positional. A positional in the unet slot
that is a preset name or a comma list without `@` is read as `lbw` (LoRA Block Weight's older
`<lora:NAME:1:PRESET>` form).

Errors (each message starts with the tag as typed):
- a value that decides how strongly the network applies cannot be read (bad number, one out
  of float's range such as `1e999`, schedule, `dyn`, `lbw` vector or preset) or the name is
  empty: the tag is skipped ("...; tag skipped"), since applying a guessed strength would give
  an image the user did not ask for;
- an unknown key, a surplus positional argument, a named argument with no value: that argument
  is ignored ("... (ignored)") and the tag applies; a key given twice: the last value is used.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

NETWORK_KINDS = ("lora", "lyco")
# a tag opens with `<kind:` and runs to the next `>` (found with str.find: one regex scanning to
# the end from every `<` took quadratic time on prompts full of `<` and no `>`)
_TAG_OPENING = re.compile(r"<(\w+):")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_STEP = re.compile(r"\d{1,9}")  # whole numbers stay far below int()'s digit limit
_FRACTION = re.compile(r"\d*\.\d*")
_STRENGTH_KEYS = ("te", "te1", "te2", "unet", "in", "mid", "out")
KEYS = (*_STRENGTH_KEYS, "dyn", "lbw", "transformer")
_ALIASES = {"transformer": "unet"}  # the denoiser of transformer families (FLUX.1)
_POSITIONAL = ("strength", "unet", "dyn")
_Value = TypeVar("_Value")


# ---------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class SchedulePoint:
    """`value` at `step`; with `fraction`, `step` is a fraction (0..1) of the run's steps."""

    value: float
    step: float
    fraction: bool = False

    def position(self, total_steps: int) -> float:
        """The step this point sits at in a run of `total_steps`."""
        return self.step * total_steps if self.fraction else float(self.step)


@dataclass(frozen=True)
class Schedule:
    """A strength that changes over the denoising steps (`V@S,V@S,...`)."""

    points: tuple[SchedulePoint, ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a schedule needs at least one point")

    def value_at(self, step: int, total_steps: int) -> float:
        """Linear interpolation between the points (ordered by step), held constant before the
        first and after the last; at a step where several points sit, the last one written."""
        ordered = sorted(self.points, key=lambda point: point.position(total_steps))
        positions = [point.position(total_steps) for point in ordered]
        after = bisect.bisect_right(positions, step)
        if after == 0:
            return ordered[0].value
        if after == len(ordered):
            return ordered[-1].value
        left, right = ordered[after - 1], ordered[after]
        span = positions[after] - positions[after - 1]
        return left.value + (right.value - left.value) * (step - positions[after - 1]) / span


Strength = float | Schedule


def is_constant(strength: Strength) -> bool:
    """True when the strength does not change with the step."""
    return not isinstance(strength, Schedule)


def strength_at(strength: Strength, step: int, total_steps: int) -> float:
    """The strength's value at `step` of a run of `total_steps`."""
    if isinstance(strength, Schedule):
        return strength.value_at(step, total_steps)
    return float(strength)


# ---------------------------------------------------------------------------- block weights


def _numbered(prefix: str, indices: range | tuple[int, ...]) -> tuple[str, ...]:
    return tuple(f"{prefix}{index:02d}" for index in indices)


# LoRA Block Weight's block IDs; the middle block is M00 as in that extension. FLUX.1 (its
# "Flux (61)"): the two text encoders, the input embedders, 19 double and 38 single blocks, the
# final layer.
_BLOCK_LABELS: dict[int, tuple[str, ...]] = {
    17: ("BASE", *_numbered("IN", (1, 2, 4, 5, 7, 8)), "M00", *_numbered("OUT", range(3, 12))),
    26: ("BASE", *_numbered("IN", range(12)), "M00", *_numbered("OUT", range(12))),
    12: ("BASE", *_numbered("IN", (4, 5, 7, 8)), "M00", *_numbered("OUT", range(6))),
    20: ("BASE", *_numbered("IN", range(9)), "M00", *_numbered("OUT", range(9))),
    61: ("CLIP", "T5", "IN", *_numbered("D", range(19)), *_numbered("S", range(38)), "OUT"),
}
_LENGTHS = "12, 17, 20, 26 (SD) or 61 (FLUX.1)"

# values from LoRA Block Weight's default preset list (DEF_WEIGHT_PRESET), in the SD1 17 form,
# and its FLUX.1 preset FLUXALL (61 ones)
PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "ALL": (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "ALL0.5": (0.5,) * 17,
    "FLUXALL": (1,) * 61,
}


def block_labels(length: int) -> tuple[str, ...]:
    """The block label of each entry of a LoRA Block Weight vector of `length` values: 17 and 26
    are SD1/SD2 (attention blocks only / all blocks), 12 and 20 are SDXL (likewise), 61 is
    FLUX.1 (CLIP, T5, IN, D00..D18, S00..S37, OUT)."""
    try:
        return _BLOCK_LABELS[length]
    except KeyError:
        raise ValueError(f"a block vector has {_LENGTHS} values, not {length}") from None


@dataclass(frozen=True)
class BlockWeights:
    """A LoRA Block Weight vector: one factor per labelled block (BASE is the text encoders).
    `preset` names the preset it came from; presets are the SD1 17-value vectors that
    LoRA Block Weight defines (it defines no SDXL forms and applies them by label on SDXL too)
    and its 61-value FLUXALL."""

    values: tuple[float, ...]
    labels: tuple[str, ...]
    preset: str | None = None

    def __post_init__(self) -> None:
        if len(self.values) != len(self.labels):
            raise ValueError(f"{len(self.values)} values for {len(self.labels)} labels")

    def by_label(self) -> dict[str, float]:
        """Block label -> factor."""
        return dict(zip(self.labels, self.values, strict=True))


# ---------------------------------------------------------------------------- tags


@dataclass(frozen=True)
class NetworkTag:
    """One `<lora:...>` tag with every default resolved: text encoder strengths `te1`/`te2`,
    UNet block strengths `in_blocks`/`mid`/`out`, `unet` for UNet modules outside those blocks,
    DyLoRA rank `dyn`, block vector `blocks`; `text` is the tag as typed."""

    name: str
    text: str
    kind: str = "lora"
    te1: Strength = 1.0
    te2: Strength = 1.0
    unet: Strength = 1.0
    in_blocks: Strength = 1.0
    mid: Strength = 1.0
    out: Strength = 1.0
    dyn: int | None = None
    blocks: BlockWeights | None = None

    @property
    def strength(self) -> float:
        """One number for callers that apply a single multiplier everywhere: `te1`, or where it
        is a schedule, the value of its last point as written (where a schedule usually ends)."""
        if isinstance(self.te1, Schedule):
            return self.te1.points[-1].value
        return self.te1


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt with its network tags taken out; `errors` name each tag that could not be read."""

    text: str
    tags: tuple[NetworkTag, ...]
    errors: tuple[str, ...]


class _Unreadable(ValueError):
    """A value that cannot be read; the message completes "<label> '<raw>' ..."."""


def _number(raw: str, what: str = "") -> float:
    """The finite number `raw` spells; `what` prefixes the problem ("value 'x' ")."""
    if not _NUMBER.fullmatch(raw):
        raise _Unreadable(f"{what}is not a number")
    value = float(raw)
    if not math.isfinite(value):  # 1e999 reads as infinity: the image would come out black
        raise _Unreadable(f"{what}is out of range (not a finite number)")
    return value


def _schedule(raw: str) -> Schedule:
    points = []
    for item in (part.strip() for part in raw.split(",")):
        value, at, step = item.partition("@")
        if not at:
            raise _Unreadable(f"is not a schedule: {item!r} is not VALUE@STEP")
        number = _number(value.strip(), f"is not a schedule: value {value.strip()!r} ")
        step = step.strip()
        if _STEP.fullmatch(step):
            points.append(SchedulePoint(number, int(step)))
        elif _FRACTION.fullmatch(step) and step != "." and float(step) <= 1:
            points.append(SchedulePoint(number, float(step), fraction=True))
        else:
            raise _Unreadable(
                f"is not a schedule: step {step!r} is neither a step number nor a fraction 0..1"
            )
    return Schedule(tuple(points))


def _strength(raw: str) -> Strength:
    return _schedule(raw) if "@" in raw else _number(raw)


def _dyn(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit():
        raise _Unreadable("is not a whole number >= 0")
    if not _STEP.fullmatch(raw):
        raise _Unreadable("is too large (at most 9 digits)")
    return int(raw)


def _blocks(raw: str) -> BlockWeights:
    preset = raw.upper()
    if preset in PRESETS:
        values = tuple(float(value) for value in PRESETS[preset])
        return BlockWeights(values, block_labels(len(values)), preset)
    items = [item.strip() for item in raw.split(",")]
    if len(items) == 1 and not _NUMBER.fullmatch(items[0]):
        raise _Unreadable(f"is not a block vector or a preset ({', '.join(PRESETS)})")
    values = tuple(_number(item, f"is not a block vector: {item!r} ") for item in items)
    if len(items) not in _BLOCK_LABELS:
        count = f"{len(items)} value" + ("" if len(items) == 1 else "s")
        raise _Unreadable(f"has {count}; a block vector has {_LENGTHS}")
    return BlockWeights(values, block_labels(len(items)))


def _looks_like_blocks(raw: str) -> bool:
    return raw.upper() in PRESETS or ("," in raw and "@" not in raw)


def _parse_tag(text: str, args: str) -> tuple[NetworkTag | None, list[str]]:
    """The tag (None when skipped) and the messages about it."""
    name, *arguments = (part.strip() for part in args.split(":"))
    if not name:
        return None, [f"{text}: the tag names no network; tag skipped"]
    messages: list[str] = []
    positional: list[str] = []
    named: dict[str, tuple[str, str]] = {}  # key -> (raw value, the key as typed)
    for argument in arguments:
        if "=" not in argument:
            positional.append(argument)
            continue
        typed, _, value = (part.strip() for part in argument.partition("="))
        typed = typed.lower()
        key = _ALIASES.get(typed, typed)
        if typed not in KEYS:
            known = ", ".join(KEYS)
            messages.append(f"{text}: unknown argument {argument!r} (ignored); known: {known}")
        elif not value:
            messages.append(f"{text}: {typed}= has no value (ignored)")
        else:
            if key in named:
                first = named[key][1]
                twice = "is given twice" if first == typed else f"and {typed}= are both given"
                messages.append(f"{text}: {first}= {twice}; the last value is used")
            named[key] = value, typed
    for surplus in positional[len(_POSITIONAL) :]:
        messages.append(
            f"{text}: surplus argument {surplus!r} (ignored); positional arguments are "
            "STRENGTH:UNET:DYN"
        )

    # (raw text, label for messages) of each argument given, named over positional
    given: dict[str, tuple[str, str]] = {
        slot: (raw, slot) for slot, raw in zip(_POSITIONAL, positional, strict=False) if raw
    }
    if "strength" in given:
        given["te"] = given.pop("strength")[0], "strength"
    if "unet" in given and _looks_like_blocks(given["unet"][0]):
        given["lbw"] = given.pop("unet")[0], "lbw"
    given.update(named)

    skipped = False

    def read(key: str, parse: Callable[[str], _Value], default: _Value) -> _Value:
        nonlocal skipped
        if key not in given:
            return default
        raw, label = given[key]
        try:
            return parse(raw)
        except _Unreadable as problem:
            messages.append(f"{text}: {label} {raw!r} {problem}; tag skipped")
            skipped = True
            return default

    te = read("te", _strength, 1.0)
    unet = read("unet", _strength, te)
    tag = NetworkTag(
        name=name,
        text=text,
        te1=read("te1", _strength, te),
        te2=read("te2", _strength, te),
        unet=unet,
        in_blocks=read("in", _strength, unet),
        mid=read("mid", _strength, unet),
        out=read("out", _strength, unet),
        dyn=read("dyn", _dyn, None),
        blocks=read("lbw", _blocks, None),
    )
    return (None if skipped else tag), messages


def _tidy(text: str) -> str:
    # removing a tag leaves doubled spaces and dangling commas behind
    text = re.sub(r"[ \t]{2,}", " ", text)
    # only from the start of a whitespace run: retrying inside a long run made this quadratic
    text = re.sub(r"(?<!\s)\s+,", ",", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip().strip(",").strip()


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Split network tags from a prompt. Tags of other kinds (`<hypernet:...>`) are left in the
    text; network tags are always removed from it, and those that could not be read are reported
    (see the module docstring for which problems skip a tag)."""
    tags: list[NetworkTag] = []
    errors: list[str] = []

    kept: list[str] = []
    start = 0  # prompt[start:] is not yet copied to `kept`
    opening = _TAG_OPENING.search(prompt)
    while opening is not None:
        end = prompt.find(">", opening.end())
        if end < 0:
            break  # no `>` left: no tag can close
        if opening.group(1).lower() in NETWORK_KINDS:
            text = prompt[opening.start() : end + 1]
            tag, messages = _parse_tag(text, prompt[opening.end() : end])
            errors.extend(messages)
            if tag is not None:
                tags.append(tag)
            kept.append(prompt[start : opening.start()])
            start = end + 1
        opening = _TAG_OPENING.search(prompt, end + 1)
    kept.append(prompt[start:])
    return ParsedPrompt(_tidy("".join(kept)), tuple(tags), tuple(errors))
