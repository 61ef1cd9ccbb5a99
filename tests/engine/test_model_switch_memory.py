"""A model switch frees the old model: after switching, nothing keeps the old pipeline alive,
whatever happened in between (generations with LoRAs applied, catalog refreshes)."""

from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path

import pytest
from engine_settings import cpu_settings
from lora_files import write_kohya_lora

from webui.arch import Arch
from webui.engine.generate import DEMO_MODEL_NAME, Engine, GenerationRequest

SMALL = {"width": 64, "height": 64, "steps": 1, "seed": 3}


@pytest.fixture
def engine(tmp_path: Path, tiny_checkpoint_factory) -> Engine:
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    loras.mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "a.safetensors")
    shutil.copy(tiny_checkpoint_factory(Arch.SD2), models / "b.safetensors")
    write_kohya_lora(loras / "ink.safetensors", Arch.SD1, {"ss_base_model_version": "sd_v1"})
    return Engine(cpu_settings(models, loras, tmp_path))


def test_a_switch_frees_the_old_pipeline(engine: Engine) -> None:
    gc.collect()
    for name, other in [("a", "b"), ("b", "a"), ("a", DEMO_MODEL_NAME), (DEMO_MODEL_NAME, "b")]:
        loaded = engine.load(name)
        pipe, unet = weakref.ref(loaded.pipe), weakref.ref(loaded.pipe.unet)
        prompt = "a cat <lora:ink:0.8>" if name == "a" else "a cat"
        engine.generate(GenerationRequest(prompt, **SMALL))  # LoRA state holds model tensors
        engine.catalog.refresh()
        del loaded
        engine.load(other)
        assert pipe() is None, f"the pipeline of {name} outlived the switch to {other}"
        assert unet() is None, f"the UNet of {name} outlived the switch to {other}"


def test_a_switch_frees_a_pipeline_caught_in_a_reference_cycle(engine: Engine) -> None:
    # exception tracebacks, offload hooks and adapters put models in cycles, which reference
    # counting alone never frees
    for name, other in [("a", "b"), ("b", "a"), ("a", "b")]:
        loaded = engine.load(name)
        loaded.pipe.unet.held_by = [loaded.pipe]
        pipe = weakref.ref(loaded.pipe)
        del loaded
        engine.load(other)
        assert pipe() is None, f"the pipeline of {name} outlived the switch to {other}"
        engine.catalog.refresh()


class _Node:
    cycle: _Node


def test_a_catalog_refresh_leaves_garbage_to_the_collector(engine: Engine) -> None:
    was_enabled = gc.isenabled()
    gc.disable()  # the garbage must still be there when the refresh runs
    try:
        node = _Node()
        node.cycle = node
        garbage = weakref.ref(node)
        del node
        engine.catalog.refresh()
    finally:
        if was_enabled:
            gc.enable()
    gc.collect()
    # gc.freeze() on refresh made it immortal: the collector never looks at frozen objects
    assert garbage() is None
