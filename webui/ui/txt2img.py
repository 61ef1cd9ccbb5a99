"""The txt2img tab: prompt, parameters, Generate/Interrupt, gallery, infotext and warnings.

Everything here is the page's own state, sent with each request (the trigger-word mode
included); server-wide options live in the Settings tab."""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from webui.engine.generate import (
    Engine,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    Progress,
)
from webui.engine.jobs import JobQueue
from webui.engine.lora_backends import LoraRoute
from webui.engine.request import DEFAULT_DISTILLED_CFG
from webui.engine.samplers import DEFAULT_SAMPLER, sampler_names
from webui.engine.token_count import PromptEncoder, TokenCount
from webui.engine.trigger_words import (
    trigger_mode_choices,
    trigger_mode_label,
    trigger_mode_limit,
)
from webui.settings import LoraBackend
from webui.ui.family_controls import (
    CFG_INFO,
    DISTILLED_CFG_INFO,
    NEGATIVE_INFO,
    NEGATIVE_LABEL,
    PROMPT_INFO,
    SAMPLER_INFO,
    family_updates,
    height_info,
    negative_update,
    width_info,
)
from webui.ui.gallery_actions import COPY_PARAMETERS_JS, run_items, save_selected, selected_item
from webui.ui.generation_stream import Done, stream_previews
from webui.ui.messages import user_message, warnings_html
from webui.ui.networks_panel import build_networks_panel
from webui.ui.txt2img_options import build_hires_controls, build_seed_controls, hires_fix
from webui.ui.xyz_panel import RunShape, build_xyz_panel

log = logging.getLogger(__name__)

# Buttons take no `info=`: their tooltips are `title`s set by `BUTTON_TITLES_JS`, by elem_id.
BUTTON_TITLES: dict[str, str] = {
    "txt2img-generate": "Generate images (Ctrl+Enter in a prompt box)",
    "txt2img-interrupt": "Stop after the current step; finished images are kept (Esc)",
    "txt2img-random-seed": "Set the seed to -1: a new random seed each time",
    "txt2img-reuse-seed": "Reuse the seed of the selected image (of the last run)",
    "txt2img-random-subseed": "Set the variation seed to -1: a new random one each time",
    "txt2img-reuse-subseed": "Reuse the variation seed of the selected image",
    "txt2img-paste": "Read generation parameters from the prompt box (a pasted infotext), "
    "or from the last image when it is empty",
    "txt2img-send-to-txt2img": "Fill every field from the selected image's parameters",
    "txt2img-networks-refresh": "Read loras/ again (new, changed and removed files)",
    "txt2img-save": "Save the selected image to outputs/ (when auto-save is off)",
    "txt2img-send-to-png-info": "Open the selected image in the PNG Info tab",
    "txt2img-copy-parameters": "Copy the selected image's parameters to the clipboard",
    "txt2img-xyz-run": "Render every cell of the X/Y/Z plot; the grid comes first in the gallery",
}
BUTTON_TITLES_JS = (
    "() => { const titles = "
    + json.dumps(BUTTON_TITLES)
    + "; const put = () => { for (const [id, t] of Object.entries(titles)) {"
    " const el = document.getElementById(id); if (el && el.title !== t) el.title = t; } };"
    " put(); new MutationObserver(put).observe(document.body, {childList: true, subtree: true}); }"
)


@dataclass(frozen=True)
class Txt2ImgControls:
    """The components other tabs need to reach (the Networks tab writes into the prompt)."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    gallery: gr.Gallery
    trigger_words: gr.Dropdown  # per page; a new page starts from the server-wide setting
    family: list[Any]  # the outputs of `family_updates`, the shown-controls State last
    cfg: gr.Slider
    send_to_png_info: gr.Button
    gallery_state: list[Any]  # (the run's GalleryItems, the selected index)
    # Send to txt2img: the buttons that paste, the controls in `paste_params.PASTE_FIELDS` order
    paste: gr.Button  # ↙️: read the prompt box's infotext
    send_to_txt2img: gr.Button
    paste_targets: list[Any]
    warnings: gr.HTML

    @property
    def shown_family(self) -> Any:
        """The State holding the `GenerationControls` the page shows: `family_updates`' input."""
        return self.family[-1]


def trigger_words_update(engine: Engine) -> Any:
    """The trigger-word control of a new page: the server-wide mode (what API calls get)."""
    limit = engine.settings.auto_trigger_words
    return gr.update(choices=trigger_mode_choices(limit), value=trigger_mode_label(limit))


def infotext_panels(result: GenerationResult, grid: GeneratedImage | None = None) -> list[str]:
    """One infotext panel per gallery item (shown for the item selected): the grid's first when
    there is one, then each image's parameters, the run's time, where it was saved, and the
    LoRA backends."""
    note = " <b>(interrupted)</b>" if result.interrupted else ""
    timing = f"{len(result.images)} image(s) in {result.seconds:.1f} s{note}"
    panels = []
    for image in [grid, *result.images] if grid else result.images:
        text = html.escape(image.infotext.format())
        saved = f" · saved to <code>{html.escape(str(image.path))}</code>" if image.path else ""
        panels.append(
            f"<pre class='lw-infotext'>{text}</pre><div class='lw-timing'>{timing}{saved}</div>"
            f"{_backends_html(result)}"
        )
    return panels


def gallery_items(
    result: GenerationResult, grid: GeneratedImage | None = None
) -> list[tuple[Any, str]]:
    """(image or saved path, caption) for the gallery: `Grid: ...` first, as in A1111."""
    items = [
        (str(img.path) if img.path else img.image, f"seed {img.seed}") for img in result.images
    ]
    if grid is not None:
        count = len(result.images)
        items.insert(0, (str(grid.path) if grid.path else grid.image, f"Grid: {count} images"))
    return items


COUNTER_NOTES = {
    PromptEncoder.CLIP: "CLIP tokens of this prompt (tags not counted) / room in its chunks of 75",
    PromptEncoder.T5: "T5 tokens of this prompt, its end token included (tags and emphasis "
    "syntax not counted) / the 512 T5 reads, per BREAK; past it the prompt is cut",
}


def token_counter_html(count: TokenCount) -> str:
    """A1111's counter: tokens used / the chunks' capacity; past 75 the prompt takes a second
    chunk of 75 (encoded apart, then concatenated). On FLUX.1 T5's tokens out of 512."""
    note = COUNTER_NOTES[count.encoder]
    extra = " lw-tokens-chunked" if count.chunks > 1 else ""
    return f"<span class='lw-tokens{extra}' title='{note}'>{count.format()}</span>"


def route_line(route: LoraRoute, warnings: Sequence[str] = ()) -> str:
    """One LoRA's line in the backends panel. The route's reason explains the backend choice,
    which is only true of a LoRA that was written; one that was not says so, with the first
    warning naming it (wrong base, refused family, failed apply) as the reason."""
    if route.applied:
        return f"{route.name}: applied by the {route.backend.value} backend ({route.reason})"
    names = (route.name, route.name.rsplit("/", 1)[-1])  # the tag's name, the file's stem
    why = next((w for w in warnings if w.startswith(tuple(f"{n}:" for n in names))), None)
    return f"{route.name}: not applied" + (f" ({why})" if why else "; see the warnings")


def _backends_html(result: GenerationResult) -> str:
    """Which backend took each LoRA, and why; a LoRA left out says why instead."""
    if not result.lora_routes:
        return ""
    items = "".join(
        f"<li>{html.escape(route_line(route, result.warnings))}</li>"
        for route in result.lora_routes
    )
    return f"<div class='lw-lora-backends'>LoRA backends:<ul>{items}</ul></div>"


def _run_generation(
    engine: Engine, request: GenerationRequest, progress: gr.Progress
) -> Iterator[tuple[Any, ...]]:
    """Generate in turn with API jobs (loading a model if needed), showing each live preview
    above the gallery, then shape the result for the gallery and panels."""
    keep = (gr.update(),) * 6

    def report(p: Progress) -> None:
        progress((p.step, p.total), desc=p.description, unit=p.unit)

    hidden = gr.update(value=None, visible=False)
    try:
        if engine.model is None:
            progress(0, desc="Loading model…")
        jobs = JobQueue.for_engine(engine)
        for event in stream_previews(lambda on: jobs.generate(request, on_progress=on), report):
            if isinstance(event, Done):
                result: GenerationResult = event.result
            else:
                yield (*keep, gr.update(value=event.image, visible=True))
    except Exception as exc:  # shown in the UI as one line; unexpected ones are logged in full
        yield (
            gr.update(),
            "",
            warnings_html([user_message(exc)]),
            [],
            gr.update(),
            gr.update(),
            hidden,
        )
        return
    grid = engine.save_grid(result)
    panels = infotext_panels(result, grid)
    gallery = gallery_items(result, grid)
    first = panels[0] if panels else ""
    yield gallery, first, warnings_html(result.warnings), panels, run_items(result, grid), 0, hidden


def build_txt2img_tab(engine: Engine) -> Txt2ImgControls:
    """Lay out the tab inside the current Blocks context and wire its events."""

    def counted(text: str | None = "") -> str:
        """The counter for `text`, with the loaded family's encoder (no text: a page's start)."""
        return token_counter_html(engine.count_tokens(text or ""))

    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            prompt = gr.Textbox(
                label="Prompt",
                lines=3,
                placeholder="a watercolor fox, <lora:name:0.8>",
                info=PROMPT_INFO[PromptEncoder.CLIP],  # `family_updates` sets the loaded family's
                elem_id="txt2img-prompt",
            )
            prompt_tokens = gr.HTML(
                counted,  # called at each page load: the loaded family's encoder
                elem_id="txt2img-token-counter",
                elem_classes="lw-token-counter",
            )
            build_networks_panel(engine, prompt)
            negative = gr.Textbox(
                label=NEGATIVE_LABEL,
                lines=2,
                info=NEGATIVE_INFO,
                elem_id="txt2img-negative",
            )
            negative_tokens = gr.HTML(
                counted,  # called at each page load: the loaded family's encoder
                elem_id="txt2img-negative-token-counter",
                elem_classes="lw-token-counter",
            )
        with gr.Column(scale=1, min_width=180):
            generate = gr.Button(
                "Generate", variant="primary", size="lg", elem_id="txt2img-generate"
            )
            interrupt = gr.Button("Interrupt", variant="stop", elem_id="txt2img-interrupt")
            with gr.Row():  # A1111's row of small tool buttons under Generate
                paste = gr.Button(
                    "\u2199\ufe0f", size="sm", scale=0, min_width=44, elem_id="txt2img-paste"
                )  # ↙️
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            sampler = gr.Dropdown(
                sampler_names(),
                value=DEFAULT_SAMPLER,
                label="Sampler",
                info=SAMPLER_INFO,
                elem_id="txt2img-sampler",
                # a pasted sampler the family lacks reaches the engine, which names it and
                # uses the family's own (Gradio would refuse the whole generation instead)
                allow_custom_value=True,
            )
            steps = gr.Slider(
                1,
                150,
                value=20,
                step=1,
                label="Steps",
                info="denoising steps: more is slower, rarely better past 30-40",
                elem_id="txt2img-steps",
            )
            with gr.Row():
                width = gr.Slider(
                    64,
                    2048,
                    value=512,
                    step=8,
                    label="Width",
                    info=width_info(8),
                    elem_id="txt2img-width",
                )
                height = gr.Slider(
                    64,
                    2048,
                    value=512,
                    step=8,
                    label="Height",
                    info=height_info(8),
                    elem_id="txt2img-height",
                )
            cfg = gr.Slider(
                0,
                30,
                value=7,
                step=0.5,
                label="CFG scale",
                info=CFG_INFO,
                elem_id="txt2img-cfg",
            )
            distilled_cfg = gr.Slider(
                0,
                30,
                value=DEFAULT_DISTILLED_CFG,
                step=0.1,
                label="Distilled CFG Scale",
                info=DISTILLED_CFG_INFO,
                visible=False,  # shown by `family_updates` for the families that take it
                elem_id="txt2img-distilled-cfg",
            )
            shown_family = gr.State(None)  # the GenerationControls this page shows
            seeds = build_seed_controls()
            seed = seeds.seed
            with gr.Row():
                batch_count = gr.Slider(
                    1,
                    100,
                    value=1,
                    step=1,
                    label="Batch count",
                    info="batches run one after another",
                    elem_id="txt2img-batch-count",
                )
                batch_size = gr.Slider(
                    1,
                    8,
                    value=1,
                    step=1,
                    label="Batch size",
                    info="images denoised together in one batch (more memory)",
                    elem_id="txt2img-batch-size",
                )
            clip_skip = gr.Slider(
                1,
                12,
                value=1,
                step=1,
                label="Clip skip",
                info="2 uses CLIP's second-to-last layer, as anime-style models expect",
                elem_id="txt2img-clip-skip",
            )
            with gr.Row() as lora_row:
                lora_backend = gr.Dropdown(
                    [c.value for c in LoraBackend],
                    value=engine.settings.lora_backend.value,
                    label="LoRA backend",
                    info="auto: native for every file it maps (in full or in part), diffusers for files native maps nothing of",
                    elem_id="txt2img-lora-backend",
                )
            # a row of its own: a family whose LoRAs take one backend only (FLUX.1) may hide the
            # backend choice, while trigger words still apply
            with gr.Row() as trigger_row:
                limit = engine.settings.auto_trigger_words
                trigger_words = gr.Dropdown(
                    trigger_mode_choices(limit),
                    value=trigger_mode_label(limit),
                    label="Auto-apply trigger words",
                    info="this page only; new pages and API calls use the Settings tab's",
                    elem_id="txt2img-trigger-words",
                )
            hires = build_hires_controls()
            xyz = build_xyz_panel(engine)
        with gr.Column(scale=3, min_width=360):
            # the engine's live preview while sampling (Settings: every N steps), then hidden
            preview = gr.Image(
                label="Preview",
                type="pil",
                interactive=False,
                visible=False,
                height=320,
                elem_id="txt2img-preview",
            )
            gallery = gr.Gallery(
                label="Images",
                columns=2,
                height=520,
                format="png",
                object_fit="contain",  # whole images, never cropped to the grid's squares
                interactive=False,  # an output: no "Drop Media Here / Click to Upload"
                elem_id="txt2img-gallery",
            )
            with gr.Row():
                save = gr.Button("Save", size="sm", elem_id="txt2img-save")
                send_to_png_info = gr.Button(
                    "Send to PNG Info", size="sm", elem_id="txt2img-send-to-png-info"
                )
                copy_parameters = gr.Button(
                    "Copy parameters", size="sm", elem_id="txt2img-copy-parameters"
                )
                send_to_txt2img = gr.Button(
                    "Send to txt2img", size="sm", elem_id="txt2img-send-to-txt2img"
                )
            gallery_note = gr.HTML(elem_id="txt2img-gallery-note")
            items = gr.State([])  # GalleryItems of the last run, in the gallery's order
            selected = gr.State(0)  # the gallery item selected
            warnings = gr.HTML(elem_id="txt2img-warnings")
            infotext = gr.HTML(elem_id="txt2img-infotext")
            panels = gr.State([])  # the infotext of each image of the last run

    def request_of(*values: Any) -> GenerationRequest:
        p, n, smp, st, w, h, c, dc, sd, bc, bs, cs, lb, tw, extra, sub, sub_s = values[:17]
        request = GenerationRequest(
            prompt=p,
            negative_prompt=n,
            sampler=smp,
            steps=int(st),
            width=int(w),
            height=int(h),
            cfg_scale=float(c),
            distilled_cfg_scale=float(dc),
            seed=int(sd if sd is not None else -1),
            batch_count=int(bc),
            batch_size=int(bs),
            clip_skip=int(cs),
            lora_backend=LoraBackend(lb) if lb else None,
            auto_trigger_words=trigger_mode_limit(tw) if tw else None,
            subseed=int(sub if extra and sub is not None else -1),
            subseed_strength=float(sub_s or 0) if extra else 0.0,
            hires=hires_fix(*values[17:], first_cfg=float(c), first_distilled_cfg=float(dc)),
        )
        return request

    def on_generate(
        *values: Any,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects it
    ) -> Iterator[tuple[Any, ...]]:
        yield from _run_generation(engine, request_of(*values), progress)

    inputs = [
        prompt,
        negative,
        sampler,
        steps,
        width,
        height,
        cfg,
        distilled_cfg,
        seed,
        batch_count,
        batch_size,
        clip_skip,
        lora_backend,
        trigger_words,
        *(seeds.extra, seeds.subseed, seeds.subseed_strength),
        *hires.values,
    ]
    outputs = [gallery, infotext, warnings, panels, items, selected, preview]
    xyz.wire(
        engine, request_of, inputs, outputs[:-1], gallery, RunShape(infotext_panels, gallery_items)
    )
    family = [
        *(sampler, steps, width, height, cfg, distilled_cfg, clip_skip, lora_row, trigger_row),
        *(hires.accordion, hires.cfg, hires.sampler, hires.distilled_cfg, negative, prompt),
        shown_family,
    ]

    def follow_family(shown: Any) -> list[Any]:
        return family_updates(engine.generation_controls(), shown)

    for trigger in (generate.click, prompt.submit):
        # a generation may have loaded the model, or an API call switched it: controls follow
        # one progress bar, on the gallery: Gradio draws one on every output by default
        generated = trigger(
            on_generate,
            inputs=inputs,
            outputs=outputs,
            concurrency_id="gpu",
            show_progress_on=gallery,
        )
        generated.then(follow_family, inputs=shown_family, outputs=family, show_progress="hidden")
    cfg.change(
        # the engine's family, not the page's State: a model switch sets both CFG and the State
        lambda value: negative_update(engine.generation_controls(), value),
        inputs=cfg,
        outputs=negative,
        queue=False,
        trigger_mode="always_last",
        show_progress="hidden",
    )
    interrupt.click(JobQueue.for_engine(engine).interrupt, queue=False)

    def reuse(run: Any, index: int | None, key: str) -> Any:
        item = selected_item(run, index) or selected_item(run, 0)
        value = item.generated.infotext.params.get(key) if item else None
        return int(value) if value else gr.update()

    seeds.reuse_seed.click(
        lambda run, i: reuse(run, i, "Seed"), [items, selected], seed, queue=False
    )
    seeds.reuse_subseed.click(
        lambda run, i: reuse(run, i, "Variation seed"), [items, selected], seeds.subseed,
        queue=False,
    )  # fmt: skip

    def on_select(texts: list[str], evt: gr.SelectData) -> tuple[Any, int]:
        index = evt.index if isinstance(evt.index, int) else 0
        return (texts[index] if 0 <= index < len(texts) else gr.update()), index

    for box, counter in ((prompt, prompt_tokens), (negative, negative_tokens)):
        # `.change` also sees the Networks panel's edits; always_last: one count per pause
        box.change(
            counted,
            inputs=box,
            outputs=counter,
            queue=False,
            trigger_mode="always_last",
            show_progress="hidden",
        )
        # another family may count another encoder's tokens (CLIP, T5): recount on a switch
        shown_family.change(
            counted, inputs=box, outputs=counter, queue=False, show_progress="hidden"
        )

    gallery.select(on_select, inputs=panels, outputs=[infotext, selected], queue=False)
    save.click(
        lambda run, index: save_selected(engine, run, index),
        inputs=[items, selected],
        outputs=[items, gallery_note],
        show_progress="hidden",
    )
    copy_parameters.click(None, js=COPY_PARAMETERS_JS)
    paste_targets = [
        *(prompt, negative, steps, sampler, cfg, distilled_cfg, seed, width, height, clip_skip),
        *(seeds.extra, seeds.subseed, seeds.subseed_strength, *hires.values),
    ]
    return Txt2ImgControls(
        prompt,
        negative,
        gallery,
        trigger_words,
        family,
        cfg,
        send_to_png_info,
        [items, selected],
        paste,
        send_to_txt2img,
        paste_targets,
        warnings,
    )
