"""txt2img's Networks panel in a real browser (Playwright + the system Chromium): open it, set a
card's strength, a click inserts the tag at that strength, a second click removes it cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, write_lora_folder
from tests.test_ui_browser import running_app

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")
SHOT = os.environ.get("UI_PANEL_SCREENSHOT")  # a path under /tmp to save a screenshot to


def test_networks_panel_inserts_and_removes_tags(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # a shared 2-core machine
    (tmp_path / "models").mkdir()
    write_lora_folder(tmp_path / "loras")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            with running_app(tmp_path) as url:
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                page.set_default_timeout(60_000)
                page.goto(url)
                prompt = page.locator("#txt2img-prompt textarea")
                prompt.fill("a cat, sumi-e")
                card = page.locator("#txt2img-networks-grid .lw-card[data-lora='styles/ink_wash']")
                expect(card).to_be_hidden()  # closed at first
                page.locator("#txt2img-networks").get_by_text("Networks", exact=True).click()
                expect(card).to_be_visible()
                # titled by the tag's name; the sidecar's preferred weight is the default
                expect(card.locator(".lw-card-title")).to_have_text("styles/ink_wash")
                paper = page.locator("#txt2img-networks-grid .lw-card[data-lora='paper_cutout']")
                expect(paper.locator(".lw-card-subtitle")).to_have_text("cutout")
                strength = card.locator("input[data-strength]")
                expect(strength).to_have_value("0.7")
                strength.fill("0.45")
                if SHOT:
                    page.screenshot(path=SHOT, full_page=True)
                card.locator(".lw-card-title").click()
                expect(prompt).to_have_value("a cat, sumi-e, <lora:styles/ink_wash:0.45>")
                expect(card).to_have_class("lw-card lw-in-prompt")
                expect(card.locator("input[data-strength]")).to_have_value("0.45")
                card.locator(".lw-card-title").click()
                expect(prompt).to_have_value("a cat, sumi-e")
        finally:
            browser.close()
