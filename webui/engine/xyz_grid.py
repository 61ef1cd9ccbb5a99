"""The X/Y/Z plot's image: each Z value's cells as an X-by-Y grid with column labels on top and
row labels on the left, the Z grids side by side under their own labels (A1111's layout and
sizes: font (w + h) // 25 of the cell, left strip 3/4 of a cell wide). Black on white, PIL's
default scalable font; an empty cell (an interrupted plot) stays black."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


@cache
def label_font(size: int) -> ImageFont.FreeTypeFont:
    """PIL's default scalable font at `size` pixels."""
    font = ImageFont.load_default(size=max(size, 1))
    assert isinstance(font, ImageFont.FreeTypeFont)  # Pillow built with FreeType
    return font


@dataclass(frozen=True)
class LabelLine:
    text: str
    font_size: int
    width: int
    height: int


@dataclass(frozen=True)
class Annotation:
    """Where labels go around a grid of `cell` sized images: the strips' sizes, the font size
    and each label's wrapped lines."""

    cell: tuple[int, int]
    pad_left: int
    pad_top: int
    font_size: int
    spacing: int
    columns: tuple[tuple[LabelLine, ...], ...]
    rows: tuple[tuple[LabelLine, ...], ...]


def _measure(text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = label_font(size).getbbox(text)
    return int(right - left), int(bottom - top)


def _lines(text: str, size: int, allowed: int) -> tuple[LabelLine, ...]:
    """`text` wrapped at word boundaries to `allowed` pixels; a word still too wide is drawn
    smaller until it fits (as A1111 does)."""
    wrapped: list[str] = []
    for word in text.split():
        joined = f"{wrapped[-1]} {word}" if wrapped else word
        if wrapped and _measure(joined, size)[0] <= allowed:
            wrapped[-1] = joined
        else:
            wrapped.append(word)
    out = []
    for line in wrapped:
        fitted = size
        while fitted > 1 and _measure(line, fitted)[0] > allowed:
            fitted -= 1
        width, height = _measure(line, size)  # the line keeps the full size's room
        out.append(LabelLine(line, fitted, width, height))
    return tuple(out)


def _height(lines: Sequence[LabelLine], spacing: int) -> int:
    return sum(line.height for line in lines) + spacing * max(len(lines) - 1, 0)


def annotation(
    cell: tuple[int, int], column_labels: Sequence[str], row_labels: Sequence[str]
) -> Annotation:
    """The label layout for a grid of `cell` sized images. No strip where all its labels are
    empty."""
    width, height = cell
    size = (width + height) // 25
    spacing = size // 2
    pad_left = width * 3 // 4 if any(row_labels) else 0
    columns = tuple(_lines(text, size, width) for text in column_labels)
    rows = tuple(_lines(text, size, pad_left) for text in row_labels)
    tallest = max((_height(lines, spacing) for lines in columns), default=0)
    pad_top = tallest + 2 * spacing if tallest else 0
    return Annotation(cell, pad_left, pad_top, size, spacing, columns, rows)


def _draw_lines(
    draw: ImageDraw.ImageDraw, center_x: float, top: float, lines: Sequence[LabelLine], spacing: int
) -> None:
    for line in lines:
        font = label_font(line.font_size)
        draw.text((center_x, top + line.height / 2), line.text, font=font, fill=TEXT, anchor="mm")
        top += line.height + spacing


def annotate(grid: Image.Image, layout: Annotation) -> Image.Image:
    """`grid` (cells edge to edge) inside its label strips."""
    width, height = layout.cell
    out = Image.new("RGB", (grid.width + layout.pad_left, grid.height + layout.pad_top), BACKGROUND)
    out.paste(grid, (layout.pad_left, layout.pad_top))
    draw = ImageDraw.Draw(out)
    for column, lines in enumerate(layout.columns):
        top = layout.pad_top / 2 - _height(lines, layout.spacing) / 2
        _draw_lines(draw, layout.pad_left + width * (column + 0.5), top, lines, layout.spacing)
    for row, lines in enumerate(layout.rows):
        top = layout.pad_top + height * (row + 0.5) - _height(lines, layout.spacing) / 2
        _draw_lines(draw, layout.pad_left / 2, top, lines, layout.spacing)
    return out


@dataclass(frozen=True)
class PlotLayout:
    """Where each cell of a plot lies in its image."""

    cell: tuple[int, int]
    columns: int
    rows: int
    grids: int
    inner: Annotation | None  # the X/Y labels of each Z grid (None: no legend)
    outer: Annotation | None  # the Z labels over the grids

    @property
    def grid_size(self) -> tuple[int, int]:
        """One Z value's grid, labels included."""
        pad_left, pad_top = (self.inner.pad_left, self.inner.pad_top) if self.inner else (0, 0)
        return self.columns * self.cell[0] + pad_left, self.rows * self.cell[1] + pad_top

    def cell_box(self, x: int, y: int, z: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of cell (x, y, z) in the plot image."""
        grid_w, _ = self.grid_size
        left = self.inner.pad_left if self.inner else 0
        top = (self.inner.pad_top if self.inner else 0) + (self.outer.pad_top if self.outer else 0)
        left += z * grid_w + x * self.cell[0]
        top += y * self.cell[1]
        return left, top, left + self.cell[0], top + self.cell[1]


def plot_layout(
    cell: tuple[int, int],
    labels: tuple[Sequence[str], Sequence[str], Sequence[str]],
    legend: bool = True,
) -> PlotLayout:
    """The layout of a plot of `cell` sized images with these X, Y and Z labels."""
    xs, ys, zs = labels
    if not legend:
        return PlotLayout(cell, len(xs), len(ys), len(zs), None, None)
    inner = annotation(cell, xs, ys)
    layout = PlotLayout(cell, len(xs), len(ys), len(zs), inner, None)
    outer = annotation(layout.grid_size, zs, [""]) if any(zs) else None
    return PlotLayout(cell, len(xs), len(ys), len(zs), inner, outer)


def draw_plot(
    cells: Sequence[Image.Image | None],
    layout: PlotLayout,
) -> Image.Image:
    """The plot image from its cells in display order (x fastest, then y, then z); None cells
    stay black."""
    width, height = layout.cell
    grids = []
    for z in range(layout.grids):
        grid = Image.new("RGB", (layout.columns * width, layout.rows * height))
        for y in range(layout.rows):
            for x in range(layout.columns):
                image = cells[x + y * layout.columns + z * layout.columns * layout.rows]
                if image is not None:
                    grid.paste(image.convert("RGB"), (x * width, y * height))
        grids.append(annotate(grid, layout.inner) if layout.inner else grid)
    grid_w, grid_h = grids[0].size
    row = Image.new("RGB", (grid_w * len(grids), grid_h), BACKGROUND)
    for z, grid in enumerate(grids):
        row.paste(grid, (z * grid_w, 0))
    return annotate(row, layout.outer) if layout.outer else row
