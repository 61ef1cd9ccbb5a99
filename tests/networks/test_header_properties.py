"""Standing guards: whatever bytes a LoRA file holds, reading its header or loading it gives a
NetworkFileError or a valid result, quickly and without allocating what the header claims."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from webui.networks.format.files import NetworkFileError, read_header
from webui.networks.format.modules import BoftModule, Ia3Module, NetworkModule, OftModule
from webui.networks.format.network import Network, read_network

NAMES = st.sampled_from(
    [
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight",
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight",
        "lora_unet_mid_block_attentions_0_proj_in.alpha",
        "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a",
        "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_b",
        "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w2_a",
        "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w2_b",
        "lora_unet_conv_in.lokr_w1",
        "lora_unet_conv_in.lokr_w2",
        "lora_unet_conv_in.oft_blocks",
        "lora_unet_conv_in.rescale",
        "lora_unet_conv_in.dora_scale",
        "lora_unet_conv_in.diff",
        "lora_unet_conv_in.diff_b",
        "lora_unet_conv_in.on_input",
        "lora_unet_conv_in.weight",
        "unet.mid_block.attentions.0.proj_in.lora_A.weight",
        "unet.mid_block.attentions.0.proj_in.lora_B.weight",
    ]
)
SMALL_INT = st.integers(min_value=-3, max_value=70)
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
ENTRY = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": st.one_of(
                st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F64"]),
                st.text(max_size=5),
            ),
            "shape": st.lists(st.one_of(SMALL_INT, JSON_LEAF), max_size=5),
            "data_offsets": st.lists(st.one_of(SMALL_INT, st.integers()), max_size=3),
        }
    ),
    JSON_LEAF,
    st.lists(JSON_LEAF, max_size=3),
)
HEADER = st.dictionaries(
    st.one_of(NAMES, st.just("__metadata__"), st.text(max_size=6)),
    st.one_of(ENTRY, st.dictionaries(st.text(max_size=4), JSON_LEAF, max_size=3)),
    max_size=5,
)


def _file(directory: str, raw: bytes) -> Path:
    path = Path(directory) / "x.safetensors"
    path.write_bytes(raw)
    return path


def _header_bytes(header: object, declared_length: int | None, data: bytes) -> bytes:
    body = json.dumps(header).encode()
    length = len(body) if declared_length is None else declared_length
    return struct.pack("<Q", length) + body + data


def _read_both(path: Path) -> None:
    """read_header and read_network: a valid result or a NetworkFileError, nothing else."""
    for read in (read_header, read_network):
        try:
            result = read(path)
        except NetworkFileError as error:
            assert error.path == path
        else:
            assert result is not None
            if isinstance(result, Network):
                for module in result.modules.values():
                    _delta_on_a_fitting_weight(module)


def _delta_on_a_fitting_weight(module: NetworkModule) -> None:
    """A module that loaded computes its delta on a weight it accepts (the planning and delta
    math the patcher will run), finite in shape."""
    if isinstance(module, Ia3Module):
        shape: tuple[int, ...] = (module.channels, module.channels)
    elif isinstance(module, OftModule | BoftModule):
        shape = (module.out_features, 3)
    else:
        shape = module.expected_shape or ()
    if not shape or not module.accepts(shape):
        return
    weight = torch.linspace(-1, 1, math.prod(shape)).reshape(shape)
    delta = module.weight_delta(weight, 0.5, torch.zeros(shape[0]))
    if delta.weight is not None:
        assert delta.weight.numel() == weight.numel()


@settings(max_examples=150)
@given(
    header=HEADER,
    declared=st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
    data=st.binary(max_size=64),
)
def test_garbled_headers_give_only_file_errors(
    header: dict, declared: int | None, data: bytes
) -> None:
    with TemporaryDirectory() as directory:
        _read_both(_file(directory, _header_bytes(header, declared, data)))


@settings(max_examples=80)
@given(raw=st.binary(max_size=200), cut=st.integers(min_value=0, max_value=400))
def test_random_bytes_and_cut_files_give_only_file_errors(raw: bytes, cut: int) -> None:
    with TemporaryDirectory() as directory:
        _read_both(_file(directory, raw))
        valid = Path(directory) / "valid.safetensors"
        save_file({"lora_unet_conv_in.lora_up.weight": torch.ones(4, 2)}, str(valid))
        valid.write_bytes(valid.read_bytes()[:cut])
        _read_both(valid)


SHAPE = st.lists(st.integers(min_value=0, max_value=6), max_size=4)


@settings(max_examples=120)
@given(
    tensors=st.dictionaries(
        NAMES,
        st.tuples(SHAPE, st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool])),
        min_size=1,
        max_size=6,
    )
)
def test_random_tensor_dicts_under_lora_names_load_or_are_refused(tensors: dict) -> None:
    with TemporaryDirectory() as directory:
        path = Path(directory) / "random.safetensors"
        save_file(
            {name: torch.ones(shape, dtype=dtype) for name, (shape, dtype) in tensors.items()},
            str(path),
        )
        _read_both(path)


def _timed_refusal(raw: bytes) -> float:
    with TemporaryDirectory() as directory:
        path = _file(directory, raw)
        started = time.perf_counter()
        try:
            read_header(path)
        except NetworkFileError:
            pass
        else:
            raise AssertionError("accepted")
        return time.perf_counter() - started


def test_deep_json_and_huge_integers_are_refused_quickly() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    huge_int = b'{"t": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'
    for body in (deep, b'{"t": ' + deep + b"}", huge_int):
        raw = struct.pack("<Q", len(body)) + body
        # generous: each is refused in milliseconds; the bound only catches blow-ups
        assert _timed_refusal(raw) < 2.0


def test_huge_declared_header_length_is_refused_without_reading() -> None:
    raw = struct.pack("<Q", 2**63) + b"{}"
    assert _timed_refusal(raw) < 1.0
