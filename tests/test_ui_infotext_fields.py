"""Send to txt2img's mapping: an infotext written by this app (a real generation on a tiny SD1
model) gives back the request's values; a hand-written A1111 1.10 infotext gives the values
A1111 would paste (its sampler + schedule type folded into one name, its defaults for what
the text leaves out)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from engine_settings import cpu_settings
from lora_files import write_kohya_lora

from webui.arch import Arch
from webui.engine.generate import Engine, GenerationRequest
from webui.engine.hires import HiresFix
from webui.ui.infotext_fields import FieldValues, fields_from_infotext, lora_hashes

A1111_TEXT = (
    "masterpiece, <lora:ink:0.8>\n"
    "Negative prompt: blurry\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, "
    "Size: 832x1216, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Denoising strength: 0.4, "
    'Clip skip: 2, Hires upscale: 1.5, Hires steps: 10, Hires upscaler: Latent, Lora hashes: "ink: '
    '7ab3c2e1f0aa", Version: v1.10.1'
)


def test_a1111_fixture_maps_field_by_field() -> None:
    assert fields_from_infotext(A1111_TEXT) == FieldValues(
        prompt="masterpiece, <lora:ink:0.8>",
        negative_prompt="blurry",
        steps=28,
        sampler="DPM++ 2M Karras",
        cfg_scale=6.5,
        seed=1234,
        width=832,
        height=1216,
        clip_skip=2,
        hires=HiresFix(scale=1.5, steps=10, upscaler="Latent", denoising_strength=0.4),
        model_hash="31e35c80fc",
        model_name="sd_xl_base_1.0",
        lora_hashes=(("ink", "7ab3c2e1f0aa"),),
    )


def test_absent_fields_take_a1111_defaults() -> None:
    values = fields_from_infotext("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7")
    assert (values.seed, values.width, values.hires, values.clip_skip) == (None, None, None, 1)
    assert (values.subseed, values.subseed_strength) == (-1, 0.0)


def test_bad_values_are_named_not_raised() -> None:
    values = fields_from_infotext("a cat\nSteps: many, Sampler: Nonesuch, Size: big, Seed: 3")
    assert values.steps is None and values.sampler is None and values.width is None
    assert values.seed == 3
    assert len(values.problems) == 3
    assert any("Sampler" in p and "Nonesuch" in p for p in values.problems)


def test_lora_hashes_pairs() -> None:
    assert lora_hashes("ink: ABC123, sub/dir name: def456") == (
        ("ink", "abc123"),
        ("sub/dir name", "def456"),
    )


@pytest.fixture
def engine(tmp_path: Path, tiny_checkpoint_factory) -> Engine:
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    loras.mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "tiny.safetensors")
    write_kohya_lora(loras / "ink.safetensors", Arch.SD1, {"ss_base_model_version": "sd_v1"})
    engine = Engine(cpu_settings(models, loras, tmp_path, save_outputs=False))
    engine.load("tiny")
    return engine


def test_this_apps_infotext_gives_back_the_request(engine: Engine) -> None:
    fix = HiresFix(
        scale=1.5,
        steps=2,
        denoising_strength=0.55,
        upscaler="Latent (bicubic)",
        prompt="a dog",
        negative_prompt="blur",
        sampler="DPM++ 2M",
        cfg_scale=4.5,
    )
    request = GenerationRequest(
        "a cat, <lora:ink:0.7>",
        negative_prompt="ugly",
        steps=2,
        cfg_scale=5.5,
        width=64,
        height=72,
        seed=77,
        sampler="DPM++ 2M Karras",
        clip_skip=2,
        subseed=99,
        subseed_strength=0.25,
        hires=fix,
    )
    image = engine.generate(request).images[0]
    values = fields_from_infotext(image.infotext.format())
    short_hash = engine.hashes.model_hash(engine.checkpoints()[0].path)
    assert values == FieldValues(
        prompt="a cat, <lora:ink:0.7>",
        negative_prompt="ugly",
        steps=2,
        sampler="DPM++ 2M Karras",
        cfg_scale=5.5,
        seed=77,
        width=64,
        height=72,
        clip_skip=2,
        subseed=99,
        subseed_strength=0.25,
        hires=HiresFix(
            scale=1.5,
            steps=2,
            denoising_strength=0.55,
            upscaler="Latent (bicubic)",
            prompt="a dog",
            negative_prompt="blur",
            sampler="DPM++ 2M",
            cfg_scale=4.5,
        ),
        model_hash=short_hash,
        model_name="tiny",
        lora_hashes=values.lora_hashes,
    )
    assert [name for name, _ in values.lora_hashes] == ["ink"]


def test_checkpoint_found_by_hash_under_another_name(engine: Engine) -> None:
    import hashlib

    from webui.ui.paste_params import find_checkpoint

    path = engine.checkpoints()[0].path
    short = hashlib.sha256(path.read_bytes()).hexdigest()[:10]  # A1111's AutoV2, by hand
    renamed = fields_from_infotext(f"a\nSteps: 2, Seed: 1, Model hash: {short}, Model: old")
    assert find_checkpoint(engine, renamed) == ("tiny", None)
    gone = fields_from_infotext("a\nSteps: 2, Seed: 1, Model hash: 0123456789, Model: old")
    name, warning = find_checkpoint(engine, gone)
    assert name is None and warning is not None and "old (hash 0123456789)" in warning


def test_lora_found_by_hash_when_renamed(engine: Engine, tmp_path: Path) -> None:
    import hashlib
    import json as jsonlib

    from webui.ui.paste_params import missing_loras

    path = tmp_path / "loras" / "ink.safetensors"
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    autov3 = hashlib.sha256(raw[header_end:]).hexdigest()[:12]  # A1111's addnet hash, by hand
    assert jsonlib.loads(raw[8:header_end])  # the header really ends there
    entries = engine.catalog.index.entries()
    folder = str(tmp_path / "loras")
    assert missing_loras([("ink", "000000000000")], entries, folder) == []  # by name
    (renamed,) = missing_loras([("old_ink", autov3)], entries, folder)
    assert "as ink" in renamed
    (gone,) = missing_loras([("other", "000000000000")], entries, folder)
    assert gone == f"LoRA other (hash 000000000000) is not in {folder}"
