"""Issue 18, item 4: per-block weights on FLUX.1, following the LoRA Block Weight extension's
"Flux (61)" vector (CLIP, T5, IN, D00..D18, S00..S37, OUT). References are written out by hand
here: the labels from that extension's README, which diffusers module each BFL name of the file
lands on, and each module's expected weight, base + strength x factor x (alpha / rank) up @ down."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from lora_files import write_kohya_layers
from safetensors.torch import save_file

from webui.arch import Arch, FluxVariant
from webui.engine.model_factory import ModelSpec, build_pipeline, config_folder
from webui.engine.network_set import strengths_of
from webui.networks.apply import NetworkPatcher, PatchReport, Strengths
from webui.networks.format.network import Network, read_network
from webui.prompt import BlockWeights, NetworkTag, parse_prompt

RANK, ALPHA = 4, 2.0
# LoRA Block Weight's README, "Flux (61)"
FLUX_61 = (
    "CLIP", "T5", "IN",
    "D00", "D01", "D02", "D03", "D04", "D05", "D06", "D07", "D08", "D09",
    "D10", "D11", "D12", "D13", "D14", "D15", "D16", "D17", "D18",
    "S00", "S01", "S02", "S03", "S04", "S05", "S06", "S07", "S08", "S09",
    "S10", "S11", "S12", "S13", "S14", "S15", "S16", "S17", "S18", "S19",
    "S20", "S21", "S22", "S23", "S24", "S25", "S26", "S27", "S28", "S29",
    "S30", "S31", "S32", "S33", "S34", "S35", "S36", "S37",
    "OUT",
)  # fmt: skip
# the factors of the test vector; every other entry is 1 (the tiny model has D00-D01, S00-S01)
FACTORS = {
    "CLIP": 0.5,
    "T5": 0.25,
    "IN": 0.75,
    "D00": 0.2,
    "D01": 0.0,
    "S00": 1.5,
    "S01": -0.5,
    "OUT": 0.3,
}
VECTOR = ",".join(f"{FACTORS.get(label, 1.0):g}" for label in FLUX_61)

# (file module, component, diffusers module path, block label): the BFL/kohya names as FLUX.1
# trainers write them, and where each lands, by hand (BFL flux/model.py vs diffusers names)
TARGETS = (
    ("lora_unet_img_in", "transformer", "x_embedder", "IN"),
    ("lora_unet_time_in_in_layer", "transformer", "time_text_embed.timestep_embedder.linear_1", "IN"),
    ("lora_unet_guidance_in_out_layer", "transformer", "time_text_embed.guidance_embedder.linear_2", "IN"),
    ("lora_unet_double_blocks_0_img_attn_proj", "transformer", "transformer_blocks.0.attn.to_out.0", "D00"),
    ("lora_unet_double_blocks_0_txt_mlp_0", "transformer", "transformer_blocks.0.ff_context.net.0.proj", "D00"),
    ("lora_unet_double_blocks_1_img_mlp_2", "transformer", "transformer_blocks.1.ff.net.2", "D01"),
    ("lora_unet_single_blocks_0_linear2", "transformer", "single_transformer_blocks.0.proj_out", "S00"),
    ("lora_unet_single_blocks_1_modulation_lin", "transformer", "single_transformer_blocks.1.norm.linear", "S01"),
    ("lora_unet_final_layer_linear", "transformer", "proj_out", "OUT"),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder", "encoder.layers.0.self_attn.q_proj", "CLIP"),
    ("lora_te3_encoder_block_1_layer_0_SelfAttention_v", "text_encoder_2", "encoder.block.1.layer.0.SelfAttention.v", "T5"),
)  # fmt: skip
# the fused image qkv of double block 0: q, k and v are its row thirds, all in D00
QKV = ("lora_unet_double_blocks_0_img_attn_qkv", "transformer_blocks.0.attn.", "D00")


def _module(pipe, component: str, path: str) -> torch.nn.Module:
    modules = dict(getattr(pipe, component).named_modules())
    return modules.get(path) or modules["text_model." + path]


def _low_rank(seed: int, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(rows, RANK, generator=g) * 0.1
    return up, torch.randn(RANK, columns, generator=g) * 0.1


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(ModelSpec(Arch.FLUX1, variant=FluxVariant.DEV), seed=5, with_vae=False)


@pytest.fixture(scope="module")
def lora(pipe, tmp_path_factory) -> tuple[Network, dict[str, torch.Tensor]]:
    """A kohya FLUX.1 LoRA over TARGETS and the fused QKV; each target module's full delta
    ((alpha / rank) up @ down) by diffusers path (`component:path`)."""
    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}

    def add(prefix: str, seed: int, rows: int, columns: int) -> torch.Tensor:
        up, down = _low_rank(seed, rows, columns)
        tensors[f"{prefix}.lora_up.weight"], tensors[f"{prefix}.lora_down.weight"] = up, down
        tensors[f"{prefix}.alpha"] = torch.tensor(ALPHA)
        return ALPHA / RANK * (up @ down)

    for seed, (prefix, component, path, _) in enumerate(TARGETS):
        weight = _module(pipe, component, path).weight
        deltas[f"{component}:{path}"] = add(prefix, seed, *weight.shape)
    prefix, stem, _ = QKV
    q = _module(pipe, "transformer", stem + "to_q").weight
    fused = add(prefix, 99, 3 * q.shape[0], q.shape[1])
    for name, rows in zip(("to_q", "to_k", "to_v"), fused.chunk(3), strict=True):
        deltas[f"transformer:{stem}{name}"] = rows
    path = tmp_path_factory.mktemp("flux_lbw") / "blocks.safetensors"
    save_file(tensors, path, metadata={"ss_base_model_version": "flux1"})
    return read_network(path), deltas


def _labels(pipe) -> dict[str, str]:
    """`component:path` -> block label of every target, by hand."""
    labels = {f"{c}:{p}": label for _, c, p, label in TARGETS}
    labels.update({f"transformer:{QKV[1]}{n}": QKV[2] for n in ("to_q", "to_k", "to_v")})
    return labels


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{component}:{name}": tensor.detach().clone()
        for component in ("transformer", "text_encoder", "text_encoder_2")
        for name, tensor in getattr(pipe, component).state_dict().items()
    }


def _apply(pipe, network: Network, tag: str, **steps: int) -> tuple[NetworkPatcher, PatchReport]:
    parsed = parse_prompt(f"{tag.replace('NAME', network.name)}")
    assert not parsed.errors, parsed.errors
    patcher = NetworkPatcher(pipe, Arch.FLUX1)
    return patcher, patcher.apply([(network, strengths_of(parsed.tags[0]))], **steps)


def _check(pipe, base, deltas, strength_of) -> None:
    """Every target weight is base + strength_of(component, label) x delta (1e-5 relative); a
    zero strength leaves it bit-exact."""
    for key, label in _labels(pipe).items():
        component, path = key.split(":")
        weight = _module(pipe, component, path).weight.detach()
        before = base.get(f"{component}:{path}.weight")
        if before is None:  # CLIP with transformers' `text_model.` wrapper
            before = base[f"{component}:text_model.{path}.weight"]
        strength = strength_of(component, label)
        if strength == 0:
            assert torch.equal(weight, before), key
            continue
        want = before + strength * deltas[key]
        assert (weight - want).abs().max() <= 1e-5 * want.abs().max(), (key, label)


def test_each_block_takes_its_entry_of_the_61_vector(pipe, lora) -> None:
    network, deltas = lora
    base = _weights(pipe)
    patcher, report = _apply(pipe, network, f"<lora:NAME:0.6:0.8:lbw={VECTOR}>")
    assert report.networks[0].applied and not report.warnings, report.warnings

    def strength(component: str, label: str) -> float:
        return (0.6 if component != "transformer" else 0.8) * FACTORS[label]

    _check(pipe, base, deltas, strength)
    patcher.restore()
    assert all(torch.equal(t, base[k]) for k, t in _weights(pipe).items())


def test_te1_te2_and_transformer_alias_with_a_vector(pipe, lora) -> None:
    """CLIP times te1, T5 times te2, the transformer's blocks times `transformer=`."""
    network, deltas = lora
    base = _weights(pipe)
    tag = f"<lora:NAME:te1=0.4:te2=2:TRANSFORMER=1.2:lbw={VECTOR}>"
    patcher, report = _apply(pipe, network, tag)
    assert not report.warnings, report.warnings
    own = {"text_encoder": 0.4, "text_encoder_2": 2.0, "transformer": 1.2}
    _check(pipe, base, deltas, lambda component, label: own[component] * FACTORS[label])
    patcher.restore()


def test_fluxall_is_the_plain_strength(pipe, lora) -> None:
    network, deltas = lora
    base = _weights(pipe)
    patcher, report = _apply(pipe, network, "<lora:NAME:0.7:lbw=FLUXALL>")
    assert not report.warnings, report.warnings
    _check(pipe, base, deltas, lambda component, label: 0.7)
    patcher.restore()


@pytest.mark.parametrize("step", [1, 3, 5])
def test_schedule_times_vector(pipe, lora, step: int) -> None:
    """`transformer=0@1,1@5` with the vector: step s of 5 gives (s - 1) / 4 x factor; the text
    encoders keep te x factor; set_step rewrites only what changed."""
    network, deltas = lora
    base = _weights(pipe)
    parsed = parse_prompt(f"<lora:{network.name}:0.5:transformer=0@1,1@5:lbw={VECTOR}>")
    patcher = NetworkPatcher(pipe, Arch.FLUX1)
    patcher.apply([(network, strengths_of(parsed.tags[0]))], step=1, total_steps=5)
    patcher.set_step(step, 5)
    ramp = (step - 1) / 4

    def strength(component: str, label: str) -> float:
        return (0.5 if component != "transformer" else ramp) * FACTORS[label]

    _check(pipe, base, deltas, strength)
    patcher.restore()
    assert all(torch.equal(t, base[k]) for k, t in _weights(pipe).items())


def test_an_sd_vector_on_flux_is_refused_and_nothing_is_written(pipe, lora) -> None:
    network, _ = lora
    base = _weights(pipe)
    patcher, report = _apply(pipe, network, "<lora:NAME:1:lbw=1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1>")
    assert report.warnings == [
        f"{network.name}: lbw= has 17 values: not a block vector for FLUX.1, which takes 61 "
        "values; not applied"
    ]
    assert not report.networks[0].applied and patcher.patched_modules == 0
    assert all(torch.equal(t, base[k]) for k, t in _weights(pipe).items())


def test_in_mid_out_on_flux_are_ignored_with_a_note(pipe, lora) -> None:
    network, deltas = lora
    base = _weights(pipe)
    patcher, report = _apply(pipe, network, "<lora:NAME:0.5:in=0:out=2>")
    assert report.warnings == [
        f"{network.name}: in=/out= set UNet blocks and FLUX.1 has none (ignored); use lbw= "
        "with its D00-D18 (double) and S00-S37 (single) blocks"
    ]
    _check(pipe, base, deltas, lambda component, label: 0.5)
    patcher.restore()


def test_a_flux_vector_on_sd_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    sd = build_pipeline(ModelSpec(Arch.SD1), with_vae=False)
    path = tmp_path / "sd.safetensors"
    write_kohya_layers(path, sd, Arch.SD1, every=4, metadata={"ss_base_model_version": "sd_v1"})
    network = read_network(path)
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    patcher = NetworkPatcher(sd, Arch.SD1)
    tag = parse_prompt(f"<lora:sd:lbw={VECTOR}>").tags[0]
    report = patcher.apply([(network, strengths_of(tag))])
    assert report.warnings == [
        f"{network.name}: lbw= has 61 values: not a block vector for SD1, which takes 12, 17, "
        "20 or 26 values; not applied"
    ]
    assert patcher.patched_modules == 0
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())
    # the same file with an SD vector applies, so the refusal is the vector's
    tag = parse_prompt("<lora:sd:lbw=ALL>").tags[0]
    assert not patcher.apply([(network, strengths_of(tag))]).warnings
    assert patcher.patched_modules > 0
    patcher.restore()


def test_every_module_of_the_full_transformer_has_its_block() -> None:
    """On the meta device, the full-size FLUX.1-dev transformer from configs/: every weight
    belongs to one of the 19 double, 38 single, IN or OUT blocks, each label of the vector but
    CLIP/T5 is used, and the embedders/final layer land in IN/OUT."""
    from webui.networks.apply.blocks import model_blocks

    config = json.loads((config_folder(Arch.FLUX1) / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)

    class Pipe:
        pass

    pipe = Pipe()
    pipe.transformer = transformer  # type: ignore[attr-defined]
    blocks = model_blocks(pipe, Arch.FLUX1)
    assert blocks == model_blocks(pipe, None)  # told apart by its config too
    owners = {name.rsplit(".", 1)[0] for name, _ in transformer.named_parameters()}
    labels = {path: blocks.block(path).label for path in owners}
    assert None not in labels.values(), [p for p, label in labels.items() if label is None]
    assert set(labels.values()) == set(FLUX_61) - {"CLIP", "T5"}
    assert labels["transformer_blocks.18.attn.to_q"] == "D18"
    assert labels["single_transformer_blocks.37.proj_mlp"] == "S37"
    assert labels["single_transformer_blocks.9.norm.linear"] == "S09"
    assert labels["context_embedder"] == labels["time_text_embed.text_embedder.linear_1"] == "IN"
    assert labels["norm_out.linear"] == labels["proj_out"] == "OUT"


# ---------------------------------------------------------------------------- tag parsing


def test_a_61_value_vector_reads_by_flux_labels() -> None:
    tag = parse_prompt(f"<lora:f:lbw={VECTOR}>").tags[0]
    assert tag.blocks == BlockWeights(tuple(FACTORS.get(label, 1.0) for label in FLUX_61), FLUX_61)
    assert tag.blocks.by_label()["S01"] == -0.5


def test_fluxall_preset_and_the_positional_form() -> None:
    ones = BlockWeights((1.0,) * 61, FLUX_61, "FLUXALL")
    assert parse_prompt("<lora:f:lbw=fluxall>").tags[0].blocks == ones
    assert parse_prompt("<lora:f:0.5:FLUXALL>").tags[0] == NetworkTag(
        "f", "<lora:f:0.5:FLUXALL>", te1=0.5, te2=0.5, unet=0.5,
        in_blocks=0.5, mid=0.5, out=0.5, blocks=ones,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "same_as"),
    [
        ("<lora:f:0.6:transformer=0.8>", "<lora:f:0.6:unet=0.8>"),
        ("<lora:f:Transformer=0@0,1@10>", "<lora:f:unet=0@0,1@10>"),
        ("<lora:f:0.3:TRANSFORMER=1.5:lbw=FLUXALL>", "<lora:f:0.3:unet=1.5:lbw=FLUXALL>"),
    ],
)
def test_transformer_is_unets_alias(text: str, same_as: str) -> None:
    tag, reference = parse_prompt(text).tags[0], parse_prompt(same_as).tags[0]
    assert tag == NetworkTag(**{**reference.__dict__, "text": text})
    assert parse_prompt(text).errors == ()


def test_transformer_alias_messages_name_the_key_as_typed() -> None:
    assert parse_prompt("<lora:f:transformer=x>").errors == (
        "<lora:f:transformer=x>: transformer 'x' is not a number; tag skipped",
    )
    both = parse_prompt("<lora:f:unet=0.2:transformer=0.9>")
    assert both.tags[0].unet == 0.9
    assert both.errors == (
        "<lora:f:unet=0.2:transformer=0.9>: unet= and transformer= are both given; the last "
        "value is used",
    )
    assert parse_prompt("<lora:f:transformer=>").errors == (
        "<lora:f:transformer=>: transformer= has no value (ignored)",
    )


@pytest.mark.parametrize("count", [57, 60, 62])
def test_a_vector_of_no_known_length_names_the_flux_length(count: int) -> None:
    text = f"<lora:f:lbw={','.join(['1'] * count)}>"
    assert parse_prompt(text).errors == (
        f"{text}: lbw '{','.join(['1'] * count)}' has {count} values; a block vector has "
        "12, 17, 20, 26 (SD) or 61 (FLUX.1); tag skipped",
    )


def test_strengths_text_encoders_take_clip_t5_or_base() -> None:
    """By hand: a FLUX vector's CLIP scales te1 and T5 te2; an SD vector's BASE scales both."""
    from webui.networks.apply.keys import Component

    flux = Strengths(te=1.0, te1=0.5, te2=2.0, blocks={"CLIP": 0.3, "T5": 0.1})
    assert flux.multiplier(Component.TEXT_ENCODER) == pytest.approx(0.15)
    assert flux.multiplier(Component.TEXT_ENCODER_2) == pytest.approx(0.2)
    sd = Strengths(te=1.0, te1=0.5, te2=2.0, blocks={"BASE": 0.3})
    assert sd.multiplier(Component.TEXT_ENCODER) == pytest.approx(0.15)
    assert sd.multiplier(Component.TEXT_ENCODER_2) == pytest.approx(0.6)
