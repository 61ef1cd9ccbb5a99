"""A checkpoint's embedded component configs are untrusted input: only the pipeline's own
component names are accepted, nothing is written outside the app's private config folder, and
that folder is private (0700) with an unpredictable name."""

from __future__ import annotations

import json
import stat
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch

from webui.arch import Arch
from webui.engine import checkpoints
from webui.engine.checkpoints import (
    CONFIGS_METADATA_KEY,
    MAX_EMBEDDED_CONFIGS_BYTES,
    CheckpointError,
    checkpoint_from_path,
    component_names,
    load_checkpoint,
    read_header,
)
from webui.engine.model_factory import config_folder

CPU = torch.device("cpu")


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temp folder moved three levels deep into tmp_path, so `../../x` from a folder
    made in it still lands inside tmp_path, where the test can look; a fresh config root."""
    temp = tmp_path / "a" / "b" / "tmp"
    temp.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(checkpoints, "_config_root", None)
    return temp


def _with_configs(source: Path, out: Path, embedded: str) -> Path:
    state = safetensors.torch.load_file(str(source))
    metadata = dict(read_header(source).metadata)
    metadata[CONFIGS_METADATA_KEY] = embedded
    safetensors.torch.save_file(state, str(out), metadata=metadata)
    return out


def _config_files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.name in ("config.json", "scheduler_config.json")}


def test_component_names_come_from_model_index() -> None:
    # configs/sdxl/model_index.json, read by hand: every entry with a library and a class
    assert component_names(config_folder(Arch.SDXL)) == {
        "scheduler",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "unet",
        "vae",
    }
    # sd15 lists safety_checker and feature_extractor as [null, null]: not components
    assert "safety_checker" not in component_names(config_folder(Arch.SD1))


@pytest.mark.parametrize("key", ["../../x", "ABSOLUTE", "unet/../../x"])
def test_component_names_outside_the_pipeline_are_refused(
    tiny_checkpoint_factory, private_tmp: Path, tmp_path: Path, key: str
) -> None:
    source = tiny_checkpoint_factory(Arch.SD1)
    target = tmp_path / "abs" / "dir"
    key = str(target) if key == "ABSOLUTE" else key
    configs = json.loads(read_header(source).metadata[CONFIGS_METADATA_KEY])
    configs[key] = {"planted": True}
    path = _with_configs(source, tmp_path / "evil.safetensors", json.dumps(configs))
    before = _config_files(tmp_path)

    with pytest.raises(CheckpointError, match=r"evil\.safetensors: .*unknown components"):
        load_checkpoint(checkpoint_from_path(path), CPU, torch.float32)

    assert _config_files(tmp_path) == before  # nothing written anywhere, inside or outside
    assert not target.exists()
    assert not (tmp_path / "a" / "x").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("embedded", "reason"),
    [
        ("[1, 2]", "JSON object of JSON objects"),
        ('{"unet": 3}', "JSON object of JSON objects"),
        ('{"unet": {"a": 1}', "not valid JSON"),
        ('{"unet": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}", "not valid JSON"),
        ('{"unet": {"a": ' + "9" * 5000 + "}}", "not valid JSON"),
        ('{"unet": {"a": "' + "x" * MAX_EMBEDDED_CONFIGS_BYTES + '"}}', "bytes, over the"),
    ],
    ids=["list", "not-objects", "truncated", "deep", "huge-int", "too-large"],
)
def test_malformed_config_metadata_is_a_clear_error(
    tiny_checkpoint_factory, private_tmp: Path, tmp_path: Path, embedded: str, reason: str
) -> None:
    path = _with_configs(tiny_checkpoint_factory(Arch.SD1), tmp_path / "odd.safetensors", embedded)
    with pytest.raises(CheckpointError, match=rf"odd\.safetensors: metadata .*{reason}"):
        load_checkpoint(checkpoint_from_path(path), CPU, torch.float32)


def test_config_cache_is_private_and_unpredictable(
    tiny_checkpoint_factory, private_tmp: Path
) -> None:
    load_checkpoint(checkpoint_from_path(tiny_checkpoint_factory(Arch.SD1)), CPU, torch.float32)
    root = checkpoints._private_config_root()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert root.parent == private_tmp
    assert root.name != "lora-webui-configs"  # the old shared, predictable name
    # the copy with the file's configs lives inside the private folder
    assert any((folder / "unet" / "config.json").is_file() for folder in root.iterdir())
    # a fresh root (another process) gets another name
    checkpoints._config_root = None
    assert checkpoints._private_config_root() != root
