"""The X/Y/Z plot accordion in a real browser (Playwright + the system Chromium): choose two
axes, Generate plot, and the gallery holds the grid then every cell, the grid's infotext naming
the axes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app_server import running_app, write_app_folder
from tests.chromium import CHROMIUM, app_page, set_number
from tests.test_ui_browser import choose
from webui.arch import Arch

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")


def test_generate_plot_fills_the_gallery(tmp_path: Path, tiny_checkpoint_factory, chromium) -> None:
    from playwright.sync_api import expect

    write_app_folder(tmp_path, tiny_checkpoint_factory(Arch.SD1))
    with (
        running_app(tmp_path) as url,
        app_page(
            chromium, url, timeout_s=120, ready="Loaded", viewport={"width": 1400, "height": 1400}
        ) as page,
    ):
        page.locator("#txt2img-prompt textarea").fill("a fox")
        for name, value in (("steps", "2"), ("width", "64"), ("height", "64")):
            set_number(page, f"txt2img-{name}", value)
        page.get_by_text("X/Y/Z plot").first.click()
        choose(page, "txt2img-xyz-x-type", "Seed")
        expect(page.locator("#txt2img-xyz-x-lora")).to_be_hidden()
        page.locator("#txt2img-xyz-x-values textarea").fill("1-3")
        choose(page, "txt2img-xyz-y-type", "Steps")
        page.locator("#txt2img-xyz-y-values textarea").fill("1, 2")
        page.locator("#txt2img-xyz-run").click()
        infotext = page.locator("#txt2img-infotext .lw-infotext")
        expect(infotext).to_contain_text("X/Y/Z plot: ")
        expect(infotext).to_contain_text("X: Seed = 1, 2, 3; Y: Steps = 1, 2")
        thumbs = page.locator("#txt2img-gallery .thumbnail-item")
        expect(thumbs).to_have_count(7)  # the grid, then six cells
        assert len(list((tmp_path / "outputs" / "txt2img-grids").rglob("*.png"))) == 1
