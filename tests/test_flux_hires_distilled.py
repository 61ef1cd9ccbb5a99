"""Forge's Hires Distilled CFG Scale (`hr_distilled_cfg`) on the tiny FLUX.1 models: what the
transformer's forward receives as `guidance` in each pass (recorded by a forward hook, against
the numbers set here), the first pass's value by default, Forge's infotext key written with every
[dev] hires image and read back, the API field reaching the transformer, the field ignored
without a word on [schnell] and SD, and a paste setting the hires slider of the txt2img tab."""

from __future__ import annotations

import shutil
from dataclasses import replace
from typing import Any

import gradio as gr
import numpy as np
import pytest
from engine_settings import cpu_settings
from fastapi.testclient import TestClient
from flux_models import write_flux_models

from webui.api.infotext_fields import a1111_fields
from webui.api.models import Txt2ImgRequest
from webui.arch import Arch, FluxVariant
from webui.engine.generate import Engine, GenerationRequest, RequestError
from webui.engine.hires import HiresFix
from webui.server import Access, build_app
from webui.ui.family_controls import family_updates
from webui.ui.infotext_fields import fields_from_infotext
from webui.ui.paste_params import PASTE_FIELDS, SAME_SAMPLER, paste
from webui.ui.txt2img import build_txt2img_tab
from webui.ui.txt2img_options import hires_fix

DEV, SCHNELL = FluxVariant.DEV, FluxVariant.SCHNELL
SD = "tiny-sd1"
KEY = "Hires Distilled CFG Scale"  # Forge's infotext key, as its processing.py writes it
PROMPT = "a red fox"
# 64x80: 4x5 = 20 tokens in the first pass; hires x2 (128x160): 80 tokens
SMALL = {"steps": 2, "width": 64, "height": 80, "seed": 11, "cfg_scale": 1.0}
FIRST_TOKENS, HIRES_TOKENS = 20, 80


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_checkpoint_factory) -> tuple[Engine, dict[Any, str]]:
    root = tmp_path_factory.mktemp("flux-hires-distilled")
    models, loras = root / "models", root / "loras"
    models.mkdir()
    loras.mkdir()
    names: dict[Any, str] = dict(write_flux_models(models))
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / f"{SD}.safetensors")
    names[SD] = SD
    return Engine(cpu_settings(models, loras, root, save_outputs=False)), names


Seen = list[tuple[int, list[float] | None]]


def _recorder(seen: Seen):
    """A forward pre-hook noting (image tokens, `guidance` per image) of each transformer call."""

    def record(module, args, kwargs) -> None:
        given = kwargs.get("guidance")
        tokens = kwargs["hidden_states"].shape[1]
        seen.append((tokens, None if given is None else given.float().tolist()))

    return record


def _run(engine, model: Any = DEV, seen: Seen | None = None, **fields):
    """A generation; with `seen`, every FLUX transformer call recorded (the hires pass's
    img2img pipeline shares the loaded pipeline's transformer module)."""
    eng, names = engine
    pipe = eng.load(names[model]).pipe
    hook = None
    if seen is not None:
        hook = pipe.transformer.register_forward_pre_hook(_recorder(seen), with_kwargs=True)
    try:
        return eng.generate(GenerationRequest(PROMPT, **{**SMALL, **fields}))
    finally:
        if hook is not None:
            hook.remove()


def _by_pass(seen) -> tuple[list, list]:
    first = [g for tokens, g in seen if tokens == FIRST_TOKENS]
    second = [g for tokens, g in seen if tokens == HIRES_TOKENS]
    assert len(first) + len(second) == len(seen), seen
    return first, second


def test_second_pass_guidance_is_the_hires_value(engine) -> None:
    seen: Seen = []
    fix = HiresFix(scale=2.0, distilled_cfg_scale=6.25)
    result = _run(engine, DEV, seen, hires=fix, distilled_cfg_scale=2.5, batch_size=2)
    first, second = _by_pass(seen)
    # 2 steps each: diffusers' FluxPipeline and FluxImg2ImgPipeline call it once per step
    assert first == [[2.5, 2.5]] * 2
    assert second == [[6.25, 6.25]] * 2
    assert result.images[0].image.size == (128, 160)
    assert not [w for w in result.warnings if "istilled" in w], result.warnings


def test_default_is_the_first_pass_value(engine) -> None:
    seen: Seen = []
    _run(engine, DEV, seen, hires=HiresFix(scale=2.0), distilled_cfg_scale=4.5)
    first, second = _by_pass(seen)
    assert first == second == [[4.5]] * 2


def _pixels(engine, fix: HiresFix, first_pass: float) -> np.ndarray:
    result = _run(engine, DEV, hires=fix, distilled_cfg_scale=first_pass)
    return np.asarray(result.images[0].image).astype(np.int16)


def test_the_hires_value_decides_the_image(engine) -> None:
    fix = HiresFix(scale=2.0, denoising_strength=0.9)
    unset = _pixels(engine, fix, 2.0)
    assert np.array_equal(unset, _pixels(engine, replace(fix, distilled_cfg_scale=2.0), 2.0))
    assert not np.array_equal(unset, _pixels(engine, replace(fix, distilled_cfg_scale=9.0), 2.0))


@pytest.mark.parametrize(("given", "written"), [(6.25, "6.25"), (None, "4.5")])
def test_infotext_carries_forges_key_and_parses_back(engine, given, written) -> None:
    """Forge writes the key with every hires image of a distilled-CFG model, its value the one
    the second pass ran with (ours: the first pass's when none is given)."""
    fix = HiresFix(scale=2.0, distilled_cfg_scale=given)
    text = _run(engine, hires=fix, distilled_cfg_scale=4.5).images[0].infotext.format()
    assert f", {KEY}: {written}," in text or text.endswith(f", {KEY}: {written}")
    assert a1111_fields(text)[KEY] == written
    assert a1111_fields(text)["Distilled CFG Scale"] == "4.5"
    pasted = fields_from_infotext(text)
    assert pasted.hires is not None and pasted.hires.distilled_cfg_scale == float(written)
    assert pasted.distilled_cfg_scale == 4.5


def test_no_key_without_hires(engine) -> None:
    params = _run(engine, distilled_cfg_scale=4.5).images[0].infotext.params
    assert KEY not in params and params["Distilled CFG Scale"] == "4.5"


@pytest.mark.parametrize("model", [SCHNELL, SD], ids=["schnell", "sd1"])
def test_ignored_without_a_word_where_there_is_no_distilled_cfg(engine, model) -> None:
    """Like the first pass's `distilled_cfg_scale`: no error, no warning, no key, same image."""
    size = {"width": 64, "height": 64} if model == SD else {}
    seen: Seen | None = [] if model == SCHNELL else None
    plain = _run(engine, model, hires=HiresFix(scale=2.0), **size)
    fix = HiresFix(scale=2.0, distilled_cfg_scale=9.0)
    given = _run(engine, model, seen, hires=fix, **size)
    assert plain.warnings == given.warnings
    assert not [w for w in given.warnings if "istilled" in w], given.warnings
    assert KEY not in given.images[0].infotext.params
    assert np.array_equal(np.asarray(plain.images[0].image), np.asarray(given.images[0].image))
    if seen is not None:  # schnell's transformer is given no guidance input at all
        assert seen and all(g is None for _, g in seen)


def test_out_of_range_is_refused_by_name(engine) -> None:
    with pytest.raises(RequestError, match="hr_distilled_cfg must be between 0 and 30"):
        _run(engine, hires=HiresFix(distilled_cfg_scale=31.0))


def test_api_field_reaches_the_transformer(engine) -> None:
    eng, names = engine
    transformer = eng.load(names[DEV]).pipe.transformer
    seen: Seen = []
    body = {"prompt": PROMPT, **SMALL, "distilled_cfg_scale": 3, "enable_hr": True}
    client = TestClient(build_app(eng, Access()))
    hook = transformer.register_forward_pre_hook(_recorder(seen), with_kwargs=True)
    try:
        answer = client.post("/sdapi/v1/txt2img", json={**body, "hr_distilled_cfg": 7.5})
    finally:
        hook.remove()
    assert answer.status_code == 200, answer.text
    first, second = _by_pass(seen)
    assert first == [[3.0]] * 2 and second == [[7.5]] * 2
    infotext = answer.json()["info"]
    assert f"{KEY}: 7.5" in infotext
    bad = client.post("/sdapi/v1/txt2img", json={**body, "hr_distilled_cfg": 99})
    assert bad.status_code == 422 and "hr_distilled_cfg" in bad.text
    # absent: None, the engine's first pass's value
    assert Txt2ImgRequest(**body).generation_request(1).hires == HiresFix(denoising_strength=0.7)


def test_paste_sets_the_hires_slider(engine) -> None:
    eng, _ = engine
    with gr.Blocks():
        tab = build_txt2img_tab(eng)
    assert len(tab.paste_targets) == len(PASTE_FIELDS)
    by_id = dict(zip((t.elem_id for t in tab.paste_targets), PASTE_FIELDS, strict=True))
    assert by_id["txt2img-hr-distilled-cfg"] == "hr_distilled_cfg"
    slider = next(t for t in tab.paste_targets if t.elem_id == "txt2img-hr-distilled-cfg")
    assert slider.label == KEY

    def pasted(text: str) -> Any:
        updates = dict(zip(PASTE_FIELDS, paste(eng, text).updates, strict=True))
        return updates["hr_distilled_cfg"].get("value")

    base = "a fox\nSteps: 2, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 4.5, Seed: 1"
    hires = "Denoising strength: 0.5, Hires upscale: 2, Hires upscaler: Latent"
    assert pasted(f"{base}, {hires}, {KEY}: 6.5") == 6.5
    assert pasted(f"{base}, {hires}") == 4.5  # none written: the first pass's, as Hires CFG
    assert pasted(base) is None  # hires off: the slider keeps its value


def test_the_accordion_leaves_a_value_equal_to_the_first_pass_unset() -> None:
    values = (True, "Latent", 2.0, 0, 0, 0, 0.7, 1.0, SAME_SAMPLER, "", "")
    fix = hires_fix(*values, 6.5, first_cfg=1.0, first_distilled_cfg=3.5)
    assert fix is not None and fix.distilled_cfg_scale == 6.5
    same = hires_fix(*values, 3.5, first_cfg=1.0, first_distilled_cfg=3.5)
    assert same is not None and same.distilled_cfg_scale is None


def test_family_updates_show_the_hires_slider_with_the_first_one(engine) -> None:
    eng, names = engine
    with gr.Blocks():
        tab = build_txt2img_tab(eng)
    for model, shown in ((DEV, True), (SCHNELL, False), (SD, False)):
        eng.load(names[model])
        updates = family_updates(eng.generation_controls(), None)
        by_id = {c.elem_id: u for c, u in zip(tab.family, updates, strict=True) if c.elem_id}
        assert by_id["txt2img-hr-distilled-cfg"]["visible"] is shown
        assert by_id["txt2img-distilled-cfg"]["visible"] is shown
