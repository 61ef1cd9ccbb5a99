"""txt2img's controls follow the loaded family: `family_updates` maps the engine's controls of
SD1, FLUX.1 dev and FLUX.1 schnell to the Gradio updates the page needs (values hand-written
from A1111/Forge: SD 20 steps, CFG 7, Euler a; FLUX CFG 1, Euler, dev 3.5 distilled, schnell 4
steps; sizes in 8s and 16s)."""

from __future__ import annotations

import gradio as gr
import pytest

from webui.arch import Arch, FluxVariant, Prediction
from webui.engine.checkpoints import ModelKind
from webui.engine.generation_controls import controls_for
from webui.ui.family_controls import (
    NEGATIVE_LABEL,
    NEGATIVE_UNUSED_LABEL,
    TRUE_CFG_INFO,
    family_updates,
    negative_update,
)

SD1 = ModelKind(Arch.SD1, Prediction.EPSILON)
SDXL = ModelKind(Arch.SDXL, Prediction.EPSILON)
DEV = ModelKind(Arch.FLUX1, None, variant=FluxVariant.DEV)
SCHNELL = ModelKind(Arch.FLUX1, None, variant=FluxVariant.SCHNELL)
NAMES = (
    *("sampler", "steps", "width", "height", "cfg", "distilled", "clip_skip", "lora_row"),
    *("trigger_row", "hires", "hr_cfg", "hr_sampler", "hr_distilled", "negative", "prompt"),
    "shown",
)


def updates(kind: ModelKind, shown=None) -> dict:
    return dict(zip(NAMES, family_updates(controls_for(kind), shown), strict=True))


@pytest.mark.parametrize(
    ("kind", "sampler", "steps", "cfg", "size_step", "distilled", "negative_label"),
    [
        (SD1, "Euler a", 20, 7.0, 8, False, NEGATIVE_LABEL),
        (DEV, "Euler", 20, 1.0, 16, True, NEGATIVE_UNUSED_LABEL),
        (SCHNELL, "Euler", 4, 1.0, 16, False, NEGATIVE_UNUSED_LABEL),
    ],
)
def test_a_new_page_shows_the_family_defaults(
    kind, sampler, steps, cfg, size_step, distilled, negative_label
) -> None:
    u = updates(kind)
    assert u["sampler"]["value"] == sampler
    assert sampler in u["sampler"]["choices"]
    assert u["steps"]["value"] == steps
    assert u["cfg"]["value"] == cfg
    assert u["width"]["step"] == u["height"]["step"] == size_step
    assert u["distilled"]["visible"] is distilled
    assert u["distilled"]["value"] == 3.5
    # the hires pass's CFG starts where the first pass's does (Forge's FLUX preset: 1 for both):
    # 7 there would run FLUX's second pass with true CFG, twice as slow, unasked
    assert u["hr_cfg"]["value"] == cfg
    assert u["hr_sampler"]["value"] == "Use same sampler"
    assert u["hr_distilled"]["visible"] is distilled  # the hires pass's, beside the first's
    assert u["hr_distilled"]["value"] == 3.5
    assert u["negative"]["label"] == negative_label
    # FLUX.1 has no clip skip (hidden); its LoRAs have both backends, so their row shows
    assert u["clip_skip"]["visible"] is (kind is SD1)
    assert u["lora_row"]["visible"] is True
    assert u["hires"]["visible"] is True  # every family runs the hires fix
    assert u["trigger_row"]["visible"] is True  # FLUX.1 LoRAs apply: their trigger words too
    assert u["shown"] == controls_for(kind)


def test_sd_keeps_every_sampler_and_flux_offers_only_euler() -> None:
    assert len(updates(SD1)["sampler"]["choices"]) > 10
    assert "DPM++ 2M Karras" in updates(SD1)["sampler"]["choices"]
    assert updates(DEV)["sampler"]["choices"] == ["Euler"]
    assert updates(DEV)["hr_sampler"]["choices"] == ["Use same sampler", "Euler"]
    assert "DPM++ 2M Karras" in updates(SD1)["hr_sampler"]["choices"]
    assert updates(DEV)["cfg"]["info"] == TRUE_CFG_INFO


def test_switching_between_sd_models_keeps_the_users_values() -> None:
    u = updates(SDXL, shown=controls_for(SD1))
    kept = ("sampler", "steps", "cfg", "distilled", "hr_cfg", "hr_sampler", "hr_distilled")
    assert all("value" not in u[name] for name in kept)


def test_the_negative_label_changes_only_with_the_family() -> None:
    """A page that already shows the family keeps its label: the CFG change event owns it
    there (a label from the CFG the event was fired with could contradict the CFG shown)."""
    dev = controls_for(DEV)
    assert updates(DEV, shown=dev)["negative"] == gr.update()
    assert updates(SDXL, shown=controls_for(SD1))["negative"] == gr.update()
    # a switch sets CFG and the label together: FLUX's 1 (unused), back on SD its 7 (used)
    assert updates(DEV, shown=controls_for(SD1))["negative"]["label"] == NEGATIVE_UNUSED_LABEL
    back = updates(SD1, shown=dev)
    assert (back["cfg"]["value"], back["negative"]["label"]) == (7.0, NEGATIVE_LABEL)


def test_flux_negative_prompt_counts_above_cfg_1() -> None:
    dev = controls_for(DEV)
    assert negative_update(dev, 1.0)["label"] == NEGATIVE_UNUSED_LABEL
    assert negative_update(dev, 2.0)["label"] == NEGATIVE_LABEL
    assert negative_update(controls_for(SD1), 1.0)["label"] == NEGATIVE_LABEL


def test_a_paste_that_switches_family_keeps_the_pasted_values() -> None:
    """Send to txt2img with an SD image's parameters while FLUX.1 is loaded: the paste set the
    infotext's sampler, steps and CFG, then the switch to its checkpoint must not put SD's
    defaults over them (A1111 and Forge keep the pasted values); controls and labels follow."""
    pasted = dict(
        zip(
            NAMES, family_updates(controls_for(SD1), controls_for(DEV), pasted_cfg=5.0), strict=True
        )
    )
    kept = ("sampler", "steps", "cfg", "distilled", "hr_cfg", "hr_sampler", "hr_distilled")
    assert all("value" not in pasted[name] for name in kept)
    assert "DPM++ 2M Karras" in pasted["sampler"]["choices"]  # SD's list, for the pasted value
    assert pasted["clip_skip"]["visible"] is True
    assert pasted["negative"]["label"] == NEGATIVE_LABEL
    # a FLUX image's parameters pasted on an SD page: its CFG 1 marks the negative unused
    to_flux = family_updates(controls_for(DEV), controls_for(SD1), pasted_cfg=1.0)
    assert dict(zip(NAMES, to_flux, strict=True))["negative"]["label"] == NEGATIVE_UNUSED_LABEL
