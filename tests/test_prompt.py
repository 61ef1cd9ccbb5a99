"""The network tag grammar: one table of prompts with hand-computed tags, text and errors; then
schedules, block vectors and presets with hand-computed values."""

from __future__ import annotations

import pytest

from webui.prompt import (
    PRESETS,
    BlockWeights,
    NetworkTag,
    ParsedPrompt,
    Schedule,
    SchedulePoint,
    block_labels,
    is_constant,
    parse_prompt,
    strength_at,
)

SD1_17 = (
    "BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
)  # fmt: skip
SD1_26 = (
    "BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "IN09",
    "IN10", "IN11", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06",
    "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
)  # fmt: skip
XL_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00",
         "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")  # fmt: skip
XL_20 = (
    "BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "M00",
    "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08",
)  # fmt: skip

INS = (1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
OUTS = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0)


def everywhere(name: str, text: str, w: float, **others: object) -> NetworkTag:
    """A tag whose every strength is `w` (what `<lora:NAME:W>` means)."""
    return NetworkTag(name, text, te1=w, te2=w, unet=w, in_blocks=w, mid=w, out=w, **others)


def schedule(*points: tuple[float, float] | tuple[float, float, bool]) -> Schedule:
    return Schedule(tuple(SchedulePoint(*point) for point in points))


RAMP = schedule((0.0, 0), (1.0, 10))
TE_RAMP = schedule((0.1, 1), (0.6, 6))
HALF_RUN = schedule((0.0, 0), (1.0, 0.5, True))
VECTOR_17 = "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"  # OUTS
VECTOR_12 = "1,0.5,0.5,0.5,0.5,1,0,0,0,0,0,0"
VECTOR_20 = "0,1,1,1,1,1,1,1,1,1,0.5,0,0,0,0,0,0,0,0,0.25"
VECTOR_26 = "1,0,0,0,0,0,0,0,0,0,0,0,0,2,0,0,0,0,0,0,0,0,0,0,0,-1"
KNOWN = "known: te, te1, te2, unet, in, mid, out, dyn, lbw, transformer"
PRESET_NAMES = "NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5, FLUXALL"
LENGTHS = "12, 17, 20, 26 (SD) or 61 (FLUX.1)"

# (prompt, expected tags, expected text, expected errors)
CASES: list[tuple[str, list[NetworkTag], str, list[str]]] = [
    # --- weights and the A1111 default rules
    ("a cat", [], "a cat", []),
    ("a cat <lora:ink>", [everywhere("ink", "<lora:ink>", 1.0)], "a cat", []),
    ("a cat, <lora:ink:0.8>, dog", [everywhere("ink", "<lora:ink:0.8>", 0.8)], "a cat, dog", []),
    ("<LYCO:ink:0.5> a cat", [everywhere("ink", "<LYCO:ink:0.5>", 0.5)], "a cat", []),
    ("<lora:ink:-1.5>", [everywhere("ink", "<lora:ink:-1.5>", -1.5)], "", []),
    ("<lora:ink:1e-1>", [everywhere("ink", "<lora:ink:1e-1>", 0.1)], "", []),
    ("<lora:ink:>", [everywhere("ink", "<lora:ink:>", 1.0)], "", []),
    (
        "<lora:ink:0.5:0.2>",
        [
            NetworkTag(
                "ink",
                "<lora:ink:0.5:0.2>",
                te1=0.5,
                te2=0.5,
                unet=0.2,
                in_blocks=0.2,
                mid=0.2,
                out=0.2,
            )
        ],
        "",
        [],
    ),
    (
        "<lora:ink:0.5:0.2:8>",
        [
            NetworkTag(
                "ink",
                "<lora:ink:0.5:0.2:8>",
                te1=0.5,
                te2=0.5,
                unet=0.2,
                in_blocks=0.2,
                mid=0.2,
                out=0.2,
                dyn=8,
            )
        ],
        "",
        [],
    ),
    (
        "<lora:ink::0.5>",  # an empty positional is "not given": te stays 1.0
        [NetworkTag("ink", "<lora:ink::0.5>", unet=0.5, in_blocks=0.5, mid=0.5, out=0.5)],
        "",
        [],
    ),
    ("<lora:ink:te=0.3>", [everywhere("ink", "<lora:ink:te=0.3>", 0.3)], "", []),
    ("<lora:ink: TE = 0.3 >", [everywhere("ink", "<lora:ink: TE = 0.3 >", 0.3)], "", []),
    (
        "<lora:ink:unet=0.4>",
        [NetworkTag("ink", "<lora:ink:unet=0.4>", unet=0.4, in_blocks=0.4, mid=0.4, out=0.4)],
        "",
        [],
    ),
    ("<lora:ink:0.5:te=0.9>", [everywhere("ink", "<lora:ink:0.5:te=0.9>", 0.9)], "", []),
    (
        "<lora:ink:0.7:unet=0.1:0.3>",  # named unet wins over the positional one
        [
            NetworkTag(
                "ink",
                "<lora:ink:0.7:unet=0.1:0.3>",
                te1=0.7,
                te2=0.7,
                unet=0.1,
                in_blocks=0.1,
                mid=0.1,
                out=0.1,
            )
        ],
        "",
        [],
    ),
    (
        "<lora:ink:dyn=16:0.6>",  # positions count positional arguments only
        [everywhere("ink", "<lora:ink:dyn=16:0.6>", 0.6, dyn=16)],
        "",
        [],
    ),
    (
        "<lora:ink:0.5:te1=0.2>",
        [
            NetworkTag(
                "ink",
                "<lora:ink:0.5:te1=0.2>",
                te1=0.2,
                te2=0.5,
                unet=0.5,
                in_blocks=0.5,
                mid=0.5,
                out=0.5,
            )
        ],
        "",
        [],
    ),
    (
        "<lora:ink:te2=0:unet=0.8>",
        [
            NetworkTag(
                "ink",
                "<lora:ink:te2=0:unet=0.8>",
                te1=1.0,
                te2=0.0,
                unet=0.8,
                in_blocks=0.8,
                mid=0.8,
                out=0.8,
            )
        ],
        "",
        [],
    ),
    (
        "<lora:ink:0.6:in=0:out=1.2>",
        [
            NetworkTag(
                "ink",
                "<lora:ink:0.6:in=0:out=1.2>",
                te1=0.6,
                te2=0.6,
                unet=0.6,
                in_blocks=0.0,
                mid=0.6,
                out=1.2,
            )
        ],
        "",
        [],
    ),
    (
        "<lora:ink:0.6:0.4:mid=2>",
        [
            NetworkTag(
                "ink",
                "<lora:ink:0.6:0.4:mid=2>",
                te1=0.6,
                te2=0.6,
                unet=0.4,
                in_blocks=0.4,
                mid=2.0,
                out=0.4,
            )
        ],
        "",
        [],
    ),
    # --- schedules
    (
        "<lora:ink:te=0.1@1,0.6@6>",
        [everywhere("ink", "<lora:ink:te=0.1@1,0.6@6>", TE_RAMP)],
        "",
        [],
    ),
    (
        "<lora:ink:0.8:unet=0@0,1@10>",
        [
            NetworkTag(
                "ink",
                "<lora:ink:0.8:unet=0@0,1@10>",
                te1=0.8,
                te2=0.8,
                unet=RAMP,
                in_blocks=RAMP,
                mid=RAMP,
                out=RAMP,
            )
        ],
        "",
        [],
    ),
    ("<lora:ink:0@0,1@0.5>", [everywhere("ink", "<lora:ink:0@0,1@0.5>", HALF_RUN)], "", []),
    ("<lora:ink:0@0,1@.5>", [everywhere("ink", "<lora:ink:0@0,1@.5>", HALF_RUN)], "", []),
    (
        "<lora:ink:1@1.0, 0@1>",  # 1.0 is the whole run, 1 is step 1
        [everywhere("ink", "<lora:ink:1@1.0, 0@1>", schedule((1.0, 1.0, True), (0.0, 1)))],
        "",
        [],
    ),
    # --- block weights
    (
        "<lora:ink:lbw=ALL0.5>",
        [
            everywhere(
                "ink",
                "<lora:ink:lbw=ALL0.5>",
                1.0,
                blocks=BlockWeights((0.5,) * 17, SD1_17, "ALL0.5"),
            )
        ],
        "",
        [],
    ),
    (
        "<lora:ink:0.7:lbw=outs>",
        [
            everywhere(
                "ink", "<lora:ink:0.7:lbw=outs>", 0.7, blocks=BlockWeights(OUTS, SD1_17, "OUTS")
            )
        ],
        "",
        [],
    ),
    (
        "<lora:ink:1:INS>",  # LoRA Block Weight's older positional form
        [everywhere("ink", "<lora:ink:1:INS>", 1.0, blocks=BlockWeights(INS, SD1_17, "INS"))],
        "",
        [],
    ),
    (
        f"<lora:ink:0.5:{VECTOR_17}>",
        [everywhere("ink", f"<lora:ink:0.5:{VECTOR_17}>", 0.5, blocks=BlockWeights(OUTS, SD1_17))],
        "",
        [],
    ),
    (
        f"<lora:ink:lbw={VECTOR_12}>",
        [
            everywhere(
                "ink",
                f"<lora:ink:lbw={VECTOR_12}>",
                1.0,
                blocks=BlockWeights((1.0, 0.5, 0.5, 0.5, 0.5, 1.0) + (0.0,) * 6, XL_12),
            )
        ],
        "",
        [],
    ),
    (
        f"<lora:ink:lbw={VECTOR_20}>",
        [
            everywhere(
                "ink",
                f"<lora:ink:lbw={VECTOR_20}>",
                1.0,
                blocks=BlockWeights((0.0,) + (1.0,) * 9 + (0.5,) + (0.0,) * 8 + (0.25,), XL_20),
            )
        ],
        "",
        [],
    ),
    (
        f"<lora:ink:lbw={VECTOR_26}>",
        [
            everywhere(
                "ink",
                f"<lora:ink:lbw={VECTOR_26}>",
                1.0,
                blocks=BlockWeights((1.0,) + (0.0,) * 12 + (2.0,) + (0.0,) * 11 + (-1.0,), SD1_26),
            )
        ],
        "",
        [],
    ),
    (
        "<lora:ink:0.5:lbw=INS:mid=0>",
        [
            NetworkTag(
                "ink",
                "<lora:ink:0.5:lbw=INS:mid=0>",
                te1=0.5,
                te2=0.5,
                unet=0.5,
                in_blocks=0.5,
                mid=0.0,
                out=0.5,
                blocks=BlockWeights(INS, SD1_17, "INS"),
            )
        ],
        "",
        [],
    ),
    # --- text cleanup
    (
        "<hypernet:h:1> a cat <lora:ink:1>",
        [everywhere("ink", "<lora:ink:1>", 1.0)],
        "<hypernet:h:1> a cat",
        [],
    ),
    (
        "<lora:a:1> , <lora:b:0.5> , a cat ,, dog",
        [everywhere("a", "<lora:a:1>", 1.0), everywhere("b", "<lora:b:0.5>", 0.5)],
        "a cat, dog",
        [],
    ),
    # --- errors that skip the tag
    ("<lora::1> a cat", [], "a cat", ["<lora::1>: the tag names no network; tag skipped"]),
    ("<lora: :1>", [], "", ["<lora: :1>: the tag names no network; tag skipped"]),
    (
        "a <lora:ink:abc> b <lora:ok:0.5>",
        [everywhere("ok", "<lora:ok:0.5>", 0.5)],
        "a b",
        ["<lora:ink:abc>: strength 'abc' is not a number; tag skipped"],
    ),
    ("<lora:ink:nan>", [], "", ["<lora:ink:nan>: strength 'nan' is not a number; tag skipped"]),
    ("<lora:ink:1:abc>", [], "", ["<lora:ink:1:abc>: unet 'abc' is not a number; tag skipped"]),
    ("<lora:ink:te=x>", [], "", ["<lora:ink:te=x>: te 'x' is not a number; tag skipped"]),
    ("<lora:ink:in=1,2>", [], "", ["<lora:ink:in=1,2>: in '1,2' is not a number; tag skipped"]),
    (
        "<lora:ink:te=0.1@1,0.6>",
        [],
        "",
        [
            "<lora:ink:te=0.1@1,0.6>: te '0.1@1,0.6' is not a schedule: '0.6' is not VALUE@STEP; "
            "tag skipped"
        ],
    ),
    (
        "<lora:ink:1@1,>",
        [],
        "",
        ["<lora:ink:1@1,>: strength '1@1,' is not a schedule: '' is not VALUE@STEP; tag skipped"],
    ),
    (
        "<lora:ink:x@1>",
        [],
        "",
        [
            "<lora:ink:x@1>: strength 'x@1' is not a schedule: value 'x' is not a number; "
            "tag skipped"
        ],
    ),
    (
        "<lora:ink:unet=1@2.5>",
        [],
        "",
        [
            "<lora:ink:unet=1@2.5>: unet '1@2.5' is not a schedule: step '2.5' is neither a step "
            "number nor a fraction 0..1; tag skipped"
        ],
    ),
    (
        "<lora:ink:1@-1>",
        [],
        "",
        [
            "<lora:ink:1@-1>: strength '1@-1' is not a schedule: step '-1' is neither a step "
            "number nor a fraction 0..1; tag skipped"
        ],
    ),
    (
        "<lora:ink:0.5:lbw=1,2,3>",
        [],
        "",
        [
            f"<lora:ink:0.5:lbw=1,2,3>: lbw '1,2,3' has 3 values; a block vector has {LENGTHS}; "
            "tag skipped"
        ],
    ),
    (
        "<lora:ink:lbw=1>",
        [],
        "",
        [f"<lora:ink:lbw=1>: lbw '1' has 1 value; a block vector has {LENGTHS}; tag skipped"],
    ),
    (
        "<lora:ink:1:0,1>",  # a comma list in the unet slot is read as a block vector
        [],
        "",
        [f"<lora:ink:1:0,1>: lbw '0,1' has 2 values; a block vector has {LENGTHS}; tag skipped"],
    ),
    (
        "<lora:ink:lbw=FOO>",
        [],
        "",
        [
            f"<lora:ink:lbw=FOO>: lbw 'FOO' is not a block vector or a preset ({PRESET_NAMES}); "
            "tag skipped"
        ],
    ),
    (
        "<lora:ink:lbw=1,R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1>",
        [],
        "",
        [
            "<lora:ink:lbw=1,R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1>: lbw '1,R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1' "
            "is not a block vector: 'R' is not a number; tag skipped"
        ],
    ),
    (
        "<lora:ink:1:1:x>",
        [],
        "",
        ["<lora:ink:1:1:x>: dyn 'x' is not a whole number >= 0; tag skipped"],
    ),
    (
        "<lora:ink:dyn=1.5>",
        [],
        "",
        ["<lora:ink:dyn=1.5>: dyn '1.5' is not a whole number >= 0; tag skipped"],
    ),
    (
        "<lora:ink:dyn=-1>",
        [],
        "",
        ["<lora:ink:dyn=-1>: dyn '-1' is not a whole number >= 0; tag skipped"],
    ),
    # --- errors that ignore one argument
    (
        "<lora:ink:foo=1>",
        [everywhere("ink", "<lora:ink:foo=1>", 1.0)],
        "",
        [f"<lora:ink:foo=1>: unknown argument 'foo=1' (ignored); {KNOWN}"],
    ),
    (
        "<lora:ink:1:1:4:2>",
        [everywhere("ink", "<lora:ink:1:1:4:2>", 1.0, dyn=4)],
        "",
        [
            "<lora:ink:1:1:4:2>: surplus argument '2' (ignored); positional arguments are "
            "STRENGTH:UNET:DYN"
        ],
    ),
    (
        "<lora:ink:te=>",
        [everywhere("ink", "<lora:ink:te=>", 1.0)],
        "",
        ["<lora:ink:te=>: te= has no value (ignored)"],
    ),
    (
        "<lora:ink:te=0.2:te=0.4>",
        [everywhere("ink", "<lora:ink:te=0.2:te=0.4>", 0.4)],
        "",
        ["<lora:ink:te=0.2:te=0.4>: te= is given twice; the last value is used"],
    ),
    (
        "<lora:ink:abc:unet=x:foo=1>",  # every problem of a tag is reported
        [],
        "",
        [
            f"<lora:ink:abc:unet=x:foo=1>: unknown argument 'foo=1' (ignored); {KNOWN}",
            "<lora:ink:abc:unet=x:foo=1>: strength 'abc' is not a number; tag skipped",
            "<lora:ink:abc:unet=x:foo=1>: unet 'x' is not a number; tag skipped",
        ],
    ),
]


@pytest.mark.parametrize(("prompt", "tags", "text", "errors"), CASES, ids=[c[0] for c in CASES])
def test_parse_prompt(prompt: str, tags: list[NetworkTag], text: str, errors: list[str]) -> None:
    assert parse_prompt(prompt) == ParsedPrompt(text, tuple(tags), tuple(errors))


# (schedule, step, total steps, expected value), all by hand
SCHEDULE_VALUES = [
    (RAMP, 5, 20, 0.5),
    (RAMP, 0, 20, 0.0),
    (RAMP, 10, 20, 1.0),
    (RAMP, 15, 20, 1.0),  # held after the last point
    (TE_RAMP, 0, 20, 0.1),  # held before the first point
    (TE_RAMP, 3, 20, 0.3),  # 0.1 + 0.5 * 2/5
    (TE_RAMP, 6, 20, 0.6),
    (TE_RAMP, 20, 20, 0.6),
    (HALF_RUN, 5, 20, 0.5),  # the 0.5 point sits at step 10 of 20
    (HALF_RUN, 10, 20, 1.0),
    (HALF_RUN, 15, 20, 1.0),
    (HALF_RUN, 10, 40, 0.5),  # ... and at step 20 of 40
    (schedule((1.0, 1.0, True), (0.0, 1)), 4, 10, 1 / 3),  # points at 1 and 10: 3/9
    (schedule((1.0, 1.0, True), (0.0, 1)), 10, 10, 1.0),
    (schedule((1.0, 10), (0.0, 0)), 5, 20, 0.5),  # written out of order
    (schedule((0.0, 0), (1.0, 10), (0.0, 20)), 15, 20, 0.5),
    (schedule((0.0, 0), (0.0, 5), (1.0, 5), (1.0, 10)), 4, 10, 0.0),
    (schedule((0.0, 0), (0.0, 5), (1.0, 5), (1.0, 10)), 5, 10, 1.0),  # the last written at 5
    (
        schedule(
            (0.7, 3),
        ),
        1,
        10,
        0.7,
    ),
    (
        schedule(
            (0.7, 3),
        ),
        9,
        10,
        0.7,
    ),
]


@pytest.mark.parametrize(("strength", "step", "total", "expected"), SCHEDULE_VALUES)
def test_schedule_values(strength: Schedule, step: int, total: int, expected: float) -> None:
    assert strength.value_at(step, total) == pytest.approx(expected)
    assert strength_at(strength, step, total) == pytest.approx(expected)


def test_constant_strengths() -> None:
    assert is_constant(0.5) and not is_constant(RAMP)
    assert strength_at(0.5, 3, 20) == 0.5
    with pytest.raises(ValueError):
        Schedule(())


def test_single_strength_for_callers_that_apply_one_number() -> None:
    assert parse_prompt("<lora:ink:0.8:0.2>").tags[0].strength == 0.8
    assert parse_prompt("<lora:ink:0@0,0.6@10>").tags[0].strength == 0.6


@pytest.mark.parametrize(
    ("length", "labels"), [(17, SD1_17), (26, SD1_26), (12, XL_12), (20, XL_20)]
)
def test_block_labels(length: int, labels: tuple[str, ...]) -> None:
    assert block_labels(length) == labels


@pytest.mark.parametrize("length", [0, 16, 25, 57, 60, 62])
def test_block_labels_of_other_lengths_raise(length: int) -> None:
    with pytest.raises(ValueError, match=str(length)):
        block_labels(length)


def test_presets_expand_to_sd1_vectors() -> None:
    assert set(PRESETS) == set(PRESET_NAMES.split(", "))
    for name, values in PRESETS.items():
        if name == "FLUXALL":
            continue  # the FLUX.1 preset: tests/test_flux_block_weights.py
        blocks = parse_prompt(f"<lora:ink:lbw={name.lower()}>").tags[0].blocks
        assert blocks == BlockWeights(tuple(map(float, values)), SD1_17, name)
    midd = parse_prompt("<lora:ink:lbw=MIDD>").tags[0].blocks
    assert midd is not None
    weights = midd.by_label()
    assert [label for label in SD1_17 if weights[label] == 1.0] == [
        "BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
    ]  # fmt: skip


def test_block_weights_need_one_label_per_value() -> None:
    with pytest.raises(ValueError):
        BlockWeights((1.0, 1.0), ("BASE",))
