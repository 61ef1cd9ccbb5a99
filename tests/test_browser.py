"""The UI in a real browser: Networks tab cards, search, click-to-add, then a generation.

Headless Chromium from the system (/usr/bin/chromium; `.ci/run` installs it); skipped without it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from lora_files import write_kohya_lora
from PIL import Image, ImageDraw

from tests.test_server import ROOT, free_port, wait_for
from webui.arch import Arch

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")


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


@pytest.fixture
def server(tmp_path: Path):
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    write_lora_folder(loras)
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "server.log").open("w")  # a file, not a pipe: a full pipe would block it
    process = subprocess.Popen(
        [
            sys.executable,
            "app.py",
            "--port",
            str(port),
            "--models-dir",
            str(models),
            "--loras-dir",
            str(loras),
            "--device",
            "cpu",
            *("--outputs-dir", str(tmp_path / "outputs"), "--cache-dir", str(tmp_path / "cache")),
            *("--settings-file", str(tmp_path / "config.json")),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        print((tmp_path / "server.log").read_text()[-6000:])  # shown when the test fails


def test_networks_tab_in_a_browser(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(server)
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
            expect(page.locator("#networks-activation textarea")).to_have_value(
                "ink wash, monochrome"
            )
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
                box = page.locator(f"#txt2img-{slider} input[type='number']")
                box.fill(value)
                box.press("Enter")
            page.locator("#txt2img-generate").click()
            expect(page.locator("#txt2img-gallery img").first).to_be_visible(timeout=60_000)
            info = page.locator("#txt2img-infotext .lw-infotext")
            expect(info).to_contain_text("<lora:styles/ink_wash:0.7>")
            expect(info).to_contain_text("Lora hashes")
            expect(info).to_contain_text("Size: 64x64")
        finally:
            browser.close()
