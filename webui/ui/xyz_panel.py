"""The txt2img tab's "X/Y/Z plot" accordion: three axes (type, values, and the LoRA a strength
axis changes), Draw legend, and a Generate plot button that fills the gallery with the grid,
then every cell."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from webui.engine.generate import Engine, GeneratedImage, GenerationRequest, GenerationResult
from webui.engine.xyz_plot import AxisKind, AxisSpec
from webui.engine.xyz_run import PlotProgress, PlotResult, prepare_plot, run_plot
from webui.ui.gallery_actions import run_items
from webui.ui.messages import user_message, warnings_html

log = logging.getLogger(__name__)

VALUES_INFO = (
    "comma list; numbers also as ranges: 1-5, 1-5 (+2), 1-10 [5]; LoRA: names or a folder/ "
    "of loras/; Prompt S/R: the first value is searched, each replaces it"
)
LORA_INFO = "the LoRA this axis changes (empty: the LoRA of the LoRA axis)"
TYPE_INFO = {"X": "columns", "Y": "rows", "Z": "one grid per value, side by side"}
_DEFAULT_KINDS = (AxisKind.LORA_STRENGTH, AxisKind.LORA, AxisKind.NOTHING)


@dataclass(frozen=True)
class RunShape:
    """The tab's own ways to show a run: infotext panels and gallery items (grid first)."""

    panels: Callable[[GenerationResult, GeneratedImage | None], list[str]]
    items: Callable[[GenerationResult, GeneratedImage | None], list[Any]]


@dataclass(frozen=True)
class XyzPanel:
    """The accordion's inputs (three times type, values, LoRA; then the legend box) and its
    button."""

    inputs: list[Any]
    generate: gr.Button

    def wire(
        self,
        engine: Engine,
        request_of: Callable[..., GenerationRequest],
        page_inputs: list[Any],
        outputs: list[Any],
        gallery: Any,
        shape: RunShape,
    ) -> None:
        """Generate plot: the page's request (`request_of(*page_inputs)`) as the base, results
        into the tab's `outputs` (gallery, infotext, warnings, panels, items, selected)."""
        count = len(page_inputs)

        def on_plot(
            *values: Any,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects it
        ) -> tuple[Any, ...]:
            return run_plot_for_page(
                engine, request_of(*values[:count]), list(values[count:]), progress, shape
            )

        self.generate.click(
            on_plot,
            inputs=[*page_inputs, *self.inputs],
            outputs=outputs,
            concurrency_id="gpu",
            show_progress_on=gallery,
        )


def axis_specs(values: list[Any]) -> tuple[list[AxisSpec], bool]:
    """The three AxisSpecs and the legend flag from the panel's values."""
    specs = [
        AxisSpec(AxisKind(kind or AxisKind.NOTHING.value), text or "", lora or "")
        for kind, text, lora in zip(values[0:9:3], values[1:9:3], values[2:9:3], strict=True)
    ]
    return specs, bool(values[9])


def run_plot_for_page(
    engine: Engine, base: GenerationRequest, values: list[Any], progress: Any, shape: RunShape
) -> tuple[Any, ...]:
    """Run the plot; the tab's outputs, or an unchanged gallery and one warning line."""

    try:
        specs, legend = axis_specs(values)
        plot = prepare_plot(engine, base, specs)

        def report(p: PlotProgress) -> None:
            progress((p.step, p.total), desc=p.description, unit=p.unit)

        result = run_plot(engine, plot, legend, report)
    except Exception as exc:  # shown in the UI as one line; unexpected ones are logged
        return gr.update(), "", warnings_html([user_message(exc)]), [], gr.update(), gr.update()
    run = as_generation_result(result)
    panels = shape.panels(run, result.grid)
    first = panels[0] if panels else ""
    gallery = shape.items(run, result.grid)
    return gallery, first, warnings_html(run.warnings), panels, run_items(run, result.grid), 0


def as_generation_result(result: PlotResult) -> GenerationResult:
    """The cells run as one generation's images (the gallery's shape), the grid apart."""
    done = [c for c in result.cells if c is not None]
    return GenerationResult(done, result.warnings, result.interrupted, result.seconds)


def build_xyz_panel(engine: Engine) -> XyzPanel:
    """Lay out the accordion inside the current Blocks context."""
    loras = sorted(f.name for f in engine.catalog.files)
    inputs: list[Any] = []
    with gr.Accordion("X/Y/Z plot", open=False, elem_id="txt2img-xyz"):
        for name, default in zip("XYZ", _DEFAULT_KINDS, strict=True):
            with gr.Row():
                kind = gr.Dropdown(
                    [k.value for k in AxisKind],
                    value=default.value,
                    label=f"{name} type",
                    info=f"what the plot varies along {name}: {TYPE_INFO[name]}",
                    elem_id=f"txt2img-xyz-{name.lower()}-type",
                )
                text = gr.Textbox(
                    label=f"{name} values",
                    info=VALUES_INFO if name == "X" else "as for X",
                    elem_id=f"txt2img-xyz-{name.lower()}-values",
                )
                lora = gr.Dropdown(
                    loras,
                    value=None,
                    label=f"{name} LoRA",
                    info=LORA_INFO,
                    allow_custom_value=True,
                    visible=default.needs_lora_name,
                    elem_id=f"txt2img-xyz-{name.lower()}-lora",
                )
            kind.change(
                lambda k: gr.update(visible=AxisKind(k).needs_lora_name),
                inputs=kind,
                outputs=lora,
                queue=False,
                show_progress="hidden",
            )
            inputs += [kind, text, lora]
        with gr.Row():
            legend = gr.Checkbox(
                value=True,
                label="Draw legend",
                info="label the columns, rows and grids with their values",
                elem_id="txt2img-xyz-legend",
            )
            generate = gr.Button("Generate plot", variant="primary", elem_id="txt2img-xyz-run")
    return XyzPanel([*inputs, legend], generate)
