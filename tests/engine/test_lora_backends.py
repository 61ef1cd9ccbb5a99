"""The LoRA backend choice through the engine: native vs the diffusers fallback on the same
prompts, auto routing that mixes both, the infotext and result saying which backend applied
each LoRA, and the model exactly restored afterwards."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_settings import cpu_settings
from lora_files import (
    one_torch_thread,
    register_preset,
    tiny_pipeline_to_read,
    write_kohya_layers,
    write_lycoris,
    write_peft,
)
from pipeline_copies import pipeline_copy

import app
from webui.arch import Arch
from webui.engine.generate import Engine, GenerationRequest, GenerationResult, Progress, Stage
from webui.engine.infotext import Infotext, parse_infotext
from webui.engine.jobs import JobQueue
from webui.engine.lora_backends import NativeFit, choose_backend, native_fit, native_problem
from webui.networks.apply.diffusers_backend import has_peft_layers
from webui.networks.apply.keys import KeyMap
from webui.networks.format.network import load_network
from webui.settings import LoraBackend

SMALL = {"width": 64, "height": 64, "steps": 3, "seed": 5}
MAX_PIXEL_DIFF = 1  # 8-bit levels; fp32 on the CPU


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint_factory) -> Path:
    root = tmp_path_factory.mktemp("backends")
    (root / "models").mkdir()
    loras = root / "loras"
    loras.mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), root / "models" / "tiny.safetensors")
    with one_torch_thread():
        pipe = tiny_pipeline_to_read(Arch.SD1)  # the LyCORIS writers patch copies of it
        write_kohya_layers(
            loras / "ink.safetensors",
            pipe,
            Arch.SD1,
            include=lambda component, path: component != "unet" or ".attentions." in path,
            std=0.15,
        )
        with pytest.MonkeyPatch.context() as monkeypatch:
            preset = register_preset(monkeypatch, "engine-backends")
            write_lycoris(pipeline_copy(pipe), loras / "locon.safetensors", preset=preset,
                          algo="locon", conv_dim=8, conv_alpha=2, std=0.05)  # fmt: skip
            write_lycoris(pipeline_copy(pipe), loras / "loha.safetensors", preset=preset,
                          algo="loha", std=0.05)  # fmt: skip
        peft = write_peft(pipeline_copy(pipe), root / "peft")
        shutil.copy(peft, loras / "peft.safetensors")
    return root


@pytest.fixture
def engine(folders: Path, tmp_path: Path) -> Engine:
    settings = cpu_settings(folders / "models", folders / "loras", tmp_path, save_outputs=False)
    engine = Engine(settings)
    engine.load("tiny")
    return engine


def render(
    engine: Engine, prompt: str, backend: LoraBackend | None = None
) -> tuple[np.ndarray, GenerationResult]:
    result = engine.generate(GenerationRequest(prompt, lora_backend=backend, **SMALL))
    return np.asarray(result.images[0].image).astype(np.int16), result


def model_weights(engine: Engine) -> dict[str, torch.Tensor]:
    pipe = engine.model.pipe
    return {
        f"{c}.{k}": t.clone()
        for c in ("text_encoder", "unet")
        for k, t in getattr(pipe, c).state_dict().items()
    }


def assert_at_base(engine: Engine, weights: dict[str, torch.Tensor], image: np.ndarray) -> None:
    again, _ = render(engine, "a cat")
    assert np.array_equal(again, image)
    assert not has_peft_layers(engine.model.pipe)
    now = model_weights(engine)
    assert set(now) == set(weights)
    for key, tensor in now.items():
        assert torch.equal(tensor, weights[key]), key


@pytest.mark.parametrize(
    "tag",
    [
        "<lora:ink:0.8>",
        "<lora:locon:1>",
        "<lora:peft:0.7>",
        "<lora:ink:te=0.2:unet=1>",
        "<lora:locon:1:in=0:mid=0.5:out=1>",
        "<lora:ink:1:lbw=1,0,1,0,1,0,1,0.5,1,0,1,0,1,0,1,0,1>",
        "<lora:ink:te=0@0,1@3:unet=1@0,0.2@3>",  # per-step schedules
        "<lora:ink:0.6> <lora:peft:0.5>",
        "<lora:ink:te=0@0,1@3> <lora:ink:0.5>",  # one file twice: multipliers add
    ],
)
def test_diffusers_backend_matches_native(engine: Engine, tag: str) -> None:
    with one_torch_thread():
        base, _ = render(engine, "a cat")
        weights = model_weights(engine)
        native, native_result = render(engine, f"a cat {tag}", LoraBackend.NATIVE)
        fallback, result = render(engine, f"a cat {tag}", LoraBackend.DIFFUSERS)
        assert result.warnings == native_result.warnings
        assert not any("diffusers" in warning for warning in result.warnings)
        difference = int(np.abs(native - fallback).max())
        print(f"{tag}: max pixel difference native vs diffusers {difference}")
        assert difference <= MAX_PIXEL_DIFF
        assert int(np.abs(native - base).max()) > 5 * MAX_PIXEL_DIFF
        assert {r.backend for r in result.lora_routes} == {LoraBackend.DIFFUSERS}
        assert all(r.applied for r in result.lora_routes)
        backends = result.images[0].infotext.params["Lora backend"]
        assert backends == ", ".join(
            dict.fromkeys(f"{r.name}=diffusers" for r in result.lora_routes)
        )
        assert_at_base(engine, weights, base)


def test_auto_mixes_backends_per_lora(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA native maps nothing of goes to diffusers, the others stay native, in one prompt."""
    real = native_fit

    def fit(network, keymap):  # native pretends it maps nothing of the LoCon
        if network.name == "locon":
            return NativeFit(0, 3, "3 module(s) native does not map")
        return real(network, keymap)

    monkeypatch.setattr("webui.engine.lora_backends.native_fit", fit)
    with one_torch_thread():
        base, _ = render(engine, "a cat")
        weights = model_weights(engine)
        native, _ = render(engine, "a cat <lora:ink:0.8> <lora:locon:1>", LoraBackend.NATIVE)
        mixed, result = render(engine, "a cat <lora:ink:0.8> <lora:locon:1>")
        assert int(np.abs(native - mixed).max()) <= MAX_PIXEL_DIFF
        ink, locon = result.lora_routes
        assert (ink.backend, locon.backend) == (LoraBackend.NATIVE, LoraBackend.DIFFUSERS)
        assert locon.reason == "auto: native maps none of it (3 module(s) native does not map)"
        assert ink.applied and locon.applied
        text = result.images[0].infotext.format()
        assert 'Lora backend: "ink=native, locon=diffusers"' in text
        assert parse_infotext(text).params["Lora backend"] == "ink=native, locon=diffusers"
        assert_at_base(engine, weights, base)


def test_forced_fallback_on_loha_warns_and_generates_without_it(engine: Engine) -> None:
    with one_torch_thread():
        base, _ = render(engine, "a cat")
        image, result = render(engine, "a cat <lora:loha:1>", LoraBackend.DIFFUSERS)
        (warning,) = result.warnings
        assert warning.startswith("loha.safetensors: diffusers cannot load it: loha layers")
        assert np.array_equal(image, base)
        (route,) = result.lora_routes
        assert not route.applied and "not applied" in route.describe()
        assert "Lora backend" not in result.images[0].infotext.params
        assert not has_peft_layers(engine.model.pipe)


def test_fused_fallback_then_native_restores_exactly(folders: Path, tmp_path: Path) -> None:
    settings = cpu_settings(
        folders / "models",
        folders / "loras",
        tmp_path,
        save_outputs=False,
        lora_backend=LoraBackend.DIFFUSERS,
        lora_fuse=True,
    )
    engine = Engine(settings)
    engine.load("tiny")
    with one_torch_thread():
        base, _ = render(engine, "a cat")
        weights = model_weights(engine)
        fused, _ = render(engine, "a cat <lora:locon:1>")
        assert engine._networks is not None and engine._networks.fallback.is_fused
        native, _ = render(engine, "a cat <lora:locon:1>", LoraBackend.NATIVE)
        assert int(np.abs(native - fused).max()) <= MAX_PIXEL_DIFF
        render(engine, "a cat <lora:locon:1>")  # fused again, after native wrote the weights
        render(engine, "a cat <lora:ink:1>", LoraBackend.NATIVE)
        assert_at_base(engine, weights, base)


def test_choose_backend_rules() -> None:
    """auto never drops what it can apply: native takes every file it maps, in full or in part
    (naming what is left out); diffusers only a file native maps nothing of."""
    auto = LoraBackend.AUTO
    full, part = NativeFit(5, 5, None), NativeFit(3, 5, "2 module(s) native does not map")
    nothing = NativeFit(0, 5, "5 module(s) native does not map")
    assert choose_backend("a", auto, full, None).backend is LoraBackend.NATIVE
    partial = choose_backend("a", auto, part, None)  # even when diffusers could load it
    assert partial.backend is LoraBackend.NATIVE
    assert partial.reason == (
        "auto: native applies 3 of 5 modules; left out: 2 module(s) native does not map"
    )
    route = choose_backend("a", auto, nothing, None)
    assert route.backend is LoraBackend.DIFFUSERS
    assert route.reason == "auto: native maps none of it (5 module(s) native does not map)"
    neither = choose_backend("a", auto, nothing, "loha layers")
    assert (
        neither.backend is LoraBackend.NATIVE and "diffusers cannot (loha layers)" in neither.reason
    )
    forced = choose_backend("a", LoraBackend.DIFFUSERS, full, "loha layers")
    assert forced.backend is LoraBackend.DIFFUSERS
    assert choose_backend("a", LoraBackend.NATIVE, part, None).backend is LoraBackend.NATIVE


def test_native_problem_names_unmatched_modules(folders: Path) -> None:
    """An SD1 file on an SDXL model: native maps none of its UNet modules."""
    with one_torch_thread():
        keymap = KeyMap.from_pipeline(tiny_pipeline_to_read(Arch.SDXL))
        sd1 = KeyMap.from_pipeline(tiny_pipeline_to_read(Arch.SD1))
    network = load_network(folders / "loras" / "locon.safetensors")
    assert native_problem(network, sd1) is None
    problem = native_problem(network, keymap)
    assert problem is not None and "native does not map to this model" in problem


@pytest.mark.parametrize(
    "argv",
    [
        ["--lora-backend", "diffusers"],
        [
            "generate",
            "--model",
            "demo",
            "--prompt",
            "x",
            "--out",
            "o.png",
            "--lora-backend",
            "diffusers",
        ],
        [
            "--lora-backend",
            "diffusers",
            "generate",
            "--model",
            "demo",
            "--prompt",
            "x",
            "--out",
            "o.png",
        ],
    ],
)
def test_lora_backend_flag(argv: list[str]) -> None:
    args = app.build_parser().parse_args(argv)
    assert app.settings_from(args).lora_backend is LoraBackend.DIFFUSERS
    assert app.settings_from(app.build_parser().parse_args([])).lora_backend is LoraBackend.AUTO


def test_lora_backend_infotext_quoting() -> None:
    """A1111 quotes values with commas; one LoRA needs no quotes."""
    many = Infotext("p", "", {"Steps": "3", "Seed": "1", "Lora backend": "a=native, b=diffusers"})
    assert 'Lora backend: "a=native, b=diffusers"' in many.format()
    one = Infotext("p", "", {"Steps": "3", "Seed": "1", "Lora backend": "name=diffusers"})
    assert "Lora backend: name=diffusers" in one.format()
    assert parse_infotext(many.format()).params["Lora backend"] == "a=native, b=diffusers"


def test_merge_lora_option_is_not_read_as_lora_backend() -> None:
    """`merge --lora F` next to a global `--lora-backend`: no prefix ambiguity."""
    args = app.build_parser().parse_args(["merge", "--model", "m", "--lora", "x:0.5", "--out", "o"])
    assert args.loras == ["x:0.5"] and args.lora_backend == "auto"


def test_applying_loras_reports_progress_in_modules_before_the_steps(
    engine: Engine, folders: Path
) -> None:
    """A LoRA's modules are written before the first step, and the UI's bar follows them; the
    job queue's step counters (what the API reports) only count denoising steps."""
    seen: list[Progress] = []
    queue = JobQueue(engine)
    statuses: list[tuple[int, int]] = []

    def on_progress(progress: Progress) -> None:
        seen.append(progress)
        status = queue.status()
        statuses.append((status.step, status.total))

    queue.generate(GenerationRequest("a cat <lora:ink:1>", **SMALL), on_progress=on_progress)
    loras = [p for p in seen if p.stage is Stage.LORAS]
    steps = [p for p in seen if p.stage is Stage.DENOISE]
    modules = len(load_network(folders / "loras" / "ink.safetensors").modules)  # all match
    assert loras and seen[: len(loras)] == loras  # all before the first step
    assert loras[-1].step == loras[-1].total == modules
    assert [p.step for p in loras] == sorted({p.step for p in loras})  # rising, once per percent
    assert len(loras) <= 101
    assert loras[0].description == f"Applying LoRAs: {loras[0].step}/{modules} modules"
    assert [p.step for p in steps] == list(range(1, SMALL["steps"] + 1))
    assert statuses[: len(loras)] == [(0, 0)] * len(loras)
    assert statuses[-1] == (SMALL["steps"], SMALL["steps"])

    seen.clear()
    queue.generate(GenerationRequest("a cat <lora:ink:1>", **SMALL), on_progress=on_progress)
    assert all(p.stage is Stage.DENOISE for p in seen)  # the same set again writes nothing


@pytest.mark.parametrize(("lowvram", "keeps"), [(False, True), (True, False)])
def test_lowvram_gives_back_the_memory_of_patched_weights(
    folders: Path, tmp_path: Path, lowvram: bool, keeps: bool
) -> None:
    """Without LoRAs in the prompt the model is restored; the patched tensors it let go of are
    kept for the next LoRA prompt, unless the app runs with --lowvram."""
    settings = cpu_settings(
        folders / "models", folders / "loras", tmp_path, save_outputs=False, lowvram=lowvram
    )
    engine = Engine(settings)
    engine.load("tiny")
    with one_torch_thread():
        base, _ = render(engine, "a cat")
        weights = model_weights(engine)
        render(engine, "a cat <lora:ink:1>")
        render(engine, "a cat")
        assert engine._networks is not None
        assert (engine._networks.native.spare_bytes > 0) is keeps
        assert_at_base(engine, weights, base)
