"""txt2img's generation controls follow the loaded model's family: `family_updates` is the one
place that turns the engine's `GenerationControls` into Gradio updates (on page load, after a
model switch, after a generation)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from webui.engine.generation_controls import GenerationControls
from webui.engine.request import DEFAULT_DISTILLED_CFG
from webui.engine.token_count import PromptEncoder
from webui.ui.paste_params import SAME_SAMPLER

SAMPLER_INFO = "A1111's sampler names; Karras/exponential variants change the noise schedule"
FLOW_SAMPLER_INFO = "flow matching: this model family takes Euler only"
CFG_INFO = "how closely the image follows the prompt; 1 or less turns guidance off"
TRUE_CFG_INFO = "above 1: real CFG with the negative prompt, twice as slow"
DISTILLED_CFG_INFO = "FLUX.1 [dev]'s guidance input: how closely the image follows the prompt"
HIRES_CFG_INFO = "the second pass's CFG"
HIRES_TRUE_CFG_INFO = "the second pass's; above 1: real CFG with the negative prompt, twice as slow"
NEGATIVE_LABEL = "Negative prompt"
NEGATIVE_INFO = "what the image should not show (LoRA tags here are ignored)"
NEGATIVE_UNUSED_LABEL = "Negative prompt (unused at CFG scale 1)"
NEGATIVE_UNUSED_INFO = "this model uses it only with CFG scale above 1 (true CFG, twice as slow)"
UNUSED_CLASS = "lw-unused"
_PROMPT_KEYS = (
    "<lora:NAME:WEIGHT> applies a LoRA; Ctrl+Enter generates, Ctrl+Up/Down changes a weight"
)
PROMPT_INFO = {
    PromptEncoder.CLIP: f"(word:1.2) emphasis, BREAK starts a new {PromptEncoder.CLIP.chunk}"
    f"-token chunk, {_PROMPT_KEYS}",
    # flux_encoding: weights on T5's tokens, BREAK a new T5 sequence (Forge's T5 engine)
    PromptEncoder.T5: f"(word:1.2) emphasis; T5 reads {PromptEncoder.T5.chunk} tokens, BREAK "
    f"starts another {PromptEncoder.T5.chunk}; {_PROMPT_KEYS}",
}


def width_info(step: int) -> str:
    return f"pixels, a multiple of {step}; best near the model's (SD1 512, SDXL and FLUX.1 1024)"


def height_info(step: int) -> str:
    return f"pixels, a multiple of {step}"


def negative_update(controls: GenerationControls, cfg: float) -> Any:
    """The negative prompt box, marked unused while the family ignores it at this CFG."""
    if controls.negative_needs_cfg and cfg <= 1:
        return gr.update(
            label=NEGATIVE_UNUSED_LABEL, info=NEGATIVE_UNUSED_INFO, elem_classes=[UNUSED_CLASS]
        )
    return gr.update(label=NEGATIVE_LABEL, info=NEGATIVE_INFO, elem_classes=[])


def family_updates(
    controls: GenerationControls,
    shown: GenerationControls | None,
    *,
    pasted_cfg: float | None = None,
) -> list[Any]:
    """Updates for (sampler, steps, width, height, cfg, distilled cfg, clip skip, the LoRA
    backend's row, the trigger words' row, the hires-fix accordion, its cfg, sampler and
    distilled cfg, negative prompt, prompt, shown): the controls that apply to `controls`' family
    shown, the others hidden. Values go back to the family's defaults only when the page showed
    other controls (`shown`), so a switch between two SD models keeps the user's settings, and
    never after a paste (`pasted_cfg` given: the page holds the infotext's values, CFG
    `pasted_cfg` among them, and a switch the paste asked for must not overwrite them).

    Otherwise the negative prompt's label changes here only with the family, from the CFG this
    update sets. The page's CFG is no input then: what the browser sent when the event fired
    can be stale by the time it returns (a page load answered during a model switch sets it),
    and a label from it would contradict the CFG shown. Between family changes, txt2img's CFG
    change event keeps the label in step."""
    reset = controls != shown and pasted_cfg is None
    defaults = controls.defaults

    def value(default: Any) -> dict[str, Any]:
        return {"value": default} if reset else {}

    step = controls.size_step
    return [
        gr.update(
            choices=list(controls.samplers),
            info=SAMPLER_INFO if len(controls.samplers) > 1 else FLOW_SAMPLER_INFO,
            **value(defaults.sampler),
        ),
        gr.update(**value(defaults.steps)),
        gr.update(step=step, info=width_info(step)),
        gr.update(step=step, info=height_info(step)),
        gr.update(
            info=TRUE_CFG_INFO if controls.negative_needs_cfg else CFG_INFO,
            **value(defaults.cfg_scale),
        ),
        gr.update(visible=controls.distilled_cfg, **value(DEFAULT_DISTILLED_CFG)),
        gr.update(visible=controls.clip_skip),
        gr.update(visible=controls.loras),
        gr.update(visible=controls.trigger_words),
        gr.update(visible=controls.hires),
        # the second pass's CFG and sampler: the family's too (Forge's FLUX preset sets both)
        gr.update(
            info=HIRES_TRUE_CFG_INFO if controls.negative_needs_cfg else HIRES_CFG_INFO,
            **value(defaults.cfg_scale),
        ),
        gr.update(choices=[SAME_SAMPLER, *controls.samplers], **value(SAME_SAMPLER)),
        gr.update(visible=controls.distilled_cfg, **value(DEFAULT_DISTILLED_CFG)),
        _negative(controls, defaults.cfg_scale if reset else pasted_cfg),
        gr.update(info=PROMPT_INFO[controls.prompt_encoder]),
        controls,
    ]


def _negative(controls: GenerationControls, cfg: float | None) -> Any:
    """The negative prompt's label for the CFG the page shows after the update (None: unknown
    here, the label stays)."""
    return gr.update() if cfg is None else negative_update(controls, cfg)
