"""X/Y/Z plot through the engine (tiny SD1, 2 steps, 64x64, two tiny LoRAs): cells equal the
same generations made one by one, LoRA work follows the run order, the grid's infotext names
the axes, labels are drawn, and an interrupt keeps the partial grid."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from engine_settings import cpu_settings
from lora_files import ATTENTION_PROJECTIONS, tiny_pipeline_to_read, write_kohya_layers
from PIL import Image, ImageChops

from webui.arch import Arch
from webui.engine.generate import Engine
from webui.engine.infotext import parse_infotext, read_image_parameters
from webui.engine.jobs import GenerationRequest, JobQueue
from webui.engine.lora_backends import LoraBackends
from webui.engine.xyz_grid import BACKGROUND
from webui.engine.xyz_plot import PLOT_FIELD, AxisKind, AxisSpec
from webui.engine.xyz_run import prepare_plot, run_plot

BASE = GenerationRequest("a cat", steps=2, width=64, height=64, seed=9)


@pytest.fixture
def engine(tmp_path: Path, tiny_checkpoint_factory) -> Engine:
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    loras.mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "tiny.safetensors")
    pipeline = tiny_pipeline_to_read(Arch.SD1)
    for name, seed in (("ink", 1), ("oil", 2)):
        write_kohya_layers(
            loras / f"{name}.safetensors",
            pipeline,
            Arch.SD1,
            include=lambda _c, path: path.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS,
            seed=seed,
            std=0.3,
            metadata={"ss_base_model_version": "sd_v1"},
        )
    engine = Engine(cpu_settings(models, loras, tmp_path, save_outputs=True))
    engine.load("tiny")
    return engine


@pytest.fixture
def modules_written(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every apply's `modules_changed`, as the backends report it."""
    counts: list[int] = []
    original = LoraBackends.apply

    def counted(self, *args, **kwargs):
        routed = original(self, *args, **kwargs)
        counts.append(routed.report.modules_changed)
        return routed

    monkeypatch.setattr(LoraBackends, "apply", counted)
    return counts


def test_strength_by_lora_plot_equals_one_by_one(engine: Engine) -> None:
    specs = [AxisSpec(AxisKind.LORA_STRENGTH, "0.2-1.0 [3]"), AxisSpec(AxisKind.LORA, "ink, oil")]
    plot = prepare_plot(engine, BASE, specs)
    steps_seen: list[str] = []
    result = run_plot(engine, plot, on_progress=lambda p: steps_seen.append(p.description))
    assert not result.interrupted and result.grid is not None
    assert len(result.images) == 7  # the grid, then the six cells
    grid = result.grid.image
    layout = result.layout
    assert layout.inner is not None and layout.inner.pad_left == 48  # 3/4 of 64
    expected_prompts = [
        f"a cat, <lora:{name}:{w}>" for name in ("ink", "oil") for w in ("0.2", "0.6", "1")
    ]
    for index, prompt in enumerate(expected_prompts):
        alone = engine.generate(GenerationRequest(prompt, steps=2, width=64, height=64, seed=9))
        assert alone.warnings == []
        x, y = index % 3, index // 3
        crop = grid.crop(layout.cell_box(x, y, 0))
        assert np.array_equal(np.asarray(crop), np.asarray(alone.images[0].image)), prompt
        cell = result.cells[index]
        assert cell is not None and cell.infotext.prompt == prompt
        assert cell.path is not None and cell.path.exists()  # every cell saved
    # progress counts cells and steps
    assert "Cell 1/6: Step 1/12" in steps_seen and "Cell 6/6: Step 12/12" in steps_seen

    # the saved grid names the axes and values; its other fields are the first cell's
    assert result.grid.path is not None
    with Image.open(result.grid.path) as saved:
        text = read_image_parameters(saved)
    assert text is not None
    info = parse_infotext(text)
    assert info.params[PLOT_FIELD] == "X: LoRA strength = 0.2, 0.6, 1; Y: LoRA = ink, oil"
    assert info.params["X Type"] == "LoRA strength" and info.params["Y Values"] == "ink, oil"
    assert info.prompt == expected_prompts[0] and info.params["Seed"] == "9"


def test_labels_are_drawn_in_their_strips(engine: Engine) -> None:
    specs = [AxisSpec(AxisKind.STEPS, "1-2"), AxisSpec(AxisKind.CFG, "3, 7, 9")]
    result = run_plot(engine, prepare_plot(engine, BASE, specs))
    assert result.grid is not None
    grid, layout = result.grid.image, result.layout
    assert layout.inner is not None
    assert grid.size == (48 + 2 * 64, layout.inner.pad_top + 3 * 64)
    blank = Image.new("RGB", (64, layout.inner.pad_top), BACKGROUND)
    for column in range(2):  # each column label strip holds ink
        strip = grid.crop((48 + 64 * column, 0, 48 + 64 * (column + 1), layout.inner.pad_top))
        assert ImageChops.difference(strip, blank).getbbox() is not None
    for row in range(3):
        strip = grid.crop(
            (0, layout.inner.pad_top + 64 * row, 48, layout.inner.pad_top + 64 * (row + 1))
        )
        assert ImageChops.difference(strip, Image.new("RGB", (48, 64), BACKGROUND)).getbbox()
    corner = grid.crop((0, 0, 48, layout.inner.pad_top))
    assert (
        ImageChops.difference(corner, Image.new("RGB", corner.size, BACKGROUND)).getbbox() is None
    )


def test_lora_work_follows_the_run_order(engine: Engine, modules_written: list[int]) -> None:
    # shown: LoRA alternates along X; run: each LoRA's three seeds together
    specs = [AxisSpec(AxisKind.LORA, "ink, oil"), AxisSpec(AxisKind.SEED, "1-3")]
    plot = prepare_plot(engine, BASE, specs)
    result = run_plot(engine, plot)
    plot_writes = sum(modules_written)
    assert result.set_switches == 1
    assert result.modules_written == plot_writes
    # what ordering by LoRA set implies: write ink once, then switch to oil once
    engine.generate(BASE)  # back to no LoRA
    modules_written.clear()
    engine.generate(GenerationRequest("a cat, <lora:ink:1>", steps=2, width=64, height=64, seed=1))
    engine.generate(GenerationRequest("a cat, <lora:oil:1>", steps=2, width=64, height=64, seed=1))
    one_switch = sum(modules_written)
    assert plot_writes <= one_switch
    # display order would switch five times
    engine.generate(BASE)
    modules_written.clear()
    for cell in plot.cells:
        engine.generate(cell.request)
    assert sum(modules_written) > plot_writes


def test_interrupt_finishes_the_current_cell_and_keeps_the_partial_grid(engine: Engine) -> None:
    """As A1111's script: Interrupt (the queue's, as the UI and the API send it) during cell 2
    lets cell 2 finish whole, then stops; the cells never run stay black."""
    specs = [AxisSpec(AxisKind.SEED, "1-4")]
    plot = prepare_plot(engine, BASE, specs)
    queue = JobQueue.for_engine(engine)

    def stop_in_second_cell(p) -> None:
        if p.cell == 2 and p.inner.step == 1:
            queue.interrupt()

    result = run_plot(engine, plot, on_progress=stop_in_second_cell)
    assert result.interrupted
    assert result.cells[0] is not None and result.cells[1] is not None
    assert result.cells[2] is None and result.cells[3] is None
    alone = engine.generate(plot.cells[1].request).images[0].image
    assert np.array_equal(np.asarray(result.cells[1].image), np.asarray(alone))
    assert result.grid is not None
    last = np.asarray(result.grid.image.crop(result.layout.cell_box(3, 0, 0)))
    assert not last.any()  # a cell never run is black


def test_checkpoint_axis_loads_each_model_once_and_restores_the_first(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = engine.settings.models_dir
    shutil.copy(models / "tiny.safetensors", models / "other.safetensors")
    loads: list[str] = []
    original = Engine.load

    def load(self: Engine, name: str):
        loads.append(name)
        return original(self, name)

    monkeypatch.setattr(Engine, "load", load)
    specs = [AxisSpec(AxisKind.CHECKPOINT, "other, tiny"), AxisSpec(AxisKind.SEED, "1, 2")]
    plot = prepare_plot(engine, BASE, specs)
    result = run_plot(engine, plot)
    # run order: both "other" cells, then both "tiny" cells; then nothing left to restore
    assert loads == ["other", "tiny"]
    assert engine.model is not None and engine.model.name == "tiny"
    models_shown = [c.infotext.params["Model"] for c in result.cells if c is not None]
    assert models_shown == ["other", "tiny", "other", "tiny"]
