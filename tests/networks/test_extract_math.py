"""The pure part of extraction: truncated SVD against numpy's SVD and the Eckart-Young error,
the energy rule on hand-computed spectra, kohya names against names trainers write, and the
metadata as our catalog and base detection read it back."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from webui.arch import Arch
from webui.engine.model_factory import config_folder
from webui.layouts.unet import unet_module_names
from webui.networks.apply.extract import (
    EXTRACTION_METADATA_KEY,
    ExtractedModule,
    ExtractionRecord,
    RankRule,
    SourceLora,
    kohya_name,
    lora_metadata,
    lora_state_dict,
    low_rank,
    merged_tag_frequency,
)
from webui.networks.apply.keys import Component
from webui.networks.format.base_detection import detect_base, modelspec_architecture
from webui.networks.library.header_facts import header_facts


def _with_spectrum(values: list[float], rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A matrix with exactly these singular values (random orthonormal bases)."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=generator, dtype=torch.float64))
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize(
    "shape", [(96, 80), (40, 24, 3, 3), (200, 300)], ids=["linear", "conv3x3", "lowrank-path"]
)
def test_enough_rank_reproduces_a_low_rank_delta(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(1)
    inner = int(np.prod(shape[1:]))
    delta = torch.randn(shape[0], 6, generator=generator) @ torch.randn(
        6, inner, generator=generator
    )
    delta = delta.reshape(shape)

    factors = low_rank(delta, RankRule(rank=6))

    assert factors.up.shape == (shape[0], 6, *([1, 1] if len(shape) == 4 else []))
    assert factors.down.shape == (6, *shape[1:])
    assert torch.allclose(factors.product(), delta, rtol=0, atol=1e-5 * float(delta.abs().max()))
    assert factors.relative_error < 1e-5


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_truncation_error_is_the_eckart_young_tail(rank: int) -> None:
    delta = torch.randn(64, 30, generator=torch.Generator().manual_seed(2))
    singular = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    expected = np.sqrt((singular[rank:] ** 2).sum() / (singular**2).sum())

    factors = low_rank(delta, RankRule(rank=rank))

    measured = float((delta - factors.product()).norm() / delta.norm())
    assert factors.rank == rank
    assert factors.relative_error == pytest.approx(expected, rel=1e-5)
    assert factors.relative_error == pytest.approx(measured, rel=1e-6)


def test_randomized_svd_of_a_large_matrix_is_near_optimal() -> None:
    """A rank far below the size takes `svd_lowrank`: on a spectrum decaying like real deltas'
    its error is within 0.1% of the optimum, and the reported error is still the measured one."""
    spectrum = [0.9**i for i in range(200)]
    delta = _with_spectrum(spectrum, 400, 300, seed=5).float()
    singular = np.array(spectrum)
    optimum = np.sqrt((singular[16:] ** 2).sum() / (singular**2).sum())

    factors = low_rank(delta, RankRule(rank=16))

    measured = float((delta - factors.product()).norm() / delta.norm())
    # (1 - 1e-5): the delta is fp32, so its error may round a hair below the float64 optimum
    assert optimum * (1 - 1e-5) <= factors.relative_error < optimum * 1.001
    assert factors.relative_error == pytest.approx(measured, rel=1e-6)


def test_fp16_factors_report_the_error_of_what_is_stored() -> None:
    delta = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    factors = low_rank(delta, RankRule(rank=48), dtype=torch.float16)
    measured = float((delta - factors.product()).norm() / delta.norm())
    assert factors.up.dtype == torch.float16 and 1e-5 < measured < 1e-2
    assert factors.relative_error == pytest.approx(measured, rel=1e-4)


# Squared singular values 16, 4, 1, 0.25 (sum 21.25): cumulative shares 0.753, 0.941, 0.988, 1.
@pytest.mark.parametrize(
    ("energy", "max_rank", "expected"),
    [(0.5, None, 1), (0.75, None, 1), (0.76, None, 2), (0.9, None, 2), (0.95, None, 3),
     (0.99, None, 4), (0.9999, None, 4), (0.99, 2, 2)],
)  # fmt: skip
def test_energy_keeps_the_fewest_values_reaching_the_threshold(
    energy: float, max_rank: int | None, expected: int
) -> None:
    delta = _with_spectrum([4.0, 2.0, 1.0, 0.5], 30, 20).float()
    factors = low_rank(delta, RankRule(energy=energy, max_rank=max_rank))
    assert factors.rank == expected


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (dict(rank=4, energy=0.9), "either a rank or an energy"),
        (dict(), "either a rank or an energy"),
        (dict(rank=0), "rank must be at least 1"),
        (dict(energy=1.5), "energy must be in"),
        (dict(energy=0.9, max_rank=0), "max rank"),
    ],
)
def test_bad_rank_rules_are_refused(rule: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RankRule(**rule)


def test_zero_and_one_dimensional_deltas_are_refused() -> None:
    with pytest.raises(ValueError, match="norm is 0"):
        low_rank(torch.zeros(4, 4), RankRule(rank=2))
    with pytest.raises(ValueError, match="only Linear and Conv2d"):
        low_rank(torch.ones(4), RankRule(rank=2))


def _sdxl_ldm_names() -> dict[str, str]:
    config = json.loads((config_folder(Arch.SDXL) / "unet" / "config.json").read_text())
    return unet_module_names(config)


# Names as kohya sd-scripts writes them (SD1: diffusers UNet; SDXL: SGM UNet; CLIP text_model_).
@pytest.mark.parametrize(
    ("arch", "component", "path", "expected"),
    [
        (Arch.SD1, Component.UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
        (Arch.SD1, Component.UNET, "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",
         "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0"),
        (Arch.SD1, Component.TEXT_ENCODER, "encoder.layers.0.self_attn.q_proj",
         "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
        (Arch.SD2, Component.TEXT_ENCODER, "text_model.encoder.layers.22.mlp.fc2",
         "lora_te_text_model_encoder_layers_22_mlp_fc2"),
        (Arch.SDXL, Component.UNET, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
         "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
        (Arch.SDXL, Component.UNET, "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2",
         "lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_2"),
        (Arch.SDXL, Component.UNET, "down_blocks.1.resnets.0.conv_shortcut",
         "lora_unet_input_blocks_4_0_skip_connection"),
        (Arch.SDXL, Component.UNET, "add_embedding.linear_1", "lora_unet_label_emb_0_0"),
        (Arch.SDXL, Component.TEXT_ENCODER, "encoder.layers.11.self_attn.k_proj",
         "lora_te1_text_model_encoder_layers_11_self_attn_k_proj"),
        (Arch.SDXL, Component.TEXT_ENCODER_2, "text_model.encoder.layers.31.mlp.fc1",
         "lora_te2_text_model_encoder_layers_31_mlp_fc1"),
        (Arch.SDXL, Component.TEXT_ENCODER_2, "text_projection", "lora_te2_text_projection"),
    ],
)  # fmt: skip
def test_kohya_names(arch: Arch, component: Component, path: str, expected: str) -> None:
    ldm = _sdxl_ldm_names() if arch is Arch.SDXL else {}
    assert kohya_name(component, path, arch, ldm) == expected


# SAI model-spec architecture names (https://github.com/Stability-AI/ModelSpec).
@pytest.mark.parametrize(
    ("arch", "v_prediction", "expected"),
    [
        (Arch.SD1, False, "stable-diffusion-v1"),
        (Arch.SD2, False, "stable-diffusion-v2-512"),
        (Arch.SD2, True, "stable-diffusion-v2-768-v"),
        (Arch.SDXL, False, "stable-diffusion-xl-v1-base"),
    ],
)
def test_modelspec_architectures(arch: Arch, v_prediction: bool, expected: str) -> None:
    assert modelspec_architecture(arch, v_prediction) == expected
    assert detect_base({"modelspec.architecture": expected + "/lora"}, {}).arch is arch


def test_merged_tag_frequency_puts_trigger_words_first() -> None:
    sources = [
        SourceLora("ink", "0.8", "ink.safetensors", (("ink wash", 40), ("brush", 7)), ("inkwash",)),
        SourceLora("fox", "0.5", "fox.safetensors", (("fox", 12),), ("foxy", "inkwash")),
    ]
    assert merged_tag_frequency(sources) == {
        "trigger words": {"inkwash": 41, "foxy": 41},
        "ink": {"ink wash": 40, "brush": 7},
        "fox": {"fox": 12},
    }


def test_metadata_is_read_back_by_the_catalog_and_base_detection(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(4)
    modules = [
        ExtractedModule(
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
            low_rank(torch.randn(64, 2048, generator=generator), RankRule(rank=8)),
        ),
        ExtractedModule(
            "lora_unet_input_blocks_4_0_in_layers_2",
            low_rank(torch.randn(64, 32, 3, 3, generator=generator), RankRule(rank=8)),
        ),
    ]
    record = ExtractionRecord(
        arch=Arch.SDXL,
        v_prediction=False,
        title="combined",
        rule=RankRule(rank=8),
        base_model="sdxl.safetensors",
        modules=modules,
        sources=[SourceLora("ink", "0.8", "ink.safetensors", (("ink wash", 3),), ("inkwash",))],
        created=datetime(2026, 1, 2, 3, 4, 5),
    )
    path = tmp_path / "combined.safetensors"
    metadata = lora_metadata(record)
    save_file(lora_state_dict(modules), str(path), metadata)

    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.date"] == "2026-01-02T03:04:05"
    assert metadata["modelspec.merged_from"] == "ink.safetensors:0.8"
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "8"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "8"}
    recorded = json.loads(metadata[EXTRACTION_METADATA_KEY])
    assert recorded["modules"][modules[1].name]["relative_error"] == pytest.approx(
        modules[1].factors.relative_error
    )
    facts = header_facts(path)
    assert facts.base is Arch.SDXL and facts.rank == 8 and facts.alpha == 8
    assert facts.tag_frequency[0] == ("inkwash", 4) and facts.alias == "combined"
    assert (
        detect_base({}, {k: tuple(v.shape) for k, v in lora_state_dict(modules).items()}).arch
        is Arch.SDXL
    )


def test_randomized_svd_gives_the_same_factors_every_time_and_keeps_the_callers_rng() -> None:
    delta = _with_spectrum([0.9**i for i in range(200)], 400, 300, seed=5).float()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = low_rank(delta, RankRule(rank=16))
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random state is untouched
    torch.manual_seed(7)  # another global state: the same file must come out
    second = low_rank(delta, RankRule(rank=16))
    assert torch.equal(first.up, second.up) and torch.equal(first.down, second.down)
