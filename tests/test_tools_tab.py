"""The Tools tab's handlers on a real engine (tiny SD1 checkpoint, LoRAs in its folder): each
form writes its file where the user will look for it, reports progress and a summary, and turns
every bad value into one line naming it. The extraction math itself is tested in
test_extract.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from engine_settings import cpu_settings
from lora_files import write_kohya_lora
from safetensors import safe_open

from webui.arch import Arch
from webui.engine.generate import Engine, GenerationRequest
from webui.engine.merge import merge_checkpoint
from webui.ui import build_ui
from webui.ui.tools_tab import (
    RankChoice,
    RankMode,
    Source,
    lora_list_prompt,
    run_bake,
    run_combination,
    run_difference,
)

RANK_8 = RankChoice(RankMode.FIXED, 8, 0.95, 0)
ENERGY = RankChoice(RankMode.ENERGY, 8, 0.9, 4)


class Recorder:
    """Stands in for gr.Progress: remembers every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, int], str]] = []

    def __call__(self, fraction: tuple[int, int], desc: str = "", unit: str = "") -> None:
        self.calls.append((fraction, desc))


@pytest.fixture
def engine(tmp_path: Path, tiny_checkpoint_factory) -> Engine:
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    loras.mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "tiny.safetensors")
    metadata = {"ss_base_model_version": "sd_v1"}
    write_kohya_lora(loras / "ink.safetensors", Arch.SD1, metadata)
    write_kohya_lora(loras / "fox.safetensors", Arch.SD1, metadata)
    settings = cpu_settings(models, loras, tmp_path, save_outputs=False)
    return Engine(settings)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


def _delta_norms(path: Path) -> dict[str, float]:
    """||alpha / rank * up @ down|| of each module of a kohya LoRA file, computed by hand, by
    module name (CLIP's `text_model_` left out: the test files are written without it)."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key).float() for key in handle.keys()}  # noqa: SIM118
    norms: dict[str, float] = {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            up = tensors[f"{name}.lora_up.weight"]
            scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
            module = name.replace("lora_te_text_model_", "lora_te_")
            norms[module] = float((up.flatten(1) @ down.flatten(1)).norm()) * scale
    return norms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ink:0.8\nfox", "<lora:ink:0.8> <lora:fox>"),
        ("ink:0.8, fox:-1", "<lora:ink:0.8> <lora:fox:-1>"),
        ("<lora:ink:0.5:1> and\n\nfox", "<lora:ink:0.5:1> and <lora:fox>"),
    ],
)
def test_lora_list_becomes_prompt_tags(text: str, expected: str) -> None:
    assert lora_list_prompt(text) == expected


def test_extract_a_listed_combination_into_the_lora_folder(engine: Engine) -> None:
    progress = Recorder()

    shown = run_combination(
        engine, Source.LIST, "ink:0.7\nfox:-0.4", "tiny", RANK_8, "fp16", "combo", progress
    )

    out = engine.settings.loras_dir / "combo.safetensors"
    assert out.is_file() and str(out) in shown and "Relative error" in shown
    assert "combo" in [f.name for f in engine.catalog.files]
    assert _metadata(out)["modelspec.merged_from"] == "ink.safetensors:0.7, fox.safetensors:-0.4"
    assert progress.calls[-1][0][0] == progress.calls[-1][0][1] > 10
    with safe_open(str(out), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}  # noqa: SIM118

    again = run_combination(engine, Source.LIST, "ink", "tiny", RANK_8, "fp32", "combo", Recorder())
    assert "exists already" in again and "Traceback" not in again


def test_extract_the_last_generations_set(engine: Engine) -> None:
    empty = run_combination(engine, Source.LAST, "", "tiny", ENERGY, "fp32", "last", Recorder())
    assert "generate with some first" in empty

    engine.load("tiny")
    engine.generate(
        GenerationRequest(
            "a fox <lora:ink:0.5> <lora:fox:te=0:unet=1>", steps=1, width=64, height=64
        )
    )
    shown = run_combination(engine, Source.LAST, "", "tiny", ENERGY, "fp32", "last", Recorder())

    out = engine.settings.loras_dir / "last.safetensors"
    assert out.is_file(), shown
    merged_from = _metadata(out)["modelspec.merged_from"]
    assert merged_from == "ink.safetensors:0.5, fox.safetensors:te=0 unet=1"
    recorded = json.loads(_metadata(out)["lora_webui.extraction"])
    assert recorded["rule"] == {"rank": None, "energy": 0.9, "max_rank": 4}
    # fox has te=0: only ink changes the text encoder
    assert all(m["rank"] <= 4 for m in recorded["modules"].values())
    # ink and fox are the same file, so the text encoder gets 0.5 x its delta and the UNet 1.5 x;
    # energy 0.9 keeps at least sqrt(0.9) of each delta's norm
    source, extracted = (
        _delta_norms(engine.settings.loras_dir / "ink.safetensors"),
        _delta_norms(out),
    )
    assert extracted.keys() == source.keys()
    for name, norm in extracted.items():
        strength = 0.5 if name.startswith("lora_te") else 1.5
        assert 0.9**0.5 * strength - 1e-4 < norm / source[name] < strength + 1e-4, name


def test_bad_values_get_one_line_naming_them(engine: Engine) -> None:
    unknown = run_combination(
        engine, Source.LIST, "nope:1", "tiny", RANK_8, "fp32", "x", Recorder()
    )
    assert "nope" in unknown and "lw-warnings" in unknown
    no_model = run_combination(engine, Source.LIST, "ink", None, RANK_8, "fp32", "x", Recorder())
    assert "Checkpoint: choose a checkpoint" in no_model
    bad_name = run_combination(
        engine, Source.LIST, "ink", "tiny", RANK_8, "fp32", "../escape", Recorder()
    )
    assert "Output name" in bad_name
    same = run_difference(engine, "tiny", "tiny", RANK_8, "fp32", "d", Recorder())
    assert "another checkpoint than the base" in same
    assert (
        not list(engine.settings.loras_dir.glob("x*"))
        and not (engine.settings.loras_dir.parent / "escape.safetensors").exists()
    )


def test_difference_and_bake(engine: Engine) -> None:
    models = engine.settings.models_dir
    merge_checkpoint(
        models / "tiny.safetensors",
        [(engine.settings.loras_dir / "ink.safetensors", 1.0)],
        models / "tuned.safetensors",
    )

    shown = run_difference(engine, "tiny", "tuned", RANK_8, "fp32", "diff", Recorder())
    difference = engine.settings.loras_dir / "diff.safetensors"
    assert difference.is_file(), shown
    assert "Relative error" in shown
    recorded = json.loads(_metadata(difference)["lora_webui.extraction"])
    assert (recorded["base_model"], recorded["tuned_model"]) == (
        "tiny.safetensors",
        "tuned.safetensors",
    )
    # tuned = tiny + ink at 1: the difference is ink's delta (rank 4 < 8, so kept whole)
    source = _delta_norms(engine.settings.loras_dir / "ink.safetensors")
    assert _delta_norms(difference) == pytest.approx(source, rel=1e-3)

    progress = Recorder()
    baked = run_bake(engine, "tiny", "ink:0.5\nfox:0.25", "fp16", "baked", progress)
    assert (models / "baked.safetensors").is_file(), baked
    assert "ink ×0.5" in baked and progress.calls[0][1].startswith("loading")
    merged_from = _metadata(models / "baked.safetensors")["modelspec.merged_from"]
    assert merged_from == "tiny.safetensors, ink.safetensors:0.5, fox.safetensors:0.25"
    blocks = run_bake(engine, "tiny", "<lora:ink:1:0.5>", "fp16", "baked2", Recorder())
    assert "one strength per LoRA" in blocks


def test_the_app_has_a_tools_tab(engine: Engine) -> None:
    ui = build_ui(engine)
    ids = {block.elem_id for block in ui.blocks.values()}
    assert {"extract-go", "difference-go", "bake-go"} <= ids


def _markdown_texts(engine: Engine) -> str:
    ui = build_ui(engine)
    return "\n".join(
        str(getattr(b, "value", "")) for b in ui.blocks.values() if b.get_block_name() == "markdown"
    )


def test_an_empty_models_folder_is_explained(engine: Engine) -> None:
    assert "No checkpoint in" not in _markdown_texts(engine)
    for checkpoint in engine.settings.models_dir.iterdir():
        checkpoint.unlink()
    assert f"No checkpoint in `{engine.settings.models_dir}`" in _markdown_texts(engine)
