"""The PNG Info tab: drop an image, read back the parameters it was made with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image, UnidentifiedImageError

from webui.engine.infotext import (
    ImageTooLargeError,
    open_image,
    parse_infotext,
    read_image_parameters,
)
from webui.settings import LIMITS


def describe_image(
    image: Image.Image | str | Path | None, max_pixels: int = LIMITS.max_image_pixels
) -> tuple[str, list[list[str]]]:
    """The raw parameters text and a (field, value) table, or a note when there are none. A
    path is opened here, so that an image over `max_pixels` is refused before it is decoded."""
    if image is None:
        return "", []
    if not isinstance(image, Image.Image):
        try:
            image = open_image(Path(image), max_pixels)
        except ImageTooLargeError as exc:
            return f"{exc}.", []
        except (UnidentifiedImageError, OSError) as exc:
            return f"not an image: {exc}", []
    text = read_image_parameters(image)
    if text is None:
        return "This image carries no generation parameters.", []
    parsed = parse_infotext(text)
    rows = [["Prompt", parsed.prompt], ["Negative prompt", parsed.negative_prompt]]
    rows += [[key, value] for key, value in parsed.params.items()]
    return text, rows


@dataclass(frozen=True)
class PngInfoControls:
    """What txt2img's Send to PNG Info fills: the image and the two views of its text."""

    image: gr.Image
    raw: gr.Textbox
    table: gr.Dataframe
    send_to_txt2img: gr.Button


def build_png_info_tab() -> PngInfoControls:
    """Lay out the tab inside the current Blocks context."""
    with gr.Row():
        with gr.Column():
            # a path, not a PIL image: gradio would decode every pixel before we see the size
            image = gr.Image(
                label="Image",
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                elem_id="png-info-image",
            )
        with gr.Column():
            raw = gr.Textbox(label="Parameters", lines=6, buttons=["copy"], elem_id="png-info-text")
            table = gr.Dataframe(
                headers=["Field", "Value"], label="Fields", interactive=False, wrap=True
            )
            send = gr.Button("Send to txt2img", elem_id="png-info-send-to-txt2img")
    image.change(describe_image, inputs=image, outputs=[raw, table])
    return PngInfoControls(image, raw, table, send)
