"""Issue 18: a LoRA of one family on a model of another is refused in one sentence and writes
nothing. FLUX.1 LoRAs in the formats people share (kohya, OneTrainer, XLabs, ai-toolkit) on
tiny SD1 and SDXL models, and SD1 / SDXL LoRAs on a tiny FLUX.1 model, through every LoRA
backend setting; every tensor of every component is compared byte for byte with the base."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_files import one_torch_thread
from safetensors.torch import save_file
from torch import Tensor, nn

from webui.arch import Arch, FluxVariant
from webui.engine.lora_backends import LoraBackends
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.engine.network_set import ChosenNetwork
from webui.networks.apply.strengths import Strengths
from webui.networks.format.network import read_network
from webui.settings import LoraBackend

RANK = 4
SENTENCE = "{name}: made for {family} ({source}), not applied to this model"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@cache
def base(arch: Arch) -> Any:
    if arch is Arch.FLUX1:
        return build_pipeline(ModelSpec(arch, variant=FluxVariant.DEV), seed=3, with_vae=False)
    return build_pipeline(ModelSpec(arch), seed=3, with_vae=False)


def snapshot(pipe: Any) -> dict[str, Tensor]:
    """Every tensor of every torch component, copied."""
    return {
        f"{name}.{key}": tensor.detach().clone()
        for name, component in vars(pipe).items()
        if isinstance(component, nn.Module)
        for key, tensor in component.state_dict().items()
    }


def differing(pipe: Any, expected: dict[str, Tensor]) -> list[str]:
    now = snapshot(pipe)
    assert now.keys() == expected.keys()
    return sorted(
        k
        for k, t in now.items()
        if t.dtype != expected[k].dtype
        or not torch.equal(
            t.contiguous().view(torch.uint8), expected[k].contiguous().view(torch.uint8)
        )
    )


def _pair(prefix: str, rows: int, cols: int, up: str, down: str) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(len(prefix))
    return {
        f"{prefix}.{up}": torch.randn(rows, RANK, generator=g),
        f"{prefix}.{down}": torch.randn(RANK, cols, generator=g),
    }


def _kohya(*prefixes: tuple[str, int, int]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for prefix, rows, cols in prefixes:
        out |= _pair(prefix, rows, cols, "lora_up.weight", "lora_down.weight")
        out[f"{prefix}.alpha"] = torch.tensor(float(RANK))
    return out


@dataclass(frozen=True)
class LoraFile:
    """A file of one family, by key layout (shapes of the real model; nothing should read
    them). `source`: what the refusal says the family was known from."""

    name: str
    family: Arch
    tensors: Callable[[], dict[str, Tensor]]
    source: str
    metadata: dict[str, str] | None = None


# The full-size shapes: a real FLUX.1 file's tensors (width 3072, MLP 12288, modulation 6x).
W = 3072
FLUX_FILES = (
    LoraFile(
        "flux_kohya",
        Arch.FLUX1,
        lambda: _kohya(
            ("lora_unet_double_blocks_0_img_attn_qkv", 3 * W, W),
            ("lora_unet_double_blocks_0_img_mod_lin", 6 * W, W),
            ("lora_unet_single_blocks_0_linear1", 3 * W + 4 * W, W),
        ),
        "keys",
    ),
    LoraFile(
        "flux_kohya_meta",
        Arch.FLUX1,
        lambda: _kohya(("lora_unet_double_blocks_0_img_attn_qkv", 3 * W, W)),
        "metadata ss_base_model_version",
        {"ss_base_model_version": "flux1", "ss_network_module": "networks.lora_flux"},
    ),
    LoraFile(
        "flux_onetrainer",
        Arch.FLUX1,
        lambda: _kohya(
            ("lora_transformer_transformer_blocks_1_attn_to_q", W, W),
            ("lora_transformer_single_transformer_blocks_0_norm_linear", 3 * W, W),
        ),
        "keys",
    ),
    LoraFile(
        "flux_xlabs",
        Arch.FLUX1,
        lambda: (
            _pair("double_blocks.0.processor.qkv_lora1", 3 * W, W, "up.weight", "down.weight")
            | _pair("double_blocks.0.processor.proj_lora2", W, W, "up.weight", "down.weight")
        ),
        "keys",
    ),
    LoraFile(
        "flux_ai_toolkit",
        Arch.FLUX1,
        lambda: (
            _pair(
                "diffusion_model.double_blocks.0.img_mod.lin",
                6 * W,
                W,
                "lora_B.weight",
                "lora_A.weight",
            )
            | _pair(
                "diffusion_model.single_blocks.3.linear2",
                W,
                5 * W,
                "lora_B.weight",
                "lora_A.weight",
            )
        ),
        "keys",
    ),
)
SD1_FILE = LoraFile(
    "sd1",
    Arch.SD1,
    lambda: _kohya(
        ("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
    ),
    "keys",
)
SDXL_FILE = LoraFile(
    "sdxl",
    Arch.SDXL,
    lambda: _kohya(
        ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", 640, 640),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768),
        ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280),
    ),
    "keys",
)

CASES = [
    *[pytest.param(f, Arch.SD1, id=f"{f.name}-on-sd1") for f in FLUX_FILES],
    *[pytest.param(f, Arch.SDXL, id=f"{f.name}-on-sdxl") for f in FLUX_FILES],
    pytest.param(SD1_FILE, Arch.FLUX1, id="sd1-on-flux"),
    pytest.param(SDXL_FILE, Arch.FLUX1, id="sdxl-on-flux"),
]


@pytest.mark.parametrize("backend", list(LoraBackend), ids=str)
@pytest.mark.parametrize(("lora", "model"), CASES)
def test_lora_of_another_family_is_one_sentence_and_writes_nothing(
    tmp_path: Path, lora: LoraFile, model: Arch, backend: LoraBackend
) -> None:
    path = tmp_path / f"{lora.name}.safetensors"
    save_file(lora.tensors(), str(path), metadata=lora.metadata)
    network = read_network(path)
    pipe = copy.deepcopy(base(model))
    before = snapshot(pipe)
    backends = LoraBackends(pipe, model)

    routed = backends.apply(
        [ChosenNetwork(network.name, network, Strengths(te1=0.5, unet=1.0))], backend
    )

    assert routed.warnings == [
        SENTENCE.format(name=lora.name, family=lora.family.value, source=lora.source)
    ]
    assert not routed.applied
    assert differing(pipe, before) == []
    backends.restore()
    assert differing(pipe, before) == []
