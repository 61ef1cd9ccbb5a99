"""Running an X/Y/Z plot through the engine as one job: cells in run order (few model and LoRA
switches), images and infotexts kept in display order, the grid drawn and saved with the
infotext of the whole plot. An interrupt stops after the current cell; the grid keeps the
cells done (the rest black)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from PIL import Image

from webui.engine.generate import (
    GRIDS_SUBFOLDER,
    Engine,
    GeneratedImage,
    GenerationRequest,
    Progress,
    Stage,
    resolve_seed,
)
from webui.engine.infotext import Infotext
from webui.engine.jobs import JobQueue
from webui.engine.samplers import sampler_names
from webui.engine.xyz_grid import PlotLayout, draw_plot, plot_layout
from webui.engine.xyz_plot import (
    AxisChoices,
    AxisError,
    AxisKind,
    AxisSpec,
    Plot,
    parse_plot,
    split_values,
)

MAX_CELLS = 400  # one plot; more is almost surely a typo in a range


@dataclass(frozen=True)
class PlotProgress:
    """A plot's progress: cell `cell` of `cells` running, `inner` its engine progress;
    `step`/`total` count denoising steps over the whole plot."""

    cell: int
    cells: int
    inner: Progress
    step: int
    total: int

    @property
    def unit(self) -> str:
        return self.inner.unit

    @property
    def description(self) -> str:
        if self.inner.stage is Stage.LORAS:
            return f"Cell {self.cell}/{self.cells}: {self.inner.description}"
        return f"Cell {self.cell}/{self.cells}: Step {self.step}/{self.total}"


@dataclass(frozen=True)
class PlotResult:
    """The grid (None when no cell finished), the cells in display order (None: not run),
    warnings, and how much LoRA work the run took."""

    grid: GeneratedImage | None
    cells: tuple[GeneratedImage | None, ...]
    layout: PlotLayout
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    set_switches: int = 0  # times the LoRA set changed between consecutive cells run
    modules_written: int = 0  # modules the patcher wrote, summed over the plot

    @property
    def images(self) -> list[GeneratedImage]:
        """The grid, then every finished cell (the gallery's order)."""
        done = [c for c in self.cells if c is not None]
        return [self.grid, *done] if self.grid is not None else done


def axis_choices(engine: Engine) -> AxisChoices:
    return AxisChoices(
        loras=[f.name for f in engine.catalog.files],
        samplers=sampler_names(),
        checkpoints=engine.model_choices(),
    )


def _limit(count: int) -> None:
    if count > MAX_CELLS:
        raise AxisError(f"the plot has {count} cells; at most {MAX_CELLS}")


def prepare_plot(engine: Engine, base: GenerationRequest, specs: list[AxisSpec]) -> Plot:
    """The plot for `base` and these axes; a random seed is fixed once for every cell (as
    A1111 does), and a seed axis's -1 values each get their own. Raises AxisError or
    RequestError with a message for the user."""
    base = replace(base, seed=resolve_seed(base.seed), batch_count=1, batch_size=1)
    specs = [_fixed_seeds(spec) for spec in specs]
    return parse_plot(base, specs, axis_choices(engine), _limit)


def _fixed_seeds(spec: AxisSpec) -> AxisSpec:
    if spec.kind is not AxisKind.SEED:
        return spec
    items = [str(resolve_seed(-1)) if v.strip() == "-1" else v for v in split_values(spec.values)]
    return replace(spec, values=", ".join(items))


def run_plot(
    engine: Engine,
    plot: Plot,
    legend: bool = True,
    on_progress: Callable[[PlotProgress], None] | None = None,
) -> PlotResult:
    """Render every cell in turn with other jobs (one job for the whole plot)."""
    queue = JobQueue.for_engine(engine)
    return queue.run(
        "xyz plot",
        lambda report: _run(engine, queue, plot, legend, report, on_progress),
        finish_unit=True,  # an interrupt ends the plot after the cell it is drawing
    )


def _run(
    engine: Engine,
    queue: JobQueue,
    plot: Plot,
    legend: bool,
    report: Callable[[Progress], None],
    on_progress: Callable[[PlotProgress], None] | None,
) -> PlotResult:
    started = time.perf_counter()
    if engine.model is None:
        engine.load_default()
    assert engine.model is not None
    first_model = engine.model.name
    order = plot.run_order()
    total = sum(cell.request.steps for cell in order)
    shown: list[GeneratedImage | None] = [None] * len(plot.cells)
    warnings: list[str] = []
    switches, written, done_steps = 0, 0, 0
    interrupted = False
    previous_key: tuple[int, ...] | None = None
    try:
        for number, cell in enumerate(order, start=1):
            if queue.status().interrupted:  # between two cells
                interrupted = True
                break
            if cell.checkpoint is not None and engine.model.name != cell.checkpoint:
                engine.load(cell.checkpoint)
            if previous_key is not None and cell.lora_key != previous_key:
                switches += 1
            previous_key = cell.lora_key

            def progress(p: Progress, number: int = number, offset: int = done_steps) -> None:
                nonlocal written
                if p.stage is Stage.LORAS and p.step == p.total:
                    written += p.total  # the patcher's last report of an apply: its module count
                whole = replace(p, step=offset + p.step, total=total)
                report(whole if p.stage is Stage.DENOISE else p)
                if on_progress is not None:
                    on_progress(PlotProgress(number, len(order), p, whole.step, total))

            result = engine.generate(cell.request, on_progress=progress)
            done_steps += cell.request.steps
            warnings += [w for w in result.warnings if w not in warnings]
            if result.images:
                shown[plot.index(cell)] = result.images[0]
            if result.interrupted or queue.status().interrupted:
                interrupted = True
                break
    finally:
        if engine.model is not None and engine.model.name != first_model:
            engine.load(first_model)  # a checkpoint axis leaves the model it found
    layout = plot_layout(_cell_size(plot, shown), tuple(a.labels for a in plot.axes), legend)
    grid = _grid(engine, plot, shown, layout)
    return PlotResult(
        grid,
        tuple(shown),
        layout,
        warnings,
        interrupted,
        time.perf_counter() - started,
        switches,
        written,
    )


def _cell_size(plot: Plot, shown: list[GeneratedImage | None]) -> tuple[int, int]:
    first = next((c for c in shown if c is not None), None)
    if first is not None:
        return first.image.size
    request = plot.cells[0].request
    return request.width, request.height


def _grid(
    engine: Engine, plot: Plot, shown: list[GeneratedImage | None], layout: PlotLayout
) -> GeneratedImage | None:
    """The plot image with the first finished cell's infotext plus the plot's axes; saved to
    `txt2img-grids/` when saving is on."""
    first = next((c for c in shown if c is not None), None)
    if first is None:
        return None
    images: list[Image.Image | None] = [c.image if c else None for c in shown]
    image = draw_plot(images, layout)
    params = {**first.infotext.params, **plot.infotext_fields()}
    infotext = Infotext(first.infotext.prompt, first.infotext.negative_prompt, params)
    path = None
    if engine.settings.save_outputs:
        path = engine.save_image(image, infotext, first.seed, GRIDS_SUBFOLDER)
    return GeneratedImage(image, first.seed, infotext, path)
