"""FLUX.1 checkpoints through the user's path: tiny dev/schnell pipelines written as real files
(BFL and diffusers layouts, all-in-one and transformer-only with separate parts, bf16 and fp8)
load back bit-identical and generate; the BFL layout matches diffusers' own converter."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from webui.arch import Arch, FluxVariant
from webui.engine.checkpoints import (
    CheckpointError,
    ModelKind,
    checkpoint_from_path,
    find_checkpoints,
    flux_part_state,
    load_checkpoint,
    read_header,
    save_single_file,
)
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.families.flux1 import model as flux1
from webui.layouts.flux import diffusers_to_bfl
from webui.networks.format.files import write_safetensors

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipes():
    return {v: build_pipeline(ModelSpec(Arch.FLUX1, variant=v), seed=3) for v in FluxVariant}


def _kind(variant: FluxVariant) -> ModelKind:
    return ModelKind(Arch.FLUX1, None, variant=variant)


def _assert_identical(original, loaded, dtype: torch.dtype) -> None:
    """Every loaded weight equals the written one: the original rounded to the file's dtype."""
    for name in COMPONENTS:
        want = getattr(original, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert set(want) == set(got), name
        for key, tensor in want.items():
            expected = tensor.to(dtype).to(torch.float32)
            assert got[key].dtype == torch.float32, key
            assert torch.equal(got[key], expected), f"{name}.{key}"


def _generates(pipe) -> None:
    image = pipe(
        "a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3)


def _write_parts(pipe, models: Path, dtype: torch.dtype, skip: str = "") -> None:
    """The separate downloads: clip_l / t5xxl in text_encoders/, ae in vae/ (no prefixes)."""
    names = {"text_encoder": "clip_l", "text_encoder_2": "t5xxl_fp8", "vae": "ae"}
    for part in flux1.PARTS:
        if part.component == skip:
            continue
        state = {k: v.to(dtype).contiguous() for k, v in flux_part_state(pipe, part).items()}
        config = getattr(pipe, part.component).config
        raw = config.to_json_string() if hasattr(config, "to_json_string") else None
        if raw is None:
            import json

            raw = json.dumps(dict(config))
        meta = {"lora_webui.component_configs": f'{{"{part.component}": {raw}}}'}
        write_safetensors(
            models / part.folder / f"{names[part.component]}.safetensors", state, meta
        )


CASES = [
    (variant, dtype) for variant in FluxVariant for dtype in (torch.bfloat16, torch.float8_e4m3fn)
]


@pytest.mark.parametrize(("variant", "dtype"), CASES, ids=str)
def test_all_in_one_bfl_file_loads_back(pipes, tmp_path: Path, variant, dtype) -> None:
    pipe = pipes[variant]
    path = tmp_path / "models" / "flux-aio.safetensors"
    save_single_file(pipe, _kind(variant), path, embed_configs=True, dtype=dtype)
    keys = read_header(path).shapes
    # ComfyUI's all-in-one names, BFL transformer layout
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in keys
    assert "model.diffusion_model.single_blocks.1.linear1.weight" in keys
    assert ("model.diffusion_model.guidance_in.in_layer.weight" in keys) is (
        variant is FluxVariant.DEV
    )
    assert any(k.startswith("text_encoders.clip_l.transformer.text_model.") for k in keys)
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight" in keys
    assert "vae.decoder.conv_in.weight" in keys
    loaded = load_checkpoint(checkpoint_from_path(path), CPU, torch.float32)
    assert loaded.kind == _kind(variant)
    _assert_identical(pipe, loaded.pipe, dtype)
    _generates(loaded.pipe)


@pytest.mark.parametrize(("variant", "dtype"), CASES, ids=str)
@pytest.mark.parametrize("layout", ["bfl", "bfl-bare", "diffusers"])
def test_transformer_only_file_takes_parts_from_models(
    pipes, tmp_path: Path, variant, dtype, layout: str
) -> None:
    pipe = pipes[variant]
    models = tmp_path / "models"
    path = models / "flux" / f"flux-{layout}.safetensors"
    if layout == "diffusers":
        state = {k: v.to(dtype) for k, v in pipe.transformer.state_dict().items()}
        write_safetensors(path, state)
    else:
        save_single_file(
            pipe, _kind(variant), path, with_parts=False, dtype=dtype, embed_configs=True
        )
        if layout == "bfl-bare":  # as BFL releases it: no prefix
            state = {k.removeprefix("model.diffusion_model."): v for k, v in _read(path).items()}
            write_safetensors(path, state)
    _write_parts(pipe, models, dtype)
    # the tiny rope axes are not in the weights: the embedded config (or configs/) gives them
    if layout != "bfl":
        _embed_transformer_config(path, pipe)
    assert [c.name for c in find_checkpoints(models)] == [f"flux/flux-{layout}"]
    loaded = load_checkpoint(find_checkpoints(models)[0], CPU, torch.float32)
    assert loaded.kind.variant is variant
    _assert_identical(pipe, loaded.pipe, dtype)
    _generates(loaded.pipe)


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _embed_transformer_config(path: Path, pipe) -> None:
    import json

    raw = json.dumps({"transformer": dict(pipe.transformer.config)})
    write_safetensors(path, _read(path), {"lora_webui.component_configs": raw})


def test_bfl_transformer_file_without_configs_uses_dims_from_file(pipes, tmp_path) -> None:
    """No embedded configs: the transformer's sizes come from the tensors; the rope axes of
    the tiny model (4+6+6 = 16) cannot, so the message says what is wrong."""
    pipe = pipes[FluxVariant.DEV]
    path = tmp_path / "models" / "bare.safetensors"
    save_single_file(pipe, _kind(FluxVariant.DEV), path, with_parts=False)
    _write_parts(pipe, tmp_path / "models", torch.float32)
    with pytest.raises(CheckpointError, match="rope axes"):
        load_checkpoint(checkpoint_from_path(path), CPU, torch.float32)


def test_missing_t5_is_named(pipes, tmp_path: Path) -> None:
    pipe = pipes[FluxVariant.SCHNELL]
    models = tmp_path / "models"
    path = models / "flux-schnell.safetensors"
    save_single_file(pipe, _kind(FluxVariant.SCHNELL), path, embed_configs=True, with_parts=False)
    _write_parts(pipe, models, torch.bfloat16, skip="text_encoder_2")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(checkpoint_from_path(path), CPU, torch.float32)
    message = str(info.value)
    assert "flux-schnell.safetensors" in message
    assert "T5-XXL" in message and "models/text_encoders/" in message
    assert "CLIP-L" not in message and "VAE" not in message


def test_bfl_layout_matches_diffusers_converter() -> None:
    """Full width (3072, 24 heads, MLP 12288) with one block each: diffusers' own converter,
    which assumes the full size, turns our BFL tensors back into the model's exact weights."""
    config = {"num_layers": 1, "num_single_layers": 1, "guidance_embeds": True}
    with torch.device("meta"):
        shapes = {
            k: v.shape for k, v in FluxTransformer2DModel.from_config(config).state_dict().items()
        }
    generator = torch.Generator().manual_seed(0)
    # drawn straight in bf16 (randint then a cast costs twice as long for these ~0.5 G values)
    original = {
        k: torch.randn(shape, generator=generator, dtype=torch.bfloat16)
        for k, shape in shapes.items()
    }
    reference = convert_flux_transformer_checkpoint_to_diffusers(dict(diffusers_to_bfl(original)))
    assert set(reference) == set(original)
    for key, tensor in original.items():
        assert torch.equal(reference[key], tensor), key
