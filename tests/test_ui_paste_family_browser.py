"""Pasting an infotext whose checkpoint is of another family (headless Chromium): the paste picks
that checkpoint, and the switch it causes keeps the infotext's values instead of putting the new
family's defaults over them, as A1111 and Forge keep them. Here: an SD1 image's parameters
pasted (↙️) while a FLUX.1 dev model is loaded, then a FLUX image's pasted back on SD."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app_server import running_app
from tests.chromium import CHROMIUM, app_page
from tests.test_ui_browser import choose
from tests.test_ui_family_browser import slider_value, write_sd_and_flux_folders

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")

SD_INFOTEXT = (
    "a red fox\nNegative prompt: blurry\nSteps: 27, Sampler: DPM++ 2M Karras, CFG scale: 5.5, "
    "Seed: 7, Size: 512x512, Model: a-sd1"
)
# an SD image whose checkpoint this app lacks, pasted on FLUX.1: the model stays, so does the
# pasted SD sampler, which FLUX.1 replaces with Euler, saying so
FOREIGN_SD_INFOTEXT = (
    "a green fox\nSteps: 2, Sampler: DPM++ 2M Karras, CFG scale: 1, Seed: 9, Size: 64x64, "
    "Model: not-here"
)
FLUX_INFOTEXT = (
    "a blue fox\nSteps: 13, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 4.5, Seed: 8, "
    "Size: 512x512, Model: flux1-dev"
)


def test_a_paste_that_switches_family_keeps_its_values(
    tmp_path: Path, tiny_checkpoint_factory, chromium
) -> None:
    from playwright.sync_api import expect

    write_sd_and_flux_folders(tmp_path, tiny_checkpoint_factory)
    with (
        running_app(tmp_path) as url,
        # model loads on a shared 2-core machine
        app_page(chromium, url, timeout_s=120, ready="a-sd1") as page,
    ):
        choose(page, "model-select", "flux1-dev")
        expect(page.locator("#model-status")).to_contain_text("FLUX")
        expect(page.locator("#txt2img-cfg input[type='number']")).to_have_value("1")

        page.locator("#txt2img-prompt textarea").fill(SD_INFOTEXT)
        page.locator("#txt2img-paste").click()
        expect(page.locator("#model-status")).to_contain_text("SD1")
        expect(page.locator("#txt2img-clip-skip")).to_be_visible()  # SD's controls shown
        expect(page.locator("#txt2img-sampler input")).to_have_value("DPM++ 2M Karras")
        expect(page.locator("#txt2img-steps input[type='number']")).to_have_value("27")
        expect(page.locator("#txt2img-cfg input[type='number']")).to_have_value("5.5")
        expect(page.locator("#txt2img-negative")).not_to_contain_text("unused")

        page.locator("#txt2img-prompt textarea").fill(FLUX_INFOTEXT)
        page.locator("#txt2img-paste").click()
        expect(page.locator("#model-status")).to_contain_text("FLUX")
        expect(page.locator("#txt2img-distilled-cfg")).to_be_visible()
        expect(page.locator("#txt2img-steps input[type='number']")).to_have_value("13")
        expect(page.locator("#txt2img-distilled-cfg input[type='number']")).to_have_value("4.5")
        expect(page.locator("#txt2img-cfg input[type='number']")).to_have_value("1")
        expect(page.locator("#txt2img-negative")).to_contain_text("unused at CFG scale 1")
        assert slider_value(page, "txt2img-steps") == "13"  # still, once every event has returned

        page.locator("#txt2img-prompt textarea").fill(FOREIGN_SD_INFOTEXT)
        page.locator("#txt2img-paste").click()
        expect(page.locator("#txt2img-warnings")).to_contain_text("not-here")
        expect(page.locator("#txt2img-steps input[type='number']")).to_have_value("2")
        page.locator("#txt2img-generate").click()
        infotext = page.locator("#txt2img-infotext .lw-infotext")
        expect(infotext).to_contain_text("Sampler: Euler,")
        expect(page.locator("#txt2img-warnings")).to_contain_text("not available for FLUX.1")
