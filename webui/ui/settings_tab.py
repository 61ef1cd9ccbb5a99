"""The Settings tab: the server-wide options (defaults of new pages and the values API calls
get), saved to the settings file, and where the app keeps its files."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from webui.engine.generate import Engine
from webui.engine.trigger_words import (
    trigger_mode_choices,
    trigger_mode_label,
    trigger_mode_limit,
)


@dataclass(frozen=True)
class SettingsControls:
    """The controls a page load fills with the current values."""

    trigger_words: gr.Dropdown
    save_outputs: gr.Checkbox
    lora_fuse: gr.Checkbox
    live_preview_every: gr.Number

    @property
    def all(self) -> list[Any]:
        return [self.trigger_words, self.save_outputs, self.lora_fuse, self.live_preview_every]


def current_values(engine: Engine) -> tuple[Any, bool, bool, int]:
    """The controls' values as the engine holds them now (another page may have changed them)."""
    s = engine.settings
    limit = s.auto_trigger_words
    mode = gr.update(choices=trigger_mode_choices(limit), value=trigger_mode_label(limit))
    return mode, s.save_outputs, s.lora_fuse, s.live_preview_every


def folders_html(engine: Engine) -> str:
    s = engine.settings
    saved = engine.settings_file.path if engine.settings_file else None
    rows = [
        ("Settings file", str(saved) if saved else "none (nothing is saved)"),
        ("Images", str(s.outputs_dir)),
        ("Checkpoints", str(s.models_dir)),
        ("LoRAs", str(s.loras_dir)),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='lw-tool-result' id='settings-folders'>{body}</table>"


def apply_settings(
    engine: Engine, mode: str, save_outputs: bool, lora_fuse: bool, preview_every: float = 0
) -> str:
    """Change the server-wide options and save them; one status line."""
    try:
        every = int(preview_every or 0)
        if every < 0 or every != (preview_every or 0):
            raise ValueError(f"live preview every N steps: {preview_every} is not a whole N >= 0")
        engine.update_options(
            auto_trigger_words=trigger_mode_limit(mode),
            save_outputs=bool(save_outputs),
            lora_fuse=bool(lora_fuse),
            live_preview_every=every,
        )
    except (ValueError, OSError) as exc:
        return f"<div class='lw-warnings'>Not saved: {html.escape(str(exc))}</div>"
    where = engine.settings_file.path if engine.settings_file else None
    note = f" and saved to <code>{html.escape(str(where))}</code>" if where else ""
    return f"<div class='lw-status'>Applied{note}.</div>"


def build_settings_tab(engine: Engine) -> SettingsControls:
    """Lay out the tab inside the current Blocks context and wire Apply."""
    gr.Markdown(
        "Server-wide options: every new page starts from them, and API calls use them. "
        "A page's own choices (txt2img) apply to that page only."
    )
    limit = engine.settings.auto_trigger_words
    trigger_words = gr.Dropdown(
        trigger_mode_choices(limit),
        value=trigger_mode_label(limit),
        label="Auto-apply trigger words",
        info="the trained words of each LoRA in the prompt, added to the text the model reads",
        elem_id="settings-trigger-words",
    )
    keep = gr.Checkbox(
        value=engine.settings.save_outputs,
        label="Save every image to the images folder",
        info="with its parameters in the PNG, as A1111 names them",
        elem_id="settings-save-outputs",
    )
    fuse = gr.Checkbox(
        value=engine.settings.lora_fuse,
        label="Fuse diffusers-fallback LoRAs into the weights",
        info="faster steps when no native LoRA is applied",
        elem_id="settings-lora-fuse",
    )
    preview = gr.Number(
        value=engine.settings.live_preview_every,
        precision=0,
        minimum=0,
        label="Live preview every N steps",
        info="a cheap preview of the image while it is sampled, shown above the gallery (0: off)",
        elem_id="settings-live-preview-every",
    )
    apply = gr.Button("Apply settings", variant="primary", elem_id="settings-apply")
    status = gr.HTML(elem_id="settings-status")
    gr.HTML(folders_html(engine))
    controls = SettingsControls(trigger_words, keep, fuse, preview)
    apply.click(
        lambda *values: apply_settings(engine, *values),
        inputs=controls.all,
        outputs=status,
        queue=False,
    )
    return controls
