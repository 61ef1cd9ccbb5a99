"""Every control of the txt2img tab explains itself: inputs carry `info=` (shown under the
label), buttons a title set by elem_id (Gradio buttons take no `info`)."""

from __future__ import annotations

import gradio as gr
import pytest

from webui.engine.generate import Engine
from webui.settings import Settings
from webui.ui.blocks import build_ui
from webui.ui.txt2img import BUTTON_TITLES


def _tab_components(ui: gr.Blocks, tab_id: str) -> list[gr.components.Component]:
    tab = next(b for b in ui.blocks.values() if isinstance(b, gr.Tab) and b.id == tab_id)
    found: list[gr.components.Component] = []

    def walk(block) -> None:
        for child in getattr(block, "children", []):
            found.append(child)
            walk(child)

    walk(tab)
    return found


@pytest.fixture(scope="module")
def txt2img(tmp_path_factory) -> list[gr.components.Component]:
    tmp = tmp_path_factory.mktemp("ui")
    engine = Engine(
        Settings(models_dir=tmp, loras_dir=tmp, embeddings_dir=tmp, cache_dir=tmp, outputs_dir=tmp)
    )
    return _tab_components(build_ui(engine), "txt2img")


def test_every_input_has_info(txt2img) -> None:
    inputs = [c for c in txt2img if isinstance(c, gr.components.FormComponent)]
    assert len(inputs) >= 14  # prompt, negative, 11 parameters, the panel's search and filter
    missing = [c.label or c.elem_id for c in inputs if not getattr(c, "info", None)]
    assert missing == []


def test_every_button_has_a_title(txt2img) -> None:
    buttons = [c for c in txt2img if isinstance(c, gr.Button)]
    assert buttons
    untitled = [b.value for b in buttons if b.elem_id not in BUTTON_TITLES]
    assert untitled == []


def test_the_gallery_is_an_output(txt2img) -> None:
    """An empty gallery shows no "Drop Media Here / Click to Upload": it only shows results."""
    (gallery,) = [c for c in txt2img if isinstance(c, gr.Gallery)]
    assert gallery.interactive is False
