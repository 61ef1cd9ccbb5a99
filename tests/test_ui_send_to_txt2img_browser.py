"""Send to txt2img and the ↙️ button in a real browser (Playwright + the system Chromium): an
image made here with non-default seed, size, clip skip, variation seed and hires fix is sent
back from the gallery (then from PNG Info) after controls were changed, and each control gets its value back;
a hand-written A1111 1.10 infotext pasted into the prompt box and read with ↙️ lands in the
right controls, with warnings for its checkpoint and LoRA that are not here. The run shows
the engine's live preview above the gallery (Settings: every step)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.app_server import running_app, write_app_folder
from tests.chromium import CHROMIUM, app_page, set_number
from tests.test_ui_infotext_fields import A1111_TEXT
from webui.arch import Arch

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium")


def number(page, elem: str) -> float:
    return float(page.locator(f"#{elem} input[type='number']").input_value())


def text(page, elem: str) -> str:
    return page.locator(f"#{elem} textarea").input_value()


def dropdown(page, elem: str) -> str:
    return page.locator(f"#{elem} input").first.input_value()


def checked(page, elem: str) -> bool:
    return page.locator(f"#{elem} input[type='checkbox']").is_checked()


def read_controls(page) -> dict:
    """Every control Send to txt2img fills, as the page shows it."""
    return {
        "prompt": text(page, "txt2img-prompt"),
        "negative": text(page, "txt2img-negative"),
        "steps": number(page, "txt2img-steps"),
        "sampler": dropdown(page, "txt2img-sampler"),
        "cfg": number(page, "txt2img-cfg"),
        "seed": number(page, "txt2img-seed"),
        "width": number(page, "txt2img-width"),
        "height": number(page, "txt2img-height"),
        "clip_skip": number(page, "txt2img-clip-skip"),
        "extra": checked(page, "txt2img-extra"),
        "subseed": number(page, "txt2img-subseed") if checked(page, "txt2img-extra") else None,
        "subseed_strength": number(page, "txt2img-subseed-strength")
        if checked(page, "txt2img-extra")
        else None,
        "enable_hr": checked(page, "txt2img-enable-hr"),
        "hr_upscaler": dropdown(page, "txt2img-hr-upscaler"),
        "hr_scale": number(page, "txt2img-hr-scale"),
        "hr_steps": number(page, "txt2img-hr-steps"),
        "denoising": number(page, "txt2img-denoising-strength"),
        "hr_cfg": number(page, "txt2img-hr-cfg"),
        "hr_sampler": dropdown(page, "txt2img-hr-sampler"),
        "hr_prompt": text(page, "txt2img-hr-prompt"),
        "hr_negative": text(page, "txt2img-hr-negative"),
    }


def settled_controls(page, expected: dict, timeout: float = 10) -> dict:
    """The controls once they read `expected` (the rest of an update lands a moment after its
    first field), or as they read after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (got := read_controls(page)) != expected and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    return got


def choose(page, elem: str, label: str) -> None:
    page.locator(f"#{elem} input").first.click()
    page.get_by_role("option", name=label, exact=True).click()


def test_send_to_txt2img_fills_every_field(
    tmp_path: Path, tiny_checkpoint_factory, chromium
) -> None:
    from playwright.sync_api import expect

    settings = {"save_outputs": False, "live_preview_every": 1}
    write_app_folder(tmp_path, tiny_checkpoint_factory(Arch.SD1), settings)
    with (
        running_app(tmp_path) as url,
        app_page(
            chromium,
            url,
            timeout_s=120,  # a shared 2-core machine
            ready="Loaded",
            viewport={"width": 1400, "height": 1400},
        ) as page,
    ):
        page.locator("#txt2img-prompt textarea").fill("a fox, (red:1.2)")
        page.locator("#txt2img-negative textarea").fill("ugly")
        for name, value in (
            *(("steps", "24"), ("width", "128"), ("height", "136"), ("cfg", "5.5")),
            *(("seed", "77"), ("clip-skip", "2")),
        ):
            set_number(page, f"txt2img-{name}", value)
        choose(page, "txt2img-sampler", "DPM++ 2M Karras")
        page.locator("#txt2img-extra input").check()
        set_number(page, "txt2img-subseed", "99")
        set_number(page, "txt2img-subseed-strength", "0.25")
        page.locator("#txt2img-hires").get_by_text("Hires. fix").first.click()
        page.locator("#txt2img-enable-hr input").check()
        for name, value in (
            *(("hr-scale", "1.5"), ("hr-steps", "2"), ("denoising-strength", "0.55")),
            ("hr-cfg", "4.5"),
        ):
            set_number(page, f"txt2img-{name}", value)
        choose(page, "txt2img-hr-upscaler", "Latent (bicubic)")
        choose(page, "txt2img-hr-sampler", "DPM++ 2M")
        page.locator("#txt2img-hr-prompt textarea").fill("a dog")
        page.locator("#txt2img-hr-negative textarea").fill("blur")
        made = read_controls(page)
        assert made == {
            "prompt": "a fox, (red:1.2)",
            "negative": "ugly",
            **{"steps": 24, "sampler": "DPM++ 2M Karras", "cfg": 5.5, "seed": 77},
            **{"width": 128, "height": 136, "clip_skip": 2, "extra": True},
            **{"subseed": 99, "subseed_strength": 0.25, "enable_hr": True},
            **{"hr_upscaler": "Latent (bicubic)", "hr_scale": 1.5, "hr_steps": 2},
            **{"denoising": 0.55, "hr_cfg": 4.5, "hr_sampler": "DPM++ 2M"},
            **{"hr_prompt": "a dog", "hr_negative": "blur"},
        }

        page.locator("#txt2img-generate").click()
        # the engine's live preview, shown while sampling, hidden with the result
        expect(page.locator("#txt2img-preview img")).to_be_visible()
        infotext = page.locator("#txt2img-infotext .lw-infotext")
        expect(infotext).to_contain_text("Hires upscale: 1.5")
        expect(page.locator("#txt2img-preview img")).to_be_hidden()

        # every control changed, then sent back from the gallery
        page.locator("#txt2img-prompt textarea").fill("something else")
        page.locator("#txt2img-negative textarea").fill("")
        for name in ("steps", "cfg", "seed", "clip-skip", "hr-steps", "hr-cfg"):
            set_number(page, f"txt2img-{name}", "3")
        choose(page, "txt2img-sampler", "Euler")
        page.locator("#txt2img-enable-hr input").uncheck()
        page.locator("#txt2img-extra input").uncheck()
        page.locator("#txt2img-send-to-txt2img").click()
        expect(page.locator("#txt2img-prompt textarea")).to_have_value(made["prompt"])
        expect(page.locator("#txt2img-enable-hr input")).to_be_checked()
        expect(page.locator("#txt2img-subseed")).to_be_visible()
        assert settled_controls(page, made) == made
        warnings = page.locator("#txt2img-warnings")
        assert "checkpoint" not in warnings.inner_text()  # found by its hash

        # the same image through PNG Info, then its Send to txt2img
        page.locator("#txt2img-prompt textarea").fill("something else")
        set_number(page, "txt2img-seed", "3")
        page.locator("#txt2img-send-to-png-info").click()
        expect(page.locator("#png-info-text textarea")).to_have_value(re.compile("Seed: 77"))
        page.locator("#png-info-send-to-txt2img").click()
        expect(page.locator("#txt2img-prompt textarea")).to_have_value(made["prompt"])
        assert settled_controls(page, made) == made

        # A1111 1.10's infotext, pasted into the prompt box and read with ↙️
        page.locator("#txt2img-prompt textarea").fill(A1111_TEXT)
        page.locator("#txt2img-paste").click()
        expect(page.locator("#txt2img-prompt textarea")).to_have_value(
            "masterpiece, <lora:ink:0.8>"
        )
        expect(warnings).to_contain_text("sd_xl_base_1.0")
        pasted = {
            "prompt": "masterpiece, <lora:ink:0.8>",
            "negative": "blurry",
            "steps": 28,
            "sampler": "DPM++ 2M Karras",
            "cfg": 6.5,
            "seed": 1234,
            "width": 832,
            "height": 1216,
            "clip_skip": 2,
            "extra": False,  # no variation seed: A1111's strength 0
            "subseed": None,
            "subseed_strength": None,
            "enable_hr": True,
            "hr_upscaler": "Latent",
            "hr_scale": 1.5,
            "hr_steps": 10,
            "denoising": 0.4,
            "hr_cfg": 6.5,  # none written: the first pass's
            "hr_sampler": "Use same sampler",
            "hr_prompt": "",
            "hr_negative": "",
        }
        assert settled_controls(page, pasted) == pasted
        expect(warnings).to_contain_text("LoRA ink (hash 7ab3c2e1f0aa) is not in")
        expect(page.locator("#model-select input").first).to_have_value("sd")
