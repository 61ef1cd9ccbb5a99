"""A batch's images as one grid image, laid out as A1111 lays them out by default."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class GridLayout:
    rows: int
    columns: int


def grid_layout(count: int) -> GridLayout:
    """A1111's automatic layout: round(sqrt(n)) rows, as many columns as that needs (the last
    row may have empty cells)."""
    if count < 1:
        raise ValueError("a grid needs at least one image")
    rows = round(math.sqrt(count))
    return GridLayout(rows, math.ceil(count / rows))


def image_grid(images: Sequence[Image.Image]) -> Image.Image:
    """The images left to right, top to bottom, on black; cells are the first image's size."""
    layout = grid_layout(len(images))
    width, height = images[0].size
    grid = Image.new("RGB", (layout.columns * width, layout.rows * height))
    for index, image in enumerate(images):
        row, column = divmod(index, layout.columns)
        grid.paste(image, (column * width, row * height))
    return grid
