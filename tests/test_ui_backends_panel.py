"""The LoRA backends panel under the image never gives a backend choice's reason ("native maps
every module") for a LoRA that was not written: it says "not applied" and why."""

from __future__ import annotations

import shutil
from pathlib import Path

from engine_settings import cpu_settings
from lora_files import write_kohya_lora

from tests.test_generation_loras import SMALL
from webui.arch import Arch
from webui.engine.generate import Engine, GenerationRequest
from webui.engine.lora_backends import LoraRoute
from webui.settings import LoraBackend
from webui.ui.txt2img import infotext_panels, route_line


def test_an_applied_route_gives_its_backend_and_reason() -> None:
    route = LoraRoute("ink", LoraBackend.NATIVE, "auto: native maps every module", applied=True)
    assert (
        route_line(route) == "ink: applied by the native backend (auto: native maps every module)"
    )


def test_a_route_not_applied_gives_the_warning_that_names_it() -> None:
    route = LoraRoute("styles/ink", LoraBackend.NATIVE, "auto: native maps every module")
    warnings = ["other: made for SDXL", "ink: not applied (module up.0: shapes differ)"]
    line = route_line(route, warnings)
    assert line == "styles/ink: not applied (ink: not applied (module up.0: shapes differ))"
    assert route_line(route) == "styles/ink: not applied; see the warnings"


def test_a_wrong_base_lora_is_reported_not_applied(tmp_path: Path, tiny_checkpoint_factory) -> None:
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    loras.mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "tiny.safetensors")
    write_kohya_lora(loras / "ink.safetensors", Arch.SD1, {"ss_base_model_version": "sd_v1"})
    write_kohya_lora(
        loras / "xl-only.safetensors", Arch.SDXL, {"ss_base_model_version": "sdxl_base_v1-0"}
    )
    engine = Engine(cpu_settings(models, loras, tmp_path))
    engine.load("tiny")
    result = engine.generate(GenerationRequest("a cat <lora:ink:1> <lora:xl-only:1>", **SMALL))
    panel = infotext_panels(result)[0]
    assert "<li>ink: applied by the native backend (" in panel
    assert "<li>xl-only: not applied (xl-only: made for SDXL" in panel
    assert "xl-only: native backend" not in panel
    assert panel.count("maps every module") <= 1  # ink's line only
