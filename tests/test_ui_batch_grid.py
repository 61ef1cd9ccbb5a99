"""A batch gives a grid as A1111 does: first in the gallery, round(sqrt(n)) rows, saved to
`txt2img-grids/DATE/NNNNN-SEED.png` with the first image's infotext."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from engine_settings import cpu_settings
from PIL import Image

from tests.test_generation_loras import SMALL
from webui.arch import Arch
from webui.engine.generate import Engine, GenerationRequest
from webui.engine.image_grid import grid_layout, image_grid
from webui.engine.infotext import read_image_parameters
from webui.ui.txt2img import gallery_items, infotext_panels


@pytest.mark.parametrize(
    ("count", "rows", "columns"),
    # hand-worked: round(sqrt(n)) rows, ceil(n / rows) columns
    [(1, 1, 1), (2, 1, 2), (3, 2, 2), (4, 2, 2), (5, 2, 3), (6, 2, 3), (7, 3, 3), (9, 3, 3)],
)
def test_layout(count: int, rows: int, columns: int) -> None:
    layout = grid_layout(count)
    assert (layout.rows, layout.columns) == (rows, columns)


def test_four_images_make_a_two_by_two_grid_of_them() -> None:
    images = [Image.new("RGB", (48, 32), color) for color in ("red", "green", "blue", "white")]
    grid = np.asarray(image_grid(images))
    assert grid.shape == (64, 96, 3)
    quadrants = [grid[:32, :48], grid[:32, 48:], grid[32:, :48], grid[32:, 48:]]
    for quadrant, image in zip(quadrants, images, strict=True):
        assert np.array_equal(quadrant, np.asarray(image))


def test_a_batch_saves_its_grid_with_the_first_images_infotext(
    tmp_path: Path, tiny_checkpoint_factory
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "loras").mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "tiny.safetensors")
    settings = cpu_settings(models, tmp_path / "loras", tmp_path, save_outputs=True)
    engine = Engine(settings)
    engine.load("tiny")
    request = GenerationRequest("a cat", **{**SMALL, "seed": 7, "batch_size": 2, "batch_count": 2})
    result = engine.generate(request)
    grid = engine.save_grid(result)
    assert grid is not None and grid.seed == 7
    assert grid.path is not None
    assert grid.path.parent.parent == tmp_path / "out" / "txt2img-grids"
    assert grid.path.name == "00000-7.png"
    assert read_image_parameters(Image.open(grid.path)) == result.images[0].infotext.format()
    assert np.array_equal(np.asarray(Image.open(grid.path).convert("RGB")), np.asarray(grid.image))
    width, height = result.images[0].image.size
    assert grid.image.size == (2 * width, 2 * height)
    items = gallery_items(result, grid)
    assert [caption for _, caption in items][:2] == ["Grid: 4 images", "seed 7"]
    assert len(infotext_panels(result, grid)) == 5
    single = engine.generate(GenerationRequest("a cat", **{**SMALL, "seed": 7}))
    assert engine.save_grid(single) is None
