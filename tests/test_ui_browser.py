"""The UI tells the truth, in a real browser (Playwright + the system Chromium): the model picker
names the loaded model after reloads, refreshes and restarts; the trigger-word mode is each
page's own; settings survive a restart; keyboard shortcuts; a LoRA deleted after the page loaded
is a warning and the image is still made; the gallery shows whole images and the infotext of the
selected one. Several checks share one page: the browser is slow here. The restart is in-process
(a new engine and app from the same settings file); test_server.py starts `python app.py`."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from tests.app_server import running_app
from tests.chromium import CHROMIUM, app_page, set_number
from tests.test_browser import write_lora_folder
from webui.arch import Arch

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")
SHOTS = Path(os.environ.get("UI_SCREENSHOT_DIR", "/tmp/h5-ui-shots"))
# generations on a shared 2-core machine
PAGE = {"timeout_s": 60, "viewport": {"width": 1400, "height": 1100}}


def api(url: str, route: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url + "sdapi/v1/" + route, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read() or b"null")


def picker_value(page) -> str:
    return page.locator("#model-select input").input_value()


def choose(page, elem: str, label: str) -> None:
    page.locator(f"#{elem} input").click()
    # the list just opened is the last in the page (another dropdown's may still be closing)
    page.get_by_role("option", name=label, exact=True).last.click()


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    write_lora_folder(tmp_path / "loras")
    return tmp_path


def test_ui_tells_the_truth(folders: Path, tiny_checkpoint_factory, chromium) -> None:
    from playwright.sync_api import expect

    tiny = tiny_checkpoint_factory(Arch.SD1)
    models = folders / "models"
    with running_app(folders) as url, app_page(chromium, url, **PAGE) as page:
        # the empty models folder: the demo model loads in the background
        expect(page.locator("#model-status")).to_contain_text("Demo model")
        page.reload()
        expect(page.locator("#model-status")).to_contain_text("Demo model")
        assert picker_value(page).startswith("demo-tiny-sd1")

        # checkpoints dropped in models/, then Refresh: listed, nothing loaded, the
        # picker still names the demo model, the Tools lists default to no new file
        shutil.copy(tiny, models / "beta.safetensors")
        shutil.copy(tiny, models / "alpha.safetensors")
        page.locator("#model-refresh").click()
        page.locator("#model-select input").click()
        expect(page.get_by_role("option", name="alpha", exact=True)).to_be_visible()
        page.keyboard.press("Escape")
        assert picker_value(page).startswith("demo-tiny-sd1")
        expect(page.locator("#model-status")).to_contain_text("Demo model")

        # keyboard: Ctrl+Up on a selected tag; the word under the cursor is emphasised
        prompt = page.locator("#txt2img-prompt textarea")
        prompt.fill("a fox <lora:styles/ink_wash:0.8>")
        prompt.evaluate("b => b.setSelectionRange(6, b.value.length)")
        prompt.press("Control+ArrowUp")
        expect(prompt).to_have_value("a fox <lora:styles/ink_wash:0.9>")
        prompt.evaluate("b => b.setSelectionRange(3, 3)")
        prompt.press("Control+ArrowDown")
        expect(prompt).to_have_value("a (fox:0.9) <lora:styles/ink_wash:0.9>")
        prompt.press("Control+ArrowUp")
        expect(prompt).to_have_value("a fox <lora:styles/ink_wash:0.9>")

        # per-page trigger words: this page adds all, a second page (server default
        # Off) adds none; each page's images follow its own choice
        for name, value in (("steps", "1"), ("width", "64"), ("height", "64")):
            set_number(page, f"txt2img-{name}", value)
        choose(page, "txt2img-trigger-words", "All words")
        with app_page(chromium, url, **PAGE) as other:
            expect(other.locator("#txt2img-trigger-words input")).to_have_value("Off")
            other.locator("#txt2img-prompt textarea").fill("a fox <lora:styles/ink_wash:1>")
            for name, value in (("steps", "1"), ("width", "64"), ("height", "64")):
                set_number(other, f"txt2img-{name}", value)
            prompt.press("Control+Enter")  # Ctrl+Enter generates
            info = page.locator("#txt2img-infotext .lw-infotext")
            expect(info).to_contain_text('Trigger words: "ink wash, monochrome"')
            other.locator("#txt2img-generate").click()
            other_info = other.locator("#txt2img-infotext .lw-infotext")
            expect(other_info).to_contain_text("Size: 64x64")
            assert "Trigger words" not in other_info.inner_text()
        # the image went to the outputs folder, A1111's naming, and the UI says where
        saved = list((folders / "outputs" / "txt2img-images").glob("*/00000-*.png"))
        assert len(saved) >= 1
        expect(page.locator("#txt2img-infotext")).to_contain_text("txt2img-images")

        # LoRA files deleted after the page loaded: a warning naming each, and the
        # image is made with the LoRA that is still there
        (folders / "loras" / "paper_cutout.safetensors").unlink()
        prompt.fill("a fox <lora:paper_cutout:0.8> <lora:styles/ink_wash:0.5>")
        page.locator("#txt2img-generate").click()
        warnings = page.locator("#txt2img-warnings")
        expect(warnings).to_contain_text("paper_cutout")
        expect(info).to_contain_text("a fox")
        expect(info).to_contain_text("ink_wash")
        expect(page.locator("#txt2img-gallery img")).to_have_count(1)

        # a wide image is shown whole; image 3 of a batch shows its own infotext
        prompt.fill("a wide fox")
        set_number(page, "txt2img-width", "512")
        set_number(page, "txt2img-height", "128")
        set_number(page, "txt2img-seed", "100")
        page.locator("#txt2img-generate").click()
        expect(info).to_contain_text("Size: 512x128")
        thumb = page.locator("#txt2img-gallery img").first
        # the element is there before its pixels: wait until the image has its natural size
        thumb.evaluate("img => img.decode()")
        fit = thumb.evaluate(
            "img => ({fit: getComputedStyle(img).objectFit, w: img.clientWidth,"
            " h: img.clientHeight, nw: img.naturalWidth, nh: img.naturalHeight})"
        )
        assert fit["nw"] / fit["nh"] == 4
        box_ratio = fit["w"] / fit["h"]
        assert fit["fit"] in ("contain", "scale-down") or abs(box_ratio - 4) < 0.1, fit
        set_number(page, "txt2img-width", "64")
        set_number(page, "txt2img-height", "64")
        page.locator("#txt2img-batch-size input[type='number']").fill("3")
        page.locator("#txt2img-batch-size input[type='number']").press("Enter")
        page.locator("#txt2img-generate").click()
        expect(info).to_contain_text("Seed: 100,")
        # the batch's grid comes first (as A1111), then the three images
        expect(page.locator("#txt2img-gallery img")).to_have_count(4)
        page.locator("#txt2img-gallery img").nth(3).click()
        expect(info).to_contain_text("Seed: 102,")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "txt2img.png"), full_page=True)

        # server-wide settings, then a model switch in the picker
        page.get_by_role("tab", name="Settings").click()
        choose(page, "settings-trigger-words", "First word")
        page.locator("#settings-apply").click()
        expect(page.locator("#settings-status")).to_contain_text("saved to")
        page.screenshot(path=str(SHOTS / "settings.png"), full_page=True)
        page.get_by_role("tab", name="txt2img").click()
        choose(page, "model-select", "beta")
        expect(page.locator("#model-status")).to_contain_text("Loaded beta")
        # a bake writes a new file that sorts first: it must not become the default
        shutil.copy(tiny, models / "0-baked.safetensors")

    # restart: a new engine and app over the same folders and settings file, as `python app.py`
    # builds them (test_server.py starts the real process): model and settings kept
    with running_app(folders) as url, app_page(chromium, url, ready="Loaded beta", **PAGE) as page:
        assert picker_value(page) == "beta"
        expect(page.locator("#txt2img-trigger-words input")).to_have_value("First word")
        page.get_by_role("tab", name="Tools").click()
        expect(page.locator("#extract-model input")).to_have_value("beta")
        # a switch made elsewhere (the API) shows on reload
        api(url, "options", {"sd_model_checkpoint": "alpha"})
        page.reload()
        expect(page.locator("#model-status")).to_contain_text("Loaded alpha")
        assert picker_value(page) == "alpha"
        settings = json.loads((folders / "config.json").read_text())
        assert settings["sd_model_checkpoint"] == "alpha"
        assert settings["auto_trigger_words"] == 1
