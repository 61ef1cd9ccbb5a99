"""Checkpoints: found in models/, architecture told from the file, loaded offline through the
same path a user's file takes, with weights exactly as written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from webui.arch import Arch, Prediction
from webui.engine.checkpoints import (
    CheckpointError,
    CheckpointFormat,
    checkpoint_from_path,
    detect_kind,
    find_checkpoints,
    load_checkpoint,
    read_header,
)
from webui.engine.model_factory import ModelSpec, build_pipeline

CPU = torch.device("cpu")
KINDS = [
    (Arch.SD1, Prediction.EPSILON, "SD1"),
    (Arch.SD2, Prediction.EPSILON, "SD2"),
    (Arch.SD2, Prediction.V, "SD2-v"),
    (Arch.SDXL, Prediction.EPSILON, "SDXL"),
]


@pytest.mark.parametrize(("arch", "prediction", "label"), KINDS)
def test_detects_architecture_from_keys(tiny_checkpoint_factory, arch, prediction, label) -> None:
    path = tiny_checkpoint_factory(arch, prediction)
    kind = detect_kind(read_header(path), path.name)
    assert kind.arch is arch
    assert kind.label == label


@pytest.mark.parametrize(("arch", "prediction", "label"), KINDS)
def test_single_file_loads_offline_with_exact_weights(
    tiny_checkpoint_factory, arch, prediction, label
) -> None:
    path = tiny_checkpoint_factory(arch, prediction)
    loaded = load_checkpoint(checkpoint_from_path(path), CPU, torch.float32)
    original = build_pipeline(ModelSpec(arch, prediction))  # same seed as the fixture's
    assert loaded.kind.label == label
    assert loaded.pipe.scheduler.config.prediction_type == prediction.value
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(original, name, None) is None:
            continue
        expected = getattr(original, name).state_dict()
        actual = getattr(loaded.pipe, name).state_dict()
        assert set(actual) >= set(expected) - {"text_model.embeddings.position_ids"}, name
        for key, tensor in expected.items():
            if key in actual:
                assert torch.equal(actual[key], tensor), f"{name}.{key}"


def test_ckpt_loads_through_weights_only(tiny_checkpoint_factory, tmp_path: Path) -> None:
    source = tiny_checkpoint_factory(Arch.SD1)
    state = safetensors.torch.load_file(str(source))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, ckpt)
    kind = detect_kind(read_header(ckpt), ckpt.name)
    assert kind.arch is Arch.SD1


def test_lora_file_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "style.safetensors"
    safetensors.torch.save_file(
        {"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4)}, str(path)
    )
    with pytest.raises(CheckpointError, match=r"style\.safetensors is a LoRA"):
        detect_kind(read_header(path), path.name)


def test_other_safetensors_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "random.safetensors"
    safetensors.torch.save_file({"foo.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        load_checkpoint(checkpoint_from_path(path), CPU, torch.float32)


def test_garbage_file_is_reported_by_name(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(CheckpointError, match=r"broken\.safetensors: cannot be read"):
        read_header(path)


def test_find_checkpoints(tiny_checkpoint_factory, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "sdxl").mkdir(parents=True)
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "first.safetensors")
    shutil.copy(tiny_checkpoint_factory(Arch.SDXL), models / "sdxl" / "second.safetensors")
    folder = models / "folder-model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "unet").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (models / "notes.txt").write_text("not a model")
    found = {c.name: c.format for c in find_checkpoints(models)}
    assert found == {
        "first": CheckpointFormat.SAFETENSORS,
        "sdxl/second": CheckpointFormat.SAFETENSORS,
        "folder-model": CheckpointFormat.DIFFUSERS,
    }


def test_file_missing_weights_is_refused(tiny_checkpoint_factory, tmp_path: Path) -> None:
    state = safetensors.torch.load_file(str(tiny_checkpoint_factory(Arch.SD1)))
    metadata = read_header(tiny_checkpoint_factory(Arch.SD1)).metadata
    dropped = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    del state[dropped]
    path = tmp_path / "partial.safetensors"
    safetensors.torch.save_file(state, str(path), metadata=dict(metadata))
    with pytest.raises(CheckpointError, match=r"partial\.safetensors lacks 1 weight"):
        load_checkpoint(checkpoint_from_path(path), CPU, torch.float32)
