"""FLUX.1 through the UI in a real browser (Playwright + the system Chromium), as a user goes:
pick the FLUX.1 [dev] file in the Checkpoint picker, see FLUX's controls (Distilled CFG Scale,
CFG 1, the LoRA backend and trigger words kept), open the
Networks panel (the FLUX LoRA's FLUX.1 badge and trigger-word chips; the SD LoRA filtered out),
click the card to add its tag, give it a per-step schedule and a block vector, generate with trigger words on, and
read the infotext. The page is saved as a screenshot (to `FLUX_UI_SCREENSHOT` when set: the
README's docs/screenshots/flux-txt2img.png is made that way)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from flux_lora_files import write_flux_lora
from lora_files import write_kohya_lora

from tests.app_server import running_app
from tests.chromium import CHROMIUM, app_page
from tests.test_ui_browser import choose, set_number
from tests.test_ui_family_browser import write_sd_and_flux_folders
from webui.arch import Arch

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")
SHOT = os.environ.get("FLUX_UI_SCREENSHOT")
# LoRA Block Weight's FLUX order: CLIP, T5, IN, D00-D18, S00-S37, OUT
BLOCKS = ",".join(["1", "1", "1", *["0.5"] * 19, *["1"] * 38, "1"])
TAG = f"<lora:inkfox:0@0,1@0.5:lbw={BLOCKS}>"


def test_flux_txt2img_with_a_scheduled_lora(
    tmp_path: Path, tiny_checkpoint_factory, chromium
) -> None:
    from playwright.sync_api import expect

    write_sd_and_flux_folders(tmp_path, tiny_checkpoint_factory)
    models, loras = tmp_path / "models", tmp_path / "loras"
    write_flux_lora(loras / "inkfox.safetensors", models / "flux1-dev.safetensors")
    (loras / "inkfox.json").write_text(json.dumps({"activation text": "inkfox, sketch"}))
    write_kohya_lora(loras / "sd_ink.safetensors", Arch.SD1, {"ss_base_model_version": "sd_v1"})
    with (
        running_app(tmp_path) as url,
        app_page(
            chromium,
            url,
            timeout_s=120,  # model loads on a shared 2-core machine
            ready="a-sd1",
            viewport={"width": 1400, "height": 1100},
        ) as page,
    ):
        page.reload()
        # SD's controls first: a switch racing the page's own load would see them late
        expect(page.locator("#txt2img-cfg input[type='number']")).to_have_value("7")
        expect(page.locator("#txt2img-negative")).not_to_contain_text("unused")
        choose(page, "model-select", "flux1-dev")
        expect(page.locator("#model-status")).to_contain_text("FLUX")

        # FLUX's controls: distilled CFG, CFG 1, the
        # backend choice (native or the diffusers fallback) and trigger words
        expect(page.locator("#txt2img-distilled-cfg")).to_be_visible()
        expect(page.locator("#txt2img-cfg input[type='number']")).to_have_value("1")
        expect(page.locator("#txt2img-negative")).to_contain_text("unused at CFG scale 1")
        expect(page.locator("#txt2img-lora-backend")).to_be_visible()
        expect(page.locator("#txt2img-trigger-words")).to_be_visible()

        prompt = page.locator("#txt2img-prompt textarea")
        prompt.fill("a fox in the snow")
        page.locator("#txt2img-networks").get_by_text("Networks", exact=True).click()
        card = page.locator("#txt2img-networks-grid .lw-card[data-lora='inkfox']")
        expect(card).to_be_visible()
        expect(card.locator(".lw-badge").first).to_have_text("FLUX.1")
        chips = card.locator(".lw-chip")
        expect(chips).to_have_text(["inkfox", "sketch"])
        # only LoRAs that fit the loaded model are listed by default
        sd_card = page.locator("#txt2img-networks-grid .lw-card[data-lora='sd_ink']")
        expect(sd_card).to_be_hidden()

        card.locator(".lw-card-title").click()
        expect(prompt).to_have_value("a fox in the snow, <lora:inkfox:1>")
        expect(card).to_have_class("lw-card lw-in-prompt")
        # a per-step schedule (off for the first half of the steps, full after) and a
        # FLUX block vector (the double blocks at half strength)
        prompt.fill(f"a fox in the snow, {TAG}")
        for name, value in (("steps", "4"), ("width", "128"), ("height", "128")):
            set_number(page, f"txt2img-{name}", value)
        set_number(page, "txt2img-distilled-cfg", "4.5")
        set_number(page, "txt2img-seed", "21")
        choose(page, "txt2img-trigger-words", "All words")
        page.locator("#txt2img-generate").click()
        info = page.locator("#txt2img-infotext .lw-infotext")
        expect(info).to_contain_text(TAG)
        expect(info).to_contain_text("Distilled CFG Scale: 4.5, Seed: 21,")
        expect(info).to_contain_text('Trigger words: "inkfox, sketch"')
        expect(info).to_contain_text("inkfox: ")  # Lora hashes
        expect(page.locator("#txt2img-gallery img")).to_have_count(1)
        expect(page.locator("#txt2img-warnings")).not_to_contain_text("inkfox")
        shot = Path(SHOT) if SHOT else tmp_path / "flux-txt2img.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        page.close()  # an open page would hold the server's shutdown
