"""txt2img's controls follow the loaded model, in a real browser (Playwright + the system
Chromium): a FLUX.1 dev file picked in the model picker shows the Distilled CFG Scale slider,
FLUX's CFG 1 and the negative prompt marked unused, and its generation's infotext carries
`Distilled CFG Scale`; back on an SD model the slider hides and SD's values return.
Screenshots go to `UI_FAMILY_SCREENSHOT_DIR` (under /tmp) when set."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.app_server import running_app
from tests.chromium import CHROMIUM, app_page, set_number
from tests.test_ui_browser import choose, picker_value
from webui.arch import Arch, FluxVariant

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")
SHOTS = os.environ.get("UI_FAMILY_SCREENSHOT_DIR")


def write_flux_dev(path: Path) -> None:
    """A tiny FLUX.1 dev all-in-one file, with its component configs embedded."""
    from webui.engine.checkpoints import ModelKind, save_single_file
    from webui.engine.model_factory import ModelSpec, build_pipeline

    pipe = build_pipeline(ModelSpec(Arch.FLUX1, variant=FluxVariant.DEV), seed=3)
    kind = ModelKind(Arch.FLUX1, None, variant=FluxVariant.DEV)
    save_single_file(pipe, kind, path, embed_configs=True, with_parts=True)


def write_sd_and_flux_folders(tmp: Path, tiny_checkpoint_factory) -> None:
    """`models/` with a tiny SD1 file (`a-sd1`, the default) and a FLUX.1 dev one, `loras/` empty."""
    models = tmp / "models"
    models.mkdir()
    (tmp / "loras").mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "a-sd1.safetensors")
    write_flux_dev(models / "flux1-dev.safetensors")


def slider_value(page, elem: str) -> str:
    return page.locator(f"#{elem} input[type='number']").input_value()


def test_controls_follow_the_model_family(
    tmp_path: Path, tiny_checkpoint_factory, chromium
) -> None:
    from playwright.sync_api import expect

    write_sd_and_flux_folders(tmp_path, tiny_checkpoint_factory)
    with (
        running_app(tmp_path) as url,
        app_page(
            chromium,
            url,
            timeout_s=120,  # model loads on a shared 2-core machine
            ready="a-sd1",
            viewport={"width": 1400, "height": 1200},
        ) as page,
    ):
        page.reload()  # the page that loads after the model: SD's controls
        distilled = page.locator("#txt2img-distilled-cfg")
        expect(page.locator("#txt2img-cfg input[type='number']")).to_have_value("7")
        expect(distilled).to_be_hidden()

        choose(page, "model-select", "flux1-dev")
        expect(page.locator("#model-status")).to_contain_text("FLUX")
        expect(distilled).to_be_visible()
        expect(distilled.locator("input[type='number']")).to_have_value("3.5")
        expect(page.locator("#txt2img-cfg input[type='number']")).to_have_value("1")
        # the hires pass's CFG too: 7 there would run true CFG on FLUX's second pass
        page.locator("#txt2img-hires").get_by_text("Hires. fix").first.click()  # renders it
        expect(page.locator("#txt2img-hr-cfg input[type='number']")).to_have_value("1")
        expect(page.locator("#txt2img-sampler input")).to_have_value("Euler")
        expect(page.locator("#txt2img-negative")).to_contain_text("unused at CFG scale 1")
        assert picker_value(page) == "flux1-dev"
        expect(page.locator("#txt2img-clip-skip")).to_be_hidden()
        expect(page.locator("#txt2img-lora-backend")).to_be_visible()  # the fallback runs FLUX
        expect(page.locator("#txt2img-hires")).to_be_visible()  # FLUX runs hires too
        # FLUX's prompts go to T5: the counters count its tokens (the end token: 1 of 512),
        # also on a page opened while FLUX is loaded (built before, when SD was)
        expect(page.locator("#txt2img-token-counter")).to_contain_text("1/512")
        page.reload()
        expect(page.locator("#txt2img-negative-token-counter")).to_contain_text("1/512")
        expect(page.locator("#txt2img-prompt")).to_contain_text("T5 reads 512 tokens")

        page.locator("#txt2img-prompt textarea").fill("a fox")
        for name, value in (("steps", "2"), ("width", "64"), ("height", "64")):
            set_number(page, f"txt2img-{name}", value)
        set_number(page, "txt2img-distilled-cfg", "4.5")
        page.locator("#txt2img-generate").click()
        infotext = page.locator("#txt2img-infotext .lw-infotext")
        expect(infotext).to_contain_text("Distilled CFG Scale: 4.5")
        expect(infotext).to_contain_text("Sampler: Euler,")
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=f"{SHOTS}/txt2img-flux-dev.png", full_page=True)

        # a CFG above 1 makes the negative prompt count: the mark goes
        set_number(page, "txt2img-cfg", "2")
        expect(page.locator("#txt2img-negative")).not_to_contain_text("unused")

        choose(page, "model-select", "a-sd1")
        expect(page.locator("#model-status")).to_contain_text("SD1")
        expect(distilled).to_be_hidden()
        expect(page.locator("#txt2img-cfg input[type='number']")).to_have_value("7")
        expect(page.locator("#txt2img-sampler input")).to_have_value("Euler a")
        expect(page.locator("#txt2img-clip-skip")).to_be_visible()
        expect(page.locator("#txt2img-lora-backend")).to_be_visible()
        expect(page.locator("#txt2img-hires")).to_be_visible()
        if SHOTS:
            page.screenshot(path=f"{SHOTS}/txt2img-sd1.png", full_page=True)
