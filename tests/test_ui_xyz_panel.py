"""The X/Y/Z plot accordion's handler: the gallery gets the grid first, then every cell, each
with its own infotext panel; a bad axis becomes one warning line and leaves the gallery."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from engine_settings import cpu_settings

from webui.arch import Arch
from webui.engine.generate import Engine, GenerationRequest
from webui.engine.xyz_plot import PLOT_FIELD
from webui.ui.txt2img import gallery_items, infotext_panels
from webui.ui.xyz_panel import RunShape, axis_specs, run_plot_for_page

BASE = GenerationRequest("a cat", steps=2, width=64, height=64, seed=3)
SHAPE = RunShape(infotext_panels, gallery_items)


@pytest.fixture
def engine(tmp_path: Path, tiny_checkpoint_factory) -> Engine:
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "loras").mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "tiny.safetensors")
    engine = Engine(cpu_settings(models, tmp_path / "loras", tmp_path, save_outputs=False))
    engine.load("tiny")
    return engine


def panel_values(x: tuple[str, str], y: tuple[str, str], legend: bool = True) -> list[object]:
    return [x[0], x[1], None, y[0], y[1], None, "Nothing", "", None, legend]


def test_generate_plot_fills_the_gallery_grid_first(engine: Engine) -> None:
    values = panel_values(("Seed", "1, 2"), ("CFG Scale", "3-5 (+2)"))
    gallery, first, warnings, panels, items, selected = run_plot_for_page(
        engine, BASE, values, lambda *a, **k: None, SHAPE
    )
    assert warnings == ""
    assert len(gallery) == 5 and gallery[0][1] == "Grid: 4 images"
    assert [caption for _, caption in gallery[1:]] == ["seed 1", "seed 2", "seed 1", "seed 2"]
    assert len(panels) == 5 and first == panels[0]
    assert PLOT_FIELD in first and "CFG Scale = 3, 5" in first
    assert "CFG scale: 5" in panels[4]  # the last cell: seed 2, CFG 5
    assert len(items) == 5 and selected == 0


def test_a_bad_axis_is_one_warning(engine: Engine) -> None:
    values = panel_values(("Steps", "1-x"), ("Nothing", ""))
    gallery, _first, warnings, panels, _items, _selected = run_plot_for_page(
        engine, BASE, values, lambda *a, **k: None, SHAPE
    )
    assert "X axis (Steps):" in warnings and "is not an integer or a range" in warnings
    assert panels == [] and not isinstance(gallery, list)


def test_axis_specs_read_the_panel() -> None:
    specs, legend = axis_specs(
        ["LoRA strength", "0-1 [3]", "ink", "LoRA", "a, b", None, "Nothing", "", None, False]
    )
    assert [s.kind.value for s in specs] == ["LoRA strength", "LoRA", "Nothing"]
    assert specs[0].lora == "ink" and specs[1].lora == "" and legend is False
