"""LoRA key names resolve to the modules their trainers wrapped.

References: LyCORIS' kohya network (it keeps the module each lora name wraps) and diffusers' own
PEFT LoRA saving (PEFT wraps the modules it targets). Both write real files that are read back.
"""

from __future__ import annotations

import os

# Set before diffusers/transformers import huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from lora_files import (
    file_prefixes,
    ldm_names,
    lycoris_wrapped,
    register_preset,
    write_lycoris,
    write_peft,
)
from safetensors import safe_open
from torch import nn

from webui.arch import UNET_ARCHES, Arch
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.layouts.unet import unet_module_names
from webui.networks.apply.keys import Component, KeyMap


@pytest.fixture
def lycoris_preset(monkeypatch: pytest.MonkeyPatch) -> str:
    """Our preset, registered for one test; LyCORIS' class-level preset state restored after."""
    return register_preset(monkeypatch, "webui-test")


def _lycoris_file(pipeline: DiffusionPipeline, preset: str, path: Path) -> dict[str, nn.Module]:
    """Write a LyCORIS kohya LoRA (with norm modules); return lora name -> wrapped module."""
    network = write_lycoris(
        pipeline, path, preset=preset, algo="lora", alpha=4, std=None, train_norm=True
    )
    return lycoris_wrapped(network)


@pytest.fixture(scope="module")
def pipelines() -> dict[Arch, DiffusionPipeline]:
    return {arch: build_pipeline(ModelSpec(arch)) for arch in UNET_ARCHES}


@pytest.mark.parametrize("arch", UNET_ARCHES, ids=lambda a: a.value)
def test_lycoris_kohya_names_resolve_to_wrapped_modules(
    pipelines: dict[Arch, DiffusionPipeline], lycoris_preset: str, tmp_path: Path, arch: Arch
) -> None:
    pipeline = pipelines[arch]
    wrapped = _lycoris_file(pipeline, lycoris_preset, tmp_path / "lycoris.safetensors")
    prefixes = file_prefixes(tmp_path / "lycoris.safetensors")
    assert prefixes == set(wrapped)
    assert any(isinstance(m, nn.GroupNorm) for m in wrapped.values())  # norm diffs covered
    assert any(isinstance(m, nn.LayerNorm) for m in wrapped.values())
    assert any(isinstance(m, nn.Conv2d) for m in wrapped.values())

    key_map = KeyMap.from_pipeline(pipeline)
    match = key_map.match(prefixes)
    assert match.unmatched == ()
    for prefix, ref in match.resolved.items():
        assert ref.module is wrapped[prefix], prefix
        component = (
            pipeline.unet
            if ref.component is Component.UNET
            else getattr(pipeline, ref.component.value)
        )
        assert component.get_submodule(ref.path) is ref.module
    if arch is Arch.SDXL:
        assert any(p.startswith("lora_te2_") for p in prefixes)
        assert {ref.component for ref in match.resolved.values()} == set(Component)


@pytest.mark.parametrize("arch", [Arch.SDXL, Arch.SD1], ids=lambda a: a.value)
def test_original_layout_names_resolve_to_the_same_modules(
    pipelines: dict[Arch, DiffusionPipeline], lycoris_preset: str, tmp_path: Path, arch: Arch
) -> None:
    pipeline = pipelines[arch]
    wrapped = _lycoris_file(pipeline, lycoris_preset, tmp_path / "lycoris.safetensors")
    key_map = KeyMap.from_pipeline(pipeline)
    unet_names = [name for name in wrapped if name.startswith("lora_unet_")]
    renames = ldm_names(pipeline.unet, unet_names)
    ldm = unet_module_names(pipeline.unet.config)
    assert "lora_unet_middle_block_1_proj_in" in renames.values()
    assert any(n.startswith("lora_unet_output_blocks_") for n in renames.values())
    assert any(n.startswith("lora_unet_input_blocks_") for n in renames.values())
    for name, ldm_name in renames.items():
        ref = key_map.resolve(ldm_name)
        assert ref is not None, ldm_name
        assert ref.module is wrapped[name], ldm_name
        # The dotted original path, as in full checkpoints and diff files, names the same module.
        dotted = "model.diffusion_model." + ldm[ref.path]
        assert key_map.resolve(dotted) is ref


def _peft_file(arch: Arch, directory: Path) -> tuple[DiffusionPipeline, KeyMap, Path]:
    """A fresh pipeline, a key map built before PEFT wraps it, and diffusers' saved LoRA."""
    pipeline = build_pipeline(ModelSpec(arch))
    key_map = KeyMap.from_pipeline(pipeline)
    unet_targets = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "proj_in",
        "conv1",
        "ff.net.0.proj",
        "conv_shortcut",
    ]
    path = write_peft(
        pipeline,
        directory,
        alpha=4,
        unet_targets=unet_targets,
        init_lora_weights=True,
        adapter_metadata=False,
    )
    return pipeline, key_map, path


def _peft_prefixes(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    return {k.rsplit(".", 2)[0] for k in keys}


def _peft_wrapped(pipeline: DiffusionPipeline, prefix: str) -> nn.Module:
    component, _, path = prefix.partition(".")
    return getattr(pipeline, component).get_submodule(path).base_layer


@pytest.mark.parametrize("arch", [Arch.SD1, Arch.SDXL], ids=lambda a: a.value)
def test_peft_names_resolve_to_wrapped_modules(tmp_path: Path, arch: Arch) -> None:
    pipeline, key_map, path = _peft_file(arch, tmp_path)
    prefixes = _peft_prefixes(path)
    match = key_map.match(prefixes)
    assert match.unmatched == ()
    for prefix, ref in match.resolved.items():
        assert ref.module is _peft_wrapped(pipeline, prefix), prefix
        assert ref.component.value == prefix.partition(".")[0]

    # A key map built on the PEFT-wrapped model reaches through to the same base layers.
    wrapped_map = KeyMap.from_pipeline(pipeline)
    for prefix, ref in match.resolved.items():
        assert wrapped_map.resolve(prefix) == ref
        assert wrapped_map.resolve(prefix).module is ref.module  # type: ignore[union-attr]

    # PEFT's own model wrapper and the old attention-processor names resolve alike.
    for prefix, ref in match.resolved.items():
        component, _, inner = prefix.partition(".")
        assert key_map.resolve(f"{component}.base_model.model.{inner}") is ref
        if component == "unet":
            assert key_map.resolve(f"base_model.model.{inner}") is ref
        for projection in ("to_q", "to_k", "to_v"):
            if prefix.endswith(f".{projection}"):
                old = prefix.removesuffix(projection) + f"processor.{projection}_lora"
                assert key_map.resolve(old) is ref, old
        if prefix.endswith(".to_out.0"):
            assert key_map.resolve(prefix.removesuffix("to_out.0") + "processor.to_out_lora") is ref


def _toggle_text_model(prefix: str) -> str:
    """The same text-encoder name with CLIP's `text_model` segment added or removed."""
    for head in ("lora_te1_", "lora_te2_", "lora_te_"):
        if prefix.startswith(head):
            rest = prefix.removeprefix(head)
            return head + (
                rest.removeprefix("text_model_")
                if rest.startswith("text_model_")
                else "text_model_" + rest
            )
    head, _, rest = prefix.partition(".")
    return f"{head}." + (
        rest.removeprefix("text_model.") if rest.startswith("text_model.") else "text_model." + rest
    )


def test_text_encoder_names_with_and_without_text_model(
    pipelines: dict[Arch, DiffusionPipeline], lycoris_preset: str, tmp_path: Path
) -> None:
    pipeline = pipelines[Arch.SDXL]
    wrapped = _lycoris_file(pipeline, lycoris_preset, tmp_path / "lycoris.safetensors")
    key_map = KeyMap.from_pipeline(pipeline)
    text_names = [n for n in wrapped if n.startswith("lora_te")]
    # transformers 5 drops text_model from CLIPTextModel only: LyCORIS names differ per encoder.
    assert any(n.startswith("lora_te1_encoder_") for n in text_names)
    assert any(n.startswith("lora_te2_text_model_encoder_") for n in text_names)
    for name in text_names:
        toggled = _toggle_text_model(name)
        assert key_map.resolve(toggled) is not None, toggled
        assert key_map.resolve(toggled).module is wrapped[name], toggled  # type: ignore[union-attr]
        if name.startswith("lora_te1_"):
            # Kohya's single-encoder prefix names te1 on SDXL.
            assert key_map.resolve(name.replace("lora_te1_", "lora_te_", 1)).module is wrapped[name]  # type: ignore[union-attr]
    dotted = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": pipeline.text_encoder,
        "text_encoder.encoder.layers.0.self_attn.q_proj": pipeline.text_encoder,
        "text_encoder_2.encoder.layers.0.mlp.fc1": pipeline.text_encoder_2,
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1": pipeline.text_encoder_2,
    }
    for prefix, model in dotted.items():
        ref = key_map.resolve(prefix)
        assert ref is not None, prefix
        assert model.get_submodule(ref.path) is ref.module
    assert key_map.resolve("text_encoder_2.text_projection").path == "text_projection"  # type: ignore[union-attr]


def test_unknown_names_are_listed(pipelines: dict[Arch, DiffusionPipeline]) -> None:
    sd1 = KeyMap.from_pipeline(pipelines[Arch.SD1])
    good = "lora_unet_down_blocks_0_attentions_0_proj_in"
    bad = [
        "lora_te2_text_model_encoder_layers_0_mlp_fc1",  # no second encoder on SD1
        "lora_unet_down_blocks_9_attentions_0_proj_in",
        "lora_unet_down_blocks_0_attentions_0",  # a container, not a weight-owning module
        "something_else",
        "unet.down_blocks.0.attentions.0.nothing",
    ]
    match = sd1.match([good, *bad, good])
    assert set(match.resolved) == {good}
    assert match.unmatched == tuple(sorted(bad))
    assert sd1.resolve(good).path == "down_blocks.0.attentions.0.proj_in"  # type: ignore[union-attr]
    assert Component.TEXT_ENCODER_2 not in sd1.components


def test_names_no_detector_owns_do_not_outvote_a_known_format() -> None:
    """A ComfyUI-saved FLUX.1 LoRA with more CLIP-L modules (`text_encoders.clip_l.`, owned by
    no detector) than transformer ones is still named by its transformer names' format."""
    from webui.networks.format.key_formats import UNKNOWN, identify_format

    clip = [
        f"text_encoders.clip_l.transformer.text_model.encoder.layers.{i}.self_attn.q_proj"
        for i in range(3)
    ]
    assert identify_format(["diffusion_model.double_blocks.0.img_attn.qkv", *clip]) == (
        "original (LDM) layout"
    )
    assert identify_format(clip) == UNKNOWN
