"""txt2img's seed row (A1111's 🎲/♻️ and "Extra" variation seed) and hires-fix accordion: their
controls, and the request fields they make."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from webui.engine.hires import UPSCALER_NAMES, HiresFix
from webui.engine.request import DEFAULT_DISTILLED_CFG
from webui.engine.samplers import sampler_names
from webui.ui.family_controls import HIRES_CFG_INFO
from webui.ui.paste_params import SAME_SAMPLER

RANDOM = "\U0001f3b2\ufe0f"  # 🎲️
REUSE = "\u267b\ufe0f"  # ♻️


@dataclass(frozen=True)
class SeedControls:
    seed: gr.Number
    random_seed: gr.Button
    reuse_seed: gr.Button
    extra: gr.Checkbox
    subseed: gr.Number
    random_subseed: gr.Button
    reuse_subseed: gr.Button
    subseed_strength: gr.Slider


@dataclass(frozen=True)
class HiresControls:
    accordion: gr.Accordion
    enable: gr.Checkbox
    upscaler: gr.Dropdown
    scale: gr.Slider
    resize_x: gr.Slider
    resize_y: gr.Slider
    steps: gr.Slider
    denoising_strength: gr.Slider
    cfg: gr.Slider
    sampler: gr.Dropdown
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    distilled_cfg: gr.Slider  # shown by `family_updates` for the families that take it

    @property
    def values(self) -> list[Any]:
        """The controls `hires_fix` reads, in its argument order."""
        return [
            *(self.enable, self.upscaler, self.scale, self.resize_x, self.resize_y, self.steps),
            *(self.denoising_strength, self.cfg, self.sampler, self.prompt, self.negative_prompt),
            self.distilled_cfg,
        ]


def _seed_button(label: str, elem_id: str) -> gr.Button:
    return gr.Button(label, scale=0, min_width=40, size="sm", elem_id=elem_id)


def build_seed_controls() -> SeedControls:
    """Seed, 🎲 (-1), ♻️ (the last image's seed), and "Extra" revealing the variation seed."""
    with gr.Row():
        seed = gr.Number(
            value=-1,
            precision=0,
            label="Seed (-1 = random)",
            info="same seed and settings, same image; image n of a batch uses seed + n",
            elem_id="txt2img-seed",
        )
        random_seed = _seed_button(RANDOM, "txt2img-random-seed")
        reuse_seed = _seed_button(REUSE, "txt2img-reuse-seed")
        extra = gr.Checkbox(
            False,
            label="Extra",
            info="variation seed",
            scale=0,
            min_width=80,
            elem_id="txt2img-extra",
        )
    with gr.Row(visible=False) as variation_row:
        subseed = gr.Number(
            value=-1,
            precision=0,
            label="Variation seed",
            info="its noise is blended in by the strength (-1: random)",
            elem_id="txt2img-subseed",
        )
        random_subseed = _seed_button(RANDOM, "txt2img-random-subseed")
        reuse_subseed = _seed_button(REUSE, "txt2img-reuse-subseed")
        subseed_strength = gr.Slider(
            0,
            1,
            value=0,
            step=0.01,
            label="Variation strength",
            info="0: the seed's image; 1: the variation seed's",
            elem_id="txt2img-subseed-strength",
        )
    extra.change(lambda on: gr.update(visible=on), extra, variation_row, queue=False)
    random_seed.click(lambda: -1, outputs=seed, queue=False)
    random_subseed.click(lambda: -1, outputs=subseed, queue=False)
    return SeedControls(
        seed,
        random_seed,
        reuse_seed,
        extra,
        subseed,
        random_subseed,
        reuse_subseed,
        subseed_strength,
    )


def build_hires_controls() -> HiresControls:
    """A1111's hires-fix accordion: upscaler, scale or target size, steps, strength, and the
    second pass's own CFG, sampler and prompts."""
    with gr.Accordion("Hires. fix", open=False, elem_id="txt2img-hires") as accordion:
        enable = gr.Checkbox(
            False,
            label="Enable hires fix",
            info="upscale the image, then denoise it again (img2img) at the higher size",
            elem_id="txt2img-enable-hr",
        )
        with gr.Row():
            upscaler = gr.Dropdown(
                list(UPSCALER_NAMES),
                value="Latent",
                label="Upscaler",
                info="Latent: in latent space; Lanczos/Nearest: the decoded image",
                elem_id="txt2img-hr-upscaler",
            )
            steps = gr.Slider(
                0, 150, value=0, step=1, label="Hires steps", info="0: the first pass's",
                elem_id="txt2img-hr-steps",
            )  # fmt: skip
            strength = gr.Slider(
                0.01, 1, value=0.7, step=0.01, label="Denoising strength",
                info="how much the second pass changes",
                elem_id="txt2img-denoising-strength",
            )  # fmt: skip
        with gr.Row():
            scale = gr.Slider(
                1,
                4,
                value=2,
                step=0.05,
                label="Upscale by",
                info="times the first pass's size",
                elem_id="txt2img-hr-scale",
            )
            resize_x = gr.Slider(
                0, 2048, value=0, step=8, label="Resize width to", info="0: by the scale",
                elem_id="txt2img-hr-resize-x",
            )  # fmt: skip
            resize_y = gr.Slider(
                0, 2048, value=0, step=8, label="Resize height to", info="0: by the scale",
                elem_id="txt2img-hr-resize-y",
            )  # fmt: skip
        with gr.Row():
            cfg = gr.Slider(
                0,
                30,
                value=7,
                step=0.5,
                label="Hires CFG Scale",
                info=HIRES_CFG_INFO,
                elem_id="txt2img-hr-cfg",
            )
            sampler = gr.Dropdown(
                [SAME_SAMPLER, *sampler_names()],
                value=SAME_SAMPLER,
                label="Hires sampler",
                info="the second pass's sampler",
                elem_id="txt2img-hr-sampler",
                allow_custom_value=True,  # as txt2img's sampler: the engine names a foreign one
            )
            distilled_cfg = gr.Slider(
                0,
                30,
                value=DEFAULT_DISTILLED_CFG,
                step=0.1,
                label="Hires Distilled CFG Scale",
                info="the second pass's distilled CFG (FLUX.1 [dev]'s guidance input)",
                visible=False,  # shown by `family_updates` for the families that take it
                elem_id="txt2img-hr-distilled-cfg",
            )
        prompt = gr.Textbox(
            "", label="Hires prompt", lines=2, info="the second pass's prompt (LoRA tags too)", placeholder="empty: the prompt",
            elem_id="txt2img-hr-prompt",
        )  # fmt: skip
        negative = gr.Textbox(
            "", label="Hires negative prompt", lines=2, info="the second pass's negative prompt", placeholder="empty: the negative prompt",
            elem_id="txt2img-hr-negative",
        )  # fmt: skip
    return HiresControls(
        accordion, enable, upscaler, scale, resize_x, resize_y, steps, strength, cfg, sampler,
        prompt, negative, distilled_cfg,
    )  # fmt: skip


def hires_fix(
    enable: bool,
    upscaler: str,
    scale: float,
    resize_x: float,
    resize_y: float,
    steps: float,
    strength: float,
    cfg: float | None,
    sampler: str | None,
    prompt: str | None,
    negative: str | None,
    distilled_cfg: float | None = None,
    *,
    first_cfg: float,
    first_distilled_cfg: float | None = None,
) -> HiresFix | None:
    """The request's hires fix from the accordion's values (None while it is off). A hires CFG
    equal to the first pass's is left unset, so the infotext writes none, as A1111's does; so is
    a hires Distilled CFG Scale equal to the first pass's (the same value runs either way)."""
    if not enable:
        return None
    return HiresFix(
        scale=float(scale),
        resize_x=int(resize_x or 0),
        resize_y=int(resize_y or 0),
        upscaler=upscaler or "Latent",
        steps=int(steps or 0),
        denoising_strength=float(strength),
        prompt=prompt or "",
        negative_prompt=negative or "",
        sampler="" if not sampler or sampler == SAME_SAMPLER else sampler,
        cfg_scale=_unless_equal(cfg, first_cfg),
        distilled_cfg_scale=_unless_equal(distilled_cfg, first_distilled_cfg),
    )


def _unless_equal(value: float | None, first_pass: float | None) -> float | None:
    """A hires value, or None (the first pass's) when it is unset or the same."""
    if value is None or (first_pass is not None and float(value) == float(first_pass)):
        return None
    return float(value)
