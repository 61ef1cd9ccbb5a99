"""X/Y/Z plot, pure part: A1111's number ranges (hand-computed), axis values, cell requests,
run order and the label layout's sizes."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageChops

from webui.engine.generate import GenerationRequest
from webui.engine.xyz_grid import BACKGROUND, draw_plot, plot_layout
from webui.engine.xyz_plot import (
    AxisChoices,
    AxisError,
    AxisKind,
    AxisSpec,
    edit_lora_tags,
    expand_numbers,
    parse_plot,
    split_values,
)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("7", [7]),
        ("1-5", [1, 2, 3, 4, 5]),
        ("1-5 (+2)", [1, 3, 5]),
        ("1-6 (+2)", [1, 3, 5]),
        ("10-1 (-3)", [10, 7, 4]),  # A1111: range(10, 1 + 1, -3)
        ("1-10 [5]", [1, 3, 5, 7, 10]),  # 1, 3.25, 5.5, 7.75, 10 truncated
        ("-5--3", [-5, -4, -3]),
        (" 2 - 4 ", [2, 3, 4]),
    ],
)
def test_integer_ranges(item: str, expected: list[int]) -> None:
    assert expand_numbers(item, int) == expected


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("0.5", [0.5]),
        ("0.2-1.0 [5]", [0.2, 0.4, 0.6, 0.8, 1.0]),
        ("0.25-1 (+0.25)", [0.25, 0.5, 0.75, 1.0]),
        ("1-2", [1.0, 2.0]),  # A1111: arange(1, 2 + 1, 1)
        ("0-1 [3]", [0.0, 0.5, 1.0]),
        ("1-0 (-0.5)", [1.0, 0.5, 0.0]),
    ],
)
def test_float_ranges(item: str, expected: list[float]) -> None:
    assert expand_numbers(item, float) == pytest.approx(expected)


@pytest.mark.parametrize("item", ["abc", "1-5 (+0)", "1-5 (2", "0.2-1.0 (5x)"])
def test_bad_numbers_are_refused_by_name(item: str) -> None:
    with pytest.raises(AxisError):
        expand_numbers(item, float if "." in item else int)


def test_values_are_csv_so_an_lbw_vector_can_be_quoted() -> None:
    assert split_values('INS, "1,0,0,0,0,0,0,0,0,0,0,0", OUTD') == [
        "INS",
        "1,0,0,0,0,0,0,0,0,0,0,0",
        "OUTD",
    ]


CHOICES = AxisChoices(loras=["ink", "epochs/e1", "epochs/e2", "other"], samplers=["Euler"])
BASE = GenerationRequest("a cat", steps=2, width=64, height=64, seed=5)


def test_strength_times_lora_cells_edit_the_prompt_tags() -> None:
    plot = parse_plot(
        BASE,
        [
            AxisSpec(AxisKind.LORA_STRENGTH, "0.5, 1"),
            AxisSpec(AxisKind.LORA, "ink, epochs/"),
        ],
        CHOICES,
    )
    prompts = [c.request.prompt for c in plot.cells]
    assert prompts == [
        "a cat, <lora:ink:0.5>",
        "a cat, <lora:ink:1>",
        "a cat, <lora:epochs/e1:0.5>",
        "a cat, <lora:epochs/e1:1>",
        "a cat, <lora:epochs/e2:0.5>",
        "a cat, <lora:epochs/e2:1>",
    ]
    # display order: strength fastest; run order: every cell of one LoRA set together
    assert [(c.x, c.y) for c in plot.run_order()] == [
        (0, 0),
        (1, 0),
        (0, 1),
        (1, 1),
        (0, 2),
        (1, 2),
    ]


def test_run_order_groups_lora_sets_when_display_alternates_them() -> None:
    plot = parse_plot(
        BASE,
        [AxisSpec(AxisKind.LORA, "ink, other"), AxisSpec(AxisKind.SEED, "1-3")],
        CHOICES,
    )
    shown = [c.request.prompt for c in plot.cells]
    assert shown[:2] == ["a cat, <lora:ink:1>", "a cat, <lora:other:1>"]
    run = [c.request.prompt for c in plot.run_order()]
    assert run == ["a cat, <lora:ink:1>"] * 3 + ["a cat, <lora:other:1>"] * 3
    assert [c.request.seed for c in plot.run_order()] == [1, 2, 3, 1, 2, 3]


def test_checkpoint_is_the_outermost_loop() -> None:
    choices = AxisChoices(loras=["ink", "other"], checkpoints=["a", "b"])
    plot = parse_plot(
        BASE,
        [AxisSpec(AxisKind.LORA, "ink, other"), AxisSpec(AxisKind.CHECKPOINT, "a, b")],
        choices,
    )
    run = [(c.checkpoint, c.request.prompt[-10:]) for c in plot.run_order()]
    assert [r[0] for r in run] == ["a", "a", "b", "b"]


def test_existing_tag_keeps_its_other_arguments() -> None:
    prompt = "a cat <lora:ink:0.3:unet=0.7> <lora:other:1>"
    assert edit_lora_tags(prompt, {"ink": {"": "0.9", "te": "0.1"}}) == (
        "a cat <lora:ink:0.9:unet=0.7:te=0.1> <lora:other:1>"
    )


def test_prompt_search_replace_first_value_is_the_search_text() -> None:
    plot = parse_plot(
        replace_prompt("a cat, ink style"), [AxisSpec(AxisKind.PROMPT_SR, "cat, dog, fox")], CHOICES
    )
    assert [c.request.prompt for c in plot.cells] == [
        "a cat, ink style",
        "a dog, ink style",
        "a fox, ink style",
    ]
    with pytest.raises(AxisError, match="X axis \\(Prompt S/R\\): 'owl'"):
        parse_plot(BASE, [AxisSpec(AxisKind.PROMPT_SR, "owl, dog")], CHOICES)


def replace_prompt(prompt: str) -> GenerationRequest:
    return GenerationRequest(prompt, steps=2, width=64, height=64, seed=5)


def test_unknown_names_and_missing_lora_are_clear_errors() -> None:
    with pytest.raises(AxisError, match="Y axis \\(LoRA\\): unknown LoRA 'nope'"):
        parse_plot(BASE, [AxisSpec(AxisKind.SEED, "1"), AxisSpec(AxisKind.LORA, "nope")], CHOICES)
    with pytest.raises(AxisError, match="name the LoRA"):
        parse_plot(BASE, [AxisSpec(AxisKind.LORA_TE, "0.5, 1")], CHOICES)
    with pytest.raises(AxisError, match="unknown sampler"):
        parse_plot(BASE, [AxisSpec(AxisKind.SAMPLER, "Nope")], CHOICES)


def test_per_component_axes_write_named_arguments() -> None:
    plot = parse_plot(
        BASE,
        [
            AxisSpec(AxisKind.LORA_UNET, "0, 1", lora="ink"),
            AxisSpec(AxisKind.LORA_LBW, 'INS, "1,0,0,0,0,0,0,0,0,0,0,0"', lora="ink"),
        ],
        CHOICES,
    )
    assert plot.cells[0].request.prompt == "a cat, <lora:ink:1:unet=0:lbw=INS>"
    assert plot.cells[3].request.prompt == "a cat, <lora:ink:1:unet=1:lbw=1,0,0,0,0,0,0,0,0,0,0,0>"


def test_label_layout_follows_a1111_sizes() -> None:
    layout = plot_layout((64, 64), (["a", "b", "c"], ["r1", "r2"], [""]))
    assert layout.inner is not None
    assert layout.inner.font_size == 128 // 25  # (w + h) // 25
    assert layout.inner.pad_left == 48  # 3/4 of a cell
    assert layout.outer is None
    assert layout.cell_box(2, 1, 0) == (
        48 + 128,
        layout.inner.pad_top + 64,
        48 + 192,
        layout.inner.pad_top + 128,
    )
    bare = plot_layout((64, 64), (["a"], [""], [""]), legend=False)
    assert bare.cell_box(0, 0, 0) == (0, 0, 64, 64)


def test_z_grids_stand_side_by_side_under_their_labels() -> None:
    colors = ["red", "green", "blue", "yellow"]  # x fastest, then z (one row)
    cells = [Image.new("RGB", (64, 64), c) for c in colors]
    layout = plot_layout((64, 64), (["x: 1", "x: 2"], [""], ["z: a", "z: b"]))
    image = draw_plot(cells, layout)
    assert layout.inner is not None and layout.inner.pad_left == 0  # no row labels
    assert layout.outer is not None
    grid_w, grid_h = layout.grid_size
    assert grid_w == 128 and layout.outer.font_size == (grid_w + grid_h) // 25
    assert image.size == (2 * grid_w, grid_h + layout.outer.pad_top)
    for index, color in enumerate(colors):
        box = layout.cell_box(index % 2, 0, index // 2)
        assert image.crop(box).getcolors() == [
            (64 * 64, Image.new("RGB", (1, 1), color).getpixel((0, 0)))
        ]
    z_strip = image.crop((0, 0, grid_w, layout.outer.pad_top))
    assert ImageChops.difference(z_strip, Image.new("RGB", z_strip.size, BACKGROUND)).getbbox()


def test_missing_cells_are_black_and_no_legend_means_no_strips() -> None:
    layout = plot_layout((8, 8), (["a", "b"], ["c"], [""]), legend=False)
    image = draw_plot([Image.new("RGB", (8, 8), "white"), None], layout)
    assert image.size == (16, 8)
    assert image.crop(layout.cell_box(1, 0, 0)).getcolors() == [(64, (0, 0, 0))]


@settings(max_examples=60)
@given(st.integers(-50, 50), st.integers(0, 30), st.integers(1, 7), st.integers(1, 12))
def test_integer_range_forms_agree_with_their_definition(
    start: int, span: int, step: int, count: int
) -> None:
    end = start + span
    assert expand_numbers(f"{start}-{end}", int) == list(range(start, end + 1))
    stepped = expand_numbers(f"{start}-{end} (+{step})", int)
    assert stepped[0] == start and stepped[-1] <= end < stepped[-1] + step
    assert all(b - a == step for a, b in pairwise(stepped))
    counted = expand_numbers(f"{start}-{end} [{count}]", int)
    assert len(counted) == count and counted[0] == start
    assert counted[-1] == (end if count > 1 else start)
