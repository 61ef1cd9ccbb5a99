"""Server-wide settings saved to a file, the model that loads by default, per-request trigger
words, A1111's output numbering (the quiet console: tests/test_cli.py's subprocess test)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine_settings import cpu_settings
from lora_files import write_kohya_lora

from webui.arch import Arch
from webui.engine.generate import (
    DEMO_MODEL_NAME,
    Engine,
    GenerationRequest,
    next_image_number,
)
from webui.engine.trigger_words import trigger_mode_label, trigger_mode_limit
from webui.settings import Settings, SettingsFile


def test_settings_file_round_trip_keeps_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"someone_elses": [1, 2], "save_outputs": "yes"}))
    saved = SettingsFile(path)
    # a value of the wrong type is ignored (the default stays), not a crash
    assert saved.apply(Settings()).save_outputs is True
    saved.save(Settings(auto_trigger_words=3, save_outputs=False))
    saved.save(last_model="beta")
    data = json.loads(path.read_text())
    assert data == {
        "someone_elses": [1, 2],
        "auto_trigger_words": 3,
        "save_outputs": False,
        "lora_fuse": False,
        "live_preview_every": 10,
        "sd_model_checkpoint": "beta",
    }
    settings = saved.apply(Settings())
    assert (settings.auto_trigger_words, settings.save_outputs) == (3, False)


def test_unreadable_settings_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    assert SettingsFile(path).apply(Settings()) == Settings()
    assert SettingsFile(tmp_path / "missing.json").load().last_model is None


def test_last_model_loads_by_default_and_a_new_file_does_not_change_it(
    tmp_path: Path, tiny_checkpoint_factory
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    tiny = tiny_checkpoint_factory(Arch.SD1)
    for name in ("alpha", "beta"):
        shutil.copy(tiny, models / f"{name}.safetensors")
    saved = SettingsFile(tmp_path / "config.json")
    engine = Engine(cpu_settings(models, tmp_path / "loras", tmp_path), saved)
    assert engine.default_model() == "alpha"  # nothing saved yet: the first file
    engine.load("beta")
    shutil.copy(tiny, models / "0-baked.safetensors")  # what a bake adds
    restarted = Engine(cpu_settings(models, tmp_path / "loras", tmp_path), saved)
    assert restarted.default_model() == "beta"
    (models / "beta.safetensors").unlink()  # gone: the first file again
    assert restarted.default_model() == "0-baked"


def test_engine_without_settings_file_writes_none(tmp_path: Path) -> None:
    engine = Engine(Settings(save_outputs=False, cache_dir=tmp_path, settings_file=tmp_path / "c"))
    engine.load(DEMO_MODEL_NAME)
    engine.update_options(auto_trigger_words=1)
    assert engine.settings.auto_trigger_words == 1
    assert not (tmp_path / "c").exists()


def test_trigger_words_per_request_else_the_setting(tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    loras.mkdir()
    write_kohya_lora(loras / "ink.safetensors", Arch.SD1)
    engine = Engine(Settings(loras_dir=loras, save_outputs=False, cache_dir=tmp_path))
    engine.trigger_words = lambda path: ("ink wash", "mono")
    engine.load(DEMO_MODEL_NAME)
    base = GenerationRequest("a cat <lora:ink:1>", steps=1, width=64, height=64, seed=1)

    def added(request: GenerationRequest) -> str | None:
        return engine.generate(request).images[0].infotext.params.get("Trigger words")

    assert added(base) is None  # the server-wide setting: off
    assert added(GenerationRequest(**{**base.__dict__, "auto_trigger_words": -1})) == (
        "ink wash, mono"
    )
    engine.update_options(auto_trigger_words=1)
    assert added(base) == "ink wash"  # API calls (no per-request mode) follow the setting
    assert added(GenerationRequest(**{**base.__dict__, "auto_trigger_words": 0})) is None


def test_trigger_mode_labels() -> None:
    for limit in (0, 1, 3, -1, 2, 7):
        assert trigger_mode_limit(trigger_mode_label(limit)) == limit
    assert trigger_mode_label(2) == "First 2 words"


def test_output_numbers_follow_a1111(tmp_path: Path) -> None:
    assert next_image_number(tmp_path) == 0
    for name in ("00000-5.png", "00007-9.png", "notes.txt", "x-00012.png"):
        (tmp_path / name).write_bytes(b"")
    assert next_image_number(tmp_path) == 8  # one past the highest, gaps not reused


def test_live_preview_setting_is_applied_and_saved(tmp_path: Path) -> None:
    from webui.ui.settings_tab import apply_settings

    path = tmp_path / "config.json"
    engine = Engine(Settings(cache_dir=tmp_path / "cache"), SettingsFile(path))
    mode = trigger_mode_label(0)
    assert "Applied" in apply_settings(engine, mode, False, False, 3)
    assert engine.settings.live_preview_every == 3
    assert SettingsFile(path).apply(Settings()).live_preview_every == 3
    # not a whole N >= 0: refused with the field named, nothing changed
    for bad in (-1, 2.5):
        status = apply_settings(engine, mode, False, False, bad)
        assert "Not saved" in status and "live preview" in status
    assert engine.settings.live_preview_every == 3
