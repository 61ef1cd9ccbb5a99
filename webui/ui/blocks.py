"""The whole Gradio app: model picker on top, one tab per tool.

What the page shows of the server (the loaded model, the checkpoint lists, the server-wide
options) is read from the engine on every page load, never fixed when the page is built."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from webui.engine.generate import DEMO_MODEL_NAME, Engine
from webui.engine.jobs import JobQueue
from webui.ui.family_controls import family_updates
from webui.ui.gallery_actions import png_info_file, selected_item
from webui.ui.messages import user_message, warnings_html
from webui.ui.networks_tab import NETWORKS_CSS, build_networks_tab
from webui.ui.paste_params import PASTE_FIELDS, paste
from webui.ui.png_info import build_png_info_tab, describe_image
from webui.ui.settings_tab import build_settings_tab, current_values
from webui.ui.tools_tab import TOOLS_CSS, build_tools_tab, checkpoint_values
from webui.ui.txt2img import BUTTON_TITLES_JS, build_txt2img_tab, trigger_words_update

log = logging.getLogger(__name__)

CSS = (
    """
.lw-infotext { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.85em; background: var(--block-background-fill);
  padding: 8px; border-radius: 6px; margin: 0; }
.lw-timing { font-size: 0.8em; opacity: 0.7; margin-top: 4px; }
.lw-warnings { border-left: 4px solid #e0a000; padding: 4px 10px; background: rgba(224,160,0,0.08); }
.lw-warnings ul { margin: 0; padding-left: 1.2em; }
.lw-model-status { font-size: 0.9em; opacity: 0.85; }
#model-refresh { align-self: flex-end; flex-grow: 0; max-height: 2.7em; margin-bottom: 10px; }
.lw-token-counter { text-align: right; font-size: 0.8em; opacity: 0.75; margin-top: -6px; }
.lw-tokens-chunked { color: #c07000; }
.lw-unused textarea { opacity: 0.5; }
#txt2img-gallery img { object-fit: contain !important; }
"""
    + NETWORKS_CSS
    + TOOLS_CSS
)


def model_status_html(engine: Engine) -> str:
    model = engine.model
    if model is None:
        return "<span class='lw-model-status'>No model loaded yet: it loads on first use.</span>"
    if model.name == DEMO_MODEL_NAME:
        folder = html.escape(str(engine.settings.models_dir))
        return (
            "<span class='lw-model-status'>⚠ Demo model: tiny, random weights, so images are noise. "
            + (
                "Choose a checkpoint in the picker.</span>"
                if engine.checkpoints()
                else f"Put a Stable Diffusion checkpoint (.safetensors) in <code>{folder}</code> "
                "and press Refresh.</span>"
            )
        )
    return (
        f"<span class='lw-model-status'>Loaded <b>{html.escape(model.name)}</b> · {model.kind.label} · "
        f"{model.device.type} · {model.precision}</span>"
    )


# Ctrl+Enter, Esc, Ctrl+Up/Down: installed once per page by a load event.
KEYBOARD_JS = (Path(__file__).with_name("static") / "keyboard.js").read_text(encoding="utf-8")


def picker_values(engine: Engine) -> tuple[list[tuple[str, str]], str]:
    """The model picker's (label, name) choices and value: the loaded model (or, before any has
    loaded, the one that will load), listed even when `models/` no longer holds it (the demo
    model)."""
    choices = engine.model_picker_choices()
    current = engine.model.name if engine.model else engine.default_model()
    listed = any(name == current for _, name in choices)
    return (choices if listed else [*choices, (current, current)]), current


def build_ui(engine: Engine) -> gr.Blocks:
    """Build (not launch) the Blocks app around an engine."""
    with gr.Blocks(title="LoRA WebUI") as ui:
        with gr.Row(equal_height=True):
            choices, current = picker_values(engine)
            model = gr.Dropdown(
                choices,
                value=current,
                label="Checkpoint",
                scale=4,
                elem_id="model-select",
            )
            refresh = gr.Button(
                "Refresh", scale=0, min_width=90, size="sm", elem_id="model-refresh"
            )
            status = gr.HTML(model_status_html(engine), elem_id="model-status")
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                txt2img = build_txt2img_tab(engine)
            with gr.Tab("Networks", id="networks") as networks:
                build_networks_tab(engine, txt2img.prompt, txt2img.gallery, networks)
            with gr.Tab("PNG Info", id="png-info"):
                png_info = build_png_info_tab()
            with gr.Tab("Tools", id="tools") as tools:
                tool_checkpoints = build_tools_tab(engine, tools)
            with gr.Tab("Settings", id="settings"):
                settings = build_settings_tab(engine)

        def send_to_png_info(run: Any, index: int | None) -> tuple[Any, ...]:
            item = selected_item(run, index)
            if item is None:
                return gr.update(), gr.update(), gr.update(), gr.update()
            path = png_info_file(item)
            return gr.Tabs(selected="png-info"), str(path), *describe_image(path)

        txt2img.send_to_png_info.click(
            send_to_png_info,
            inputs=txt2img.gallery_state,
            outputs=[tabs, png_info.image, png_info.raw, png_info.table],
            show_progress="hidden",
        )

        def pasted(text: str | None, nothing: str) -> tuple[Any, ...]:
            """txt2img shown, with every field the infotext gives and the checkpoint it names."""
            if not text or not text.strip():
                keep = (gr.update(),) * (1 + len(PASTE_FIELDS))
                return gr.Tabs(selected="txt2img"), warnings_html([nothing]), *keep
            done = paste(engine, text)
            pick = gr.update(value=done.checkpoint) if done.checkpoint else gr.update()
            return gr.Tabs(selected="txt2img"), warnings_html(done.warnings), pick, *done.updates

        def png_info_text(path: str | None) -> str | None:
            text, rows = describe_image(path)
            return text if rows else None

        def gallery_text(run: Any, index: int | None) -> str | None:
            item = selected_item(run, index)
            return item.generated.infotext.format() if item else None

        def prompt_text(text: str | None, run: Any, index: int | None) -> str | None:
            # A1111: an empty prompt box reads the last generation's parameters
            return text if text and text.strip() else gallery_text(run, index or 0)

        def picker() -> Any:
            names, value = picker_values(engine)
            return gr.update(choices=names, value=value)

        def family(shown: Any, pasted_cfg: float | None = None) -> list[Any]:
            return family_updates(engine.generation_controls(), shown, pasted_cfg=pasted_cfg)

        def switch(
            name: str, shown: Any, progress: gr.Progress, pasted_cfg: float | None = None
        ) -> tuple[Any, ...]:
            try:
                progress(0, desc=f"Loading {name}…")
                JobQueue.for_engine(engine).load(name)  # in turn with generations
            except (
                Exception
            ) as exc:  # one line under the picker, which names the model still loaded
                message = html.escape(user_message(exc))
                status_line = f"<span class='lw-warnings'>{message}</span>"
                return picker(), status_line, *family(shown, pasted_cfg)
            return picker(), model_status_html(engine), *family(shown, pasted_cfg)

        def on_select(
            name: str,
            shown: Any,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects it
        ) -> tuple[Any, ...]:
            return switch(name, shown, progress)

        def load_picked(
            name: str,
            shown: Any,
            cfg: float,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects it
        ) -> tuple[Any, ...]:
            """The checkpoint a paste picked, loaded, keeping the values the paste set (CFG `cfg`
            among them); nothing changes when it is loaded already."""
            if engine.model is not None and engine.model.name == name:
                return (gr.update(),) * (2 + len(txt2img.family))
            return switch(name, shown, progress, pasted_cfg=cfg)

        paste_outputs = [tabs, txt2img.warnings, model, *txt2img.paste_targets]
        sources = [
            (
                png_info.send_to_txt2img,
                png_info_text,
                [png_info.image],
                "this image carries no generation parameters",
            ),
            (txt2img.send_to_txt2img, gallery_text, txt2img.gallery_state, "no image selected"),
            (
                txt2img.paste,
                prompt_text,
                [txt2img.prompt, *txt2img.gallery_state],
                "nothing to read: paste an infotext into the prompt box first",
            ),
        ]
        for button, read, source_inputs, nothing in sources:
            event = button.click(
                lambda *v, read=read, nothing=nothing: pasted(read(*v), nothing),
                inputs=source_inputs,
                outputs=paste_outputs,
                show_progress="hidden",
            )
            event.then(
                load_picked,
                inputs=[model, txt2img.shown_family, txt2img.cfg],
                outputs=[model, status, *txt2img.family],
                concurrency_id="gpu",
                show_progress_on=[model, status],
            )

        def on_refresh(*chosen: str | None) -> tuple[Any, ...]:
            """New lists of checkpoints; loads nothing, so the picker keeps the loaded model."""
            return picker(), model_status_html(engine), *checkpoint_values(engine, chosen)

        def on_page_load() -> tuple[Any, ...]:
            return (
                picker(),
                model_status_html(engine),
                *checkpoint_values(engine),
                trigger_words_update(engine),
                *current_values(engine),
                *family(None),  # a new page: the loaded family's defaults
            )

        model.input(
            on_select,
            inputs=[model, txt2img.shown_family],
            outputs=[model, status, *txt2img.family],
            concurrency_id="gpu",
            show_progress_on=[model, status],
        )
        refresh.click(
            on_refresh,
            inputs=tool_checkpoints,
            outputs=[model, status, *tool_checkpoints],
            queue=False,
        )
        page_outputs = [
            model,
            status,
            *tool_checkpoints,
            txt2img.trigger_words,
            *settings.all,
            *txt2img.family,
        ]
        ui.load(on_page_load, outputs=page_outputs, queue=False)
        ui.load(None, js=KEYBOARD_JS)
        ui.load(None, js=BUTTON_TITLES_JS)
    return ui
