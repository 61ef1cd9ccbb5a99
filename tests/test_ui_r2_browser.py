"""txt2img in a real browser (Playwright + the system Chromium): the token counter follows the
prompt; a LoRA added after the page loaded shows when the Networks panel opens, without
Refresh; a batch puts its grid first; Esc interrupts a running generation. Screenshots go to
`UI_R2_SCREENSHOT_DIR` (under /tmp) when set."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from lora_files import write_kohya_lora

from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, write_lora_folder
from tests.test_ui_browser import running_app, set_number
from webui.arch import Arch

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")
SHOTS = os.environ.get("UI_R2_SCREENSHOT_DIR")


def test_counter_panel_grid_and_escape(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=90_000)  # a shared 2-core machine
    (tmp_path / "models").mkdir()
    loras = tmp_path / "loras"
    write_lora_folder(loras)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            with running_app(tmp_path) as url:
                page = browser.new_page(viewport={"width": 1400, "height": 1200})
                page.set_default_timeout(90_000)
                page.goto(url)
                counter = page.locator("#txt2img-token-counter .lw-tokens")
                expect(counter).to_have_text("0/75")
                prompt = page.locator("#txt2img-prompt textarea")
                prompt.fill("a (cat:1.3), <lora:x:0.5> dog")
                expect(counter).to_have_text("4/75")
                prompt.fill("word " * 80)
                expect(counter).to_have_text("80/150")
                negative = page.locator("#txt2img-negative textarea")
                negative.fill("a BREAK b")
                expect(page.locator("#txt2img-negative-token-counter .lw-tokens")).to_have_text(
                    "76/150"
                )

                # a LoRA dropped in after the page loaded: opening the panel lists it
                write_kohya_lora(loras / "late_arrival.safetensors", Arch.SD1, {})
                page.locator("#txt2img-networks").get_by_text("Networks", exact=True).click()
                late = page.locator("#txt2img-networks-grid .lw-card[data-lora='late_arrival']")
                expect(late).to_be_visible()
                if SHOTS:
                    Path(SHOTS).mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=f"{SHOTS}/txt2img-networks.png", full_page=True)

                # a batch of 4: the grid comes first, twice the size of an image each way
                prompt.fill("a fox")
                for name, value in (("steps", "1"), ("width", "64"), ("height", "64")):
                    set_number(page, f"txt2img-{name}", value)
                set_number(page, "txt2img-batch-size", "4")
                page.locator("#txt2img-generate").click()
                expect(page.locator("#txt2img-gallery img")).to_have_count(5)
                first = page.locator("#txt2img-gallery img").first
                expect(first).to_have_js_property("naturalWidth", 128)
                expect(first).to_have_js_property("naturalHeight", 128)
                grids = list((tmp_path / "outputs" / "txt2img-grids").glob("*/00000-*.png"))
                assert len(grids) == 1
                if SHOTS:
                    page.screenshot(path=f"{SHOTS}/txt2img-grid.png", full_page=True)

                # Esc while a long run is going: it stops, and the panel says so
                set_number(page, "txt2img-batch-size", "1")
                set_number(page, "txt2img-batch-count", "50")
                set_number(page, "txt2img-steps", "150")
                page.locator("#txt2img-generate").click()
                page.wait_for_timeout(1500)
                page.locator("body").press("Escape")
                expect(page.locator("#txt2img-infotext")).to_contain_text("(interrupted)")
                text = page.locator("#txt2img-infotext").inner_text()
                assert re.search(r"(\d+) image\(s\)", text).group(1) != "50"
        finally:
            browser.close()
