"""The offline config folders in configs/ match the real Stable Diffusion hub repos."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from types import ModuleType

# Set before diffusers/transformers import huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import accelerate
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedModel,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
END = "<|endoftext|>"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that tries to open a network connection."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hub_is_offline() -> None:
    """The hub library sees HF_HUB_OFFLINE, so nothing here may fall back to a download."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE


@pytest.mark.parametrize(
    ("folder", "pad_token", "pad_id"),
    [
        ("sd15/tokenizer", END, 49407),
        ("sd21/tokenizer", "!", 0),
        ("sdxl/tokenizer", END, 49407),
        ("sdxl/tokenizer_2", "!", 0),
    ],
)
def test_tokenizer(folder: str, pad_token: str, pad_id: int) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(CONFIGS / folder, local_files_only=True)
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert tokenizer.pad_token == pad_token
    assert tokenizer.pad_token_id == pad_id
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == 49408


def test_tokenizer_files_are_small() -> None:
    for path in CONFIGS.rglob("*"):
        if path.is_file():
            assert path.stat().st_size < 3 * 1024 * 1024, path


def count_parameters(model: torch.nn.Module) -> int:
    """Return the number of parameters of `model` (meta tensors count too)."""
    return sum(parameter.numel() for parameter in model.parameters())


def build_text_encoder(folder: str, model_class: type[PreTrainedModel]) -> PreTrainedModel:
    """Build a text encoder from a config folder on the meta device."""
    config = CLIPTextConfig.from_pretrained(CONFIGS / folder, local_files_only=True)
    with accelerate.init_empty_weights():
        return model_class(config)


# Published parameter counts of the real models.
@pytest.mark.parametrize(
    ("folder", "parameters"),
    [("sd15/unet", 859_520_964), ("sd21/unet", 865_910_724), ("sdxl/unet", 2_567_463_684)],
)
def test_unet_size(folder: str, parameters: int) -> None:
    config = UNet2DConditionModel.load_config(CONFIGS / folder)
    with accelerate.init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    assert count_parameters(unet) == parameters


@pytest.mark.parametrize("folder", ["sd15/vae", "sd21/vae", "sdxl/vae"])
def test_vae_size(folder: str) -> None:
    config = AutoencoderKL.load_config(CONFIGS / folder)
    with accelerate.init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    assert count_parameters(vae) == 83_653_863


@pytest.mark.parametrize(
    ("folder", "model_class", "parameters"),
    [
        ("sd15/text_encoder", CLIPTextModel, 123_060_480),
        ("sd21/text_encoder", CLIPTextModel, 340_387_840),
        ("sdxl/text_encoder", CLIPTextModel, 123_060_480),
        ("sdxl/text_encoder_2", CLIPTextModelWithProjection, 694_659_840),
    ],
)
def test_text_encoder_size(
    folder: str, model_class: type[PreTrainedModel], parameters: int
) -> None:
    assert count_parameters(build_text_encoder(folder, model_class)) == parameters


def test_sdxl_text_encoders_differ_in_width() -> None:
    # The single-file loader tells SDXL's two encoders apart by their width.
    first = CLIPTextConfig.from_pretrained(CONFIGS / "sdxl/text_encoder", local_files_only=True)
    second = CLIPTextConfig.from_pretrained(CONFIGS / "sdxl/text_encoder_2", local_files_only=True)
    assert (first.hidden_size, second.hidden_size) == (768, 1280)


@pytest.mark.parametrize(
    ("model", "scheduler_class", "prediction_type"),
    [
        ("sd15", PNDMScheduler, "epsilon"),
        ("sd21", DDIMScheduler, "v_prediction"),
        ("sdxl", EulerDiscreteScheduler, "epsilon"),
    ],
)
def test_scheduler(model: str, scheduler_class: type[SchedulerMixin], prediction_type: str) -> None:
    scheduler = scheduler_class.from_pretrained(
        CONFIGS / model, subfolder="scheduler", local_files_only=True
    )
    assert scheduler.config.prediction_type == prediction_type
    assert scheduler.config.num_train_timesteps == 1000


@pytest.mark.parametrize(
    ("model", "pipeline_class"),
    [
        ("sd15", StableDiffusionPipeline),
        ("sd21", StableDiffusionPipeline),
        ("sdxl", StableDiffusionXLPipeline),
    ],
)
def test_model_index_lists_every_component(model: str, pipeline_class: type) -> None:
    index = json.loads((CONFIGS / model / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_class.__name__
    components = {name: value for name, value in index.items() if isinstance(value, list)}
    for name, (library, _class_name) in components.items():
        if library is not None:
            # Every component that from_single_file loads needs its own config folder.
            assert (CONFIGS / model / name).is_dir(), name
    # from_single_file loads a listed feature_extractor from the folder; ours has none.
    assert index.get("feature_extractor", [None])[0] is None


def test_sd21_unet_matches_openclip_h() -> None:
    config = UNet2DConditionModel.load_config(CONFIGS / "sd21/unet")
    assert config["cross_attention_dim"] == 1024
    assert config["attention_head_dim"] == [5, 10, 20, 20]
    assert config["use_linear_projection"] is True
    assert config["sample_size"] == 96


def load_build_script() -> ModuleType:
    """Import scripts/build_tokenizers.py, which is not part of a package."""
    path = CONFIGS.parent / "scripts" / "build_tokenizers.py"
    spec = importlib.util.spec_from_file_location("build_tokenizers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tokenizer_files_match_the_build_script() -> None:
    # The wheel needs a registry, so rebuild from the committed merges and compare everything else.
    build = load_build_script()
    merges_lines = (CONFIGS / "sd15/tokenizer/merges.txt").read_text(encoding="utf-8").split("\n")
    merges = build.parse_merges(merges_lines)
    vocab = build.build_vocab(merges)
    for folder in build.TOKENIZER_FOLDERS:
        for name, text in build.render_folder(folder, vocab, merges).items():
            assert (CONFIGS / folder.relative_path / name).read_text(encoding="utf-8") == text
