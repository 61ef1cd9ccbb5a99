"""The UI in a real browser, over the demo model and a folder of LoRAs as users have them: the
Networks tab's cards, search, click-to-add, then a generation; txt2img's Networks panel (strength,
insert, remove); the token counter, a LoRA added after the page loaded, a batch's grid, and Esc.

Headless Chromium from the system (/usr/bin/chromium; `.ci/run` installs it); skipped without it.
The tests share one app server (starting one is most of a test's time); they run in file order
and only the last one changes the LoRA folder. Screenshots go to `UI_PANEL_SCREENSHOT` (a path)
and `UI_R2_SCREENSHOT_DIR` (under /tmp) when set."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from lora_files import write_kohya_lora
from PIL import Image, ImageDraw

from tests.app_server import running_app
from tests.chromium import CHROMIUM, app_page, set_number
from webui.arch import Arch

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")
SHOT = os.environ.get("UI_PANEL_SCREENSHOT")  # a path under /tmp to save a screenshot to
SHOTS = os.environ.get("UI_R2_SCREENSHOT_DIR")


def _preview(path: Path, colour: tuple[int, int, int]) -> None:
    image = Image.new("RGB", (256, 320), colour)
    draw = ImageDraw.Draw(image)
    for i in range(0, 320, 24):
        draw.ellipse((i - 40, i - 60, i + 120, i + 100), outline=(255, 255, 255), width=3)
    image.save(path)


def write_lora_folder(folder: Path) -> None:
    """A few LoRAs as users have them: kohya metadata, A1111 sidecars, previews, a subfolder,
    one SDXL file (incompatible with the SD1 demo model) and one unreadable file."""
    styles = folder / "styles"
    styles.mkdir(parents=True)
    tags = {"10_ink": {"ink wash": 40, "monochrome": 31, "brush strokes": 18, "1girl": 9}}
    write_kohya_lora(
        styles / "ink_wash.safetensors",
        Arch.SD1,
        {
            "ss_output_name": "ink_wash",
            "ss_tag_frequency": json.dumps(tags),
            "ss_sd_model_name": "v1-5-pruned.safetensors",
            "ss_resolution": "(512, 512)",
        },
    )
    (styles / "ink_wash.json").write_text(
        json.dumps({"activation text": "ink wash, monochrome", "preferred weight": 0.7})
    )
    _preview(styles / "ink_wash.preview.png", (40, 60, 90))
    write_kohya_lora(folder / "paper_cutout.safetensors", Arch.SD1, {"ss_output_name": "cutout"})
    (folder / "paper_cutout.json").write_text(json.dumps({"activation text": "paper cutout"}))
    sdxl = {"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_te1_x.alpha": torch.ones(())}
    safetensors.torch.save_file(
        sdxl,
        str(folder / "neon_city_xl.safetensors"),
        {"ss_base_model_version": "sdxl_base_v1-0", "ss_output_name": "neon_city_xl"},
    )
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")


@pytest.fixture(scope="module")
def server_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folders of this file's app: no checkpoint (the demo model) and `write_lora_folder`."""
    folder = tmp_path_factory.mktemp("networks-app")
    (folder / "models").mkdir()
    write_lora_folder(folder / "loras")
    return folder


@pytest.fixture(scope="module")
def server(server_folder: Path) -> Iterator[str]:
    """One app for this file's tests, in order (the last one changes the LoRA folder)."""
    with running_app(server_folder) as url:
        yield url


def test_networks_tab_in_a_browser(server: str, chromium, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with app_page(chromium, server, timeout_s=30, viewport={"width": 1400, "height": 1000}) as page:
        page.get_by_role("tab", name="Networks").click()
        grid = page.locator("#networks-grid")
        cards = grid.locator(".lw-card")
        expect(cards.first).to_be_visible()
        # the SDXL file is hidden on the SD1 demo model until "Show incompatible" (the grid
        # may be drawn once before the model is known: wait for it to settle, then read it
        # in one go rather than card by card)
        expect(grid.locator("[data-lora='neon_city_xl']")).to_have_count(0)
        names = cards.evaluate_all("cards => cards.map(card => card.dataset.lora)")
        assert "styles/ink_wash" in names and "paper_cutout" in names
        assert "broken" in names  # unreadable files are shown, with an error badge
        expect(grid.locator("[data-lora='broken'] .lw-badge-error")).to_be_visible()
        page.locator("#networks-all input").check()
        expect(grid.locator("[data-lora='neon_city_xl'].lw-incompatible")).to_be_visible()

        # select a card to fill the details panel, then screenshot the whole tab
        grid.locator("[data-lora='styles/ink_wash'] .lw-card-info").click(force=True)
        expect(page.locator("#networks-details .lw-tag-table")).to_be_visible()
        expect(page.locator("#networks-activation textarea")).to_have_value("ink wash, monochrome")
        shot = tmp_path / "networks-tab.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("BROWSER_SCREENSHOT_DIR"):
            target = Path(os.environ["BROWSER_SCREENSHOT_DIR"])
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, target / shot.name)

        # search narrows the grid
        page.locator("#networks-search textarea, #networks-search input").first.fill("ink")
        expect(cards).to_have_count(1)
        expect(cards.first).to_have_attribute("data-lora", "styles/ink_wash")

        # clicking a card puts its tag (with its preferred weight) into the prompt; a chip
        # adds its word; clicking the card again takes the tag out
        cards.first.locator(".lw-card-title").click()
        prompt = page.locator("#txt2img-prompt textarea")
        expect(prompt).to_have_value("<lora:styles/ink_wash:0.7>")
        expect(grid.locator(".lw-card.lw-in-prompt")).to_have_count(1)
        grid.locator("[data-lora='styles/ink_wash'] .lw-chip", has_text="monochrome").click()
        expect(prompt).to_have_value("<lora:styles/ink_wash:0.7>, monochrome")
        cards.first.locator(".lw-card-title").click()
        expect(prompt).to_have_value("monochrome")
        cards.first.locator(".lw-card-title").click()
        expect(prompt).to_have_value("monochrome, <lora:styles/ink_wash:0.7>")

        # generate with the tag: tiny image, two steps
        page.get_by_role("tab", name="txt2img").click()
        for slider, value in (("steps", "2"), ("width", "64"), ("height", "64")):
            set_number(page, f"txt2img-{slider}", value)
        page.locator("#txt2img-generate").click()
        expect(page.locator("#txt2img-gallery img").first).to_be_visible(timeout=60_000)
        info = page.locator("#txt2img-infotext .lw-infotext")
        expect(info).to_contain_text("<lora:styles/ink_wash:0.7>")
        expect(info).to_contain_text("Lora hashes")
        expect(info).to_contain_text("Size: 64x64")


def test_networks_panel_inserts_and_removes_tags(server: str, chromium) -> None:
    from playwright.sync_api import expect

    # a shared 2-core machine
    with app_page(chromium, server, timeout_s=60, viewport={"width": 1400, "height": 1100}) as page:
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


def test_counter_panel_grid_and_escape(server: str, server_folder: Path, chromium) -> None:
    from playwright.sync_api import expect

    loras = server_folder / "loras"
    # a shared 2-core machine
    with app_page(chromium, server, timeout_s=90, viewport={"width": 1400, "height": 1200}) as page:
        counter = page.locator("#txt2img-token-counter .lw-tokens")
        expect(counter).to_have_text("0/75")
        prompt = page.locator("#txt2img-prompt textarea")
        prompt.fill("a (cat:1.3), <lora:x:0.5> dog")
        expect(counter).to_have_text("4/75")
        prompt.fill("word " * 80)
        expect(counter).to_have_text("80/150")
        negative = page.locator("#txt2img-negative textarea")
        negative.fill("a BREAK b")
        expect(page.locator("#txt2img-negative-token-counter .lw-tokens")).to_have_text("76/150")

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
        grids = list((server_folder / "outputs" / "txt2img-grids").glob("*/00000-*.png"))
        assert len(grids) == 1
        if SHOTS:
            page.screenshot(path=f"{SHOTS}/txt2img-grid.png", full_page=True)

        # Esc while a long run is going: it stops, and the panel says so
        set_number(page, "txt2img-batch-size", "1")
        set_number(page, "txt2img-batch-count", "50")
        set_number(page, "txt2img-steps", "150")
        page.locator("#txt2img-generate").click()
        # a step of this run (50 x 150 steps) done, not the last run's bar fading out: the
        # job Esc must stop is running
        running = re.compile(r"\b[1-9][\d.]*k?/7\.5k steps")
        expect(page.locator(".progress-text").first).to_contain_text(running)
        page.locator("body").press("Escape")
        expect(page.locator("#txt2img-infotext")).to_contain_text("(interrupted)")
        text = page.locator("#txt2img-infotext").inner_text()
        assert re.search(r"(\d+) image\(s\)", text).group(1) != "50"
