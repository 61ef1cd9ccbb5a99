"""The PNG Info tab: drop an image, read back the parameters it was made with."""

from __future__ import annotations

import gradio as gr
from PIL import Image

from webui.engine.infotext import parse_infotext, read_image_parameters


def describe_image(image: Image.Image | None) -> tuple[str, list[list[str]]]:
    """The raw parameters text and a (field, value) table, or a note when there are none."""
    if image is None:
        return "", []
    text = read_image_parameters(image)
    if text is None:
        return "This image carries no generation parameters.", []
    parsed = parse_infotext(text)
    rows = [["Prompt", parsed.prompt], ["Negative prompt", parsed.negative_prompt]]
    rows += [[key, value] for key, value in parsed.params.items()]
    return text, rows


def build_png_info_tab() -> None:
    """Lay out the tab inside the current Blocks context."""
    with gr.Row():
        with gr.Column():
            image = gr.Image(
                label="Image", type="pil", sources=["upload", "clipboard"], elem_id="png-info-image"
            )
        with gr.Column():
            raw = gr.Textbox(label="Parameters", lines=6, buttons=["copy"], elem_id="png-info-text")
            table = gr.Dataframe(
                headers=["Field", "Value"], label="Fields", interactive=False, wrap=True
            )
    image.change(describe_image, inputs=image, outputs=[raw, table])
