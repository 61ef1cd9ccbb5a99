"""LoRA file reading: safetensors headers, hashes as A1111/civitai compute them, safe pickles."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from webui.networks.format.files import (
    NetworkFileError,
    SafetensorsHeader,
    TensorInfo,
    compute_hashes,
    load_tensors,
    read_header,
    read_metadata,
    read_shapes,
)

TENSORS = {
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32),
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4),
    "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    "lora_te_encoder_layers_0_mlp_fc1.hada_w1_a": torch.randn(16, 3, dtype=torch.float16),
}
METADATA = {"ss_base_model_version": "sd_v1", "ss_network_dim": "4", "ss_tag": '{"a": 1}'}


@pytest.fixture
def lora_file(tmp_path: Path) -> Path:
    path = tmp_path / "net.safetensors"
    save_file(TENSORS, str(path), metadata=METADATA)
    return path


def _data_section(path: Path) -> bytes:
    # Located from the end: the data section is exactly the tensors' bytes, no header parsing.
    raw = path.read_bytes()
    data_bytes = sum(t.numel() * t.element_size() for t in TENSORS.values())
    return raw[len(raw) - data_bytes :]


def test_header_reads_metadata_and_tensor_table(lora_file: Path) -> None:
    header = read_header(lora_file)
    assert isinstance(header, SafetensorsHeader)
    assert header.metadata == METADATA
    assert set(header.tensors) == set(TENSORS)
    with safe_open(str(lora_file), framework="pt") as reference:
        assert reference.metadata() == METADATA
        for name in reference.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            info = header.tensors[name]
            assert info.shape == tuple(reference.get_slice(name).get_shape())
    assert header.tensors["lora_te_encoder_layers_0_mlp_fc1.hada_w1_a"].dtype == "F16"
    assert header.shapes["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"] == ()
    assert header.data_start == lora_file.stat().st_size - len(_data_section(lora_file))
    assert read_metadata(lora_file) == METADATA


def test_hashes_match_hashlib_over_independently_located_bytes(lora_file: Path) -> None:
    raw = lora_file.read_bytes()
    hashes = compute_hashes(lora_file, chunk_bytes=7)  # tiny chunks cross the header boundary
    assert hashes.sha256 == hashlib.sha256(raw).hexdigest()
    assert hashes.autov2 == hashlib.sha256(raw).hexdigest()[:10]
    expected_v3 = hashlib.sha256(_data_section(lora_file)).hexdigest()
    assert hashes.addnet_sha256 == expected_v3
    assert hashes.autov3 == expected_v3[:12]
    assert compute_hashes(lora_file) == hashes


def test_hand_written_file_with_known_bytes(tmp_path: Path) -> None:
    header_json = json.dumps(
        {
            "__metadata__": {"modelspec.architecture": "stable-diffusion-v1/lora"},
            "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        },
        separators=(",", ":"),
    ).encode()
    data = struct.pack("<2f", 1.5, -2.0)
    raw = struct.pack("<Q", len(header_json)) + header_json + data
    path = tmp_path / "hand.safetensors"
    path.write_bytes(raw)

    header = read_header(path)
    assert header.header_size == len(header_json)
    assert header.tensors == {"w": TensorInfo(dtype="F32", shape=(2,), data_offsets=(0, 8))}
    assert header.metadata == {"modelspec.architecture": "stable-diffusion-v1/lora"}
    hashes = compute_hashes(path)
    assert hashes.autov2 == hashlib.sha256(raw).hexdigest()[:10]
    assert hashes.autov3 == hashlib.sha256(data).hexdigest()[:12]
    assert torch.equal(load_tensors(path)["w"], torch.tensor([1.5, -2.0]))


@pytest.mark.parametrize(
    "keep", [0, 5, 8, 20, -1], ids=["empty", "in-length", "length", "in-header", "in-data"]
)
def test_truncated_file_names_the_path(lora_file: Path, keep: int) -> None:
    raw = lora_file.read_bytes()
    lora_file.write_bytes(raw[:keep])
    with pytest.raises(NetworkFileError) as caught:
        read_header(lora_file)
    assert str(lora_file) in str(caught.value)
    assert caught.value.path == lora_file
    with pytest.raises(NetworkFileError):
        load_tensors(lora_file)


@pytest.mark.parametrize(
    "raw",
    [b"\xff" * 64, struct.pack("<Q", 4) + b"nope", struct.pack("<Q", 2) + b"[]"],
    ids=["random", "bad-json", "json-array"],
)
def test_garbage_file_is_refused(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(raw)
    with pytest.raises(NetworkFileError, match=r"garbage\.safetensors"):
        read_header(path)


def test_pickle_loads_weights_and_unwraps_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"a.lora_up.weight": torch.ones(2, 2), "a.alpha": 2}}, path)
    tensors = load_tensors(path)
    assert torch.equal(tensors["a.lora_up.weight"], torch.ones(2, 2))
    assert tensors["a.alpha"].item() == 2.0
    assert read_shapes(path) == {"a.lora_up.weight": (2, 2), "a.alpha": ()}
    assert compute_hashes(path).autov3 is None
    assert compute_hashes(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


class Payload:
    """Stands for arbitrary code a malicious pickle would run on load."""


def test_pickle_with_non_tensor_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"a.lora_up.weight": torch.ones(1), "x": Payload()}, path)
    with pytest.raises(NetworkFileError, match=r"evil\.pt.*weights_only"):
        load_tensors(path)


def test_safetensors_load_tensors_round_trip(lora_file: Path) -> None:
    tensors = load_tensors(lora_file)
    assert set(tensors) == set(TENSORS)
    for name, tensor in TENSORS.items():
        assert torch.equal(tensors[name], tensor)
    assert read_shapes(lora_file) == {k: tuple(v.shape) for k, v in TENSORS.items()}
