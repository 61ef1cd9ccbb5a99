"""Issue 18: the diffusers fallback on FLUX.1. Files forced through it must give what native gives
and what diffusers' own `load_lora_weights` + `fuse_lora` gives on a copy of the model (the
independent reference), auto routing must keep native for the files native maps, the backend of
each LoRA must be reported, restore must be bit-exact, and a file diffusers cannot take (its FLUX.1
converters assume the 12B widths) must be one sentence naming it, with nothing written."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from webui.arch import Arch, FluxVariant
from webui.engine.checkpoints import ModelKind
from webui.engine.generation_controls import controls_for
from webui.engine.lora_backends import LoraBackends
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.engine.network_set import ChosenNetwork
from webui.networks.apply.diffusers_backend import has_peft_layers
from webui.networks.apply.strengths import Strengths
from webui.networks.format.network import read_network
from webui.settings import LoraBackend

SPEC = ModelSpec(Arch.FLUX1, variant=FluxVariant.DEV)
FLUX_META = {"modelspec.architecture": "flux-1-dev/lora"}  # tiny widths name no family by keys
RANK = 4
TRANSFORMER_TARGETS = (
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.1.ff.net.0.proj",
    "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.1.proj_out",
    "single_transformer_blocks.1.attn.to_v",
)
CLIP_TARGET = "encoder.layers.0.self_attn.q_proj"  # CLIPTextModel's path in transformers 5


def _pipe():
    return build_pipeline(SPEC, seed=3, with_vae=False)


def _low_rank(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(shape[0], RANK, generator=g) * 0.1
    return up, torch.randn(RANK, shape[1], generator=g) * 0.1


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights under their plain names, PEFT wrappers (`base_layer.`) and adapters left out."""
    return {
        k.replace(".base_layer.", "."): v
        for k, v in model.state_dict().items()
        if ".lora_" not in k and "lora_magnitude" not in k
    }


def _peft_file(tmp_path: Path, pipe, *, clip: bool = True) -> tuple[Path, dict[str, torch.Tensor]]:
    modules = dict(pipe.transformer.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    for i, target in enumerate(TRANSFORMER_TARGETS):
        up, down = _low_rank(20 + i, tuple(modules[target].weight.shape))
        tensors[f"transformer.{target}.lora_A.weight"] = down
        tensors[f"transformer.{target}.lora_B.weight"] = up
    if clip:
        q_proj = dict(pipe.text_encoder.named_modules())[CLIP_TARGET]
        up, down = _low_rank(30, tuple(q_proj.weight.shape))
        tensors[f"text_encoder.text_model.{CLIP_TARGET}.lora_A.weight"] = down
        tensors[f"text_encoder.text_model.{CLIP_TARGET}.lora_B.weight"] = up
    path = tmp_path / "peft_flux.safetensors"
    save_file(tensors, path, metadata=FLUX_META)
    return path, tensors


def _apply(pipe, path: Path, strengths: Strengths, choice: LoraBackend, *, fuse: bool = False):
    network = read_network(path)
    backends = LoraBackends(pipe, Arch.FLUX1, fuse=fuse)
    routed = backends.apply([ChosenNetwork(network.name, network, strengths)], choice)
    return backends, routed


def _close(got: torch.Tensor, want: torch.Tensor, key: str) -> None:
    assert (got - want).abs().max() <= 1e-5 * max(float(want.abs().max()), 1e-12), key


def _inputs(transformer) -> dict[str, torch.Tensor]:
    """One denoiser call's inputs for the tiny transformer (4 image tokens, 3 text tokens)."""
    g = torch.Generator().manual_seed(0)
    config = transformer.config
    return {
        "hidden_states": torch.randn(1, 4, config.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(1, 3, config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(4, 3),
        "txt_ids": torch.zeros(3, 3),
        "guidance": torch.tensor([3.5]),
    }


@torch.no_grad()
def _forward(pipe) -> torch.Tensor:
    return pipe.transformer(**_inputs(pipe.transformer), return_dict=False)[0]


@pytest.mark.parametrize("multiplier", [1.0, 0.7])
def test_forced_diffusers_equals_diffusers_fuse_and_native(tmp_path: Path, multiplier) -> None:
    ours, native, reference = _pipe(), _pipe(), _pipe()
    path, tensors = _peft_file(tmp_path, ours)
    before = _state(ours.transformer)
    backends, routed = _apply(ours, path, Strengths.uniform(multiplier), LoraBackend.DIFFUSERS)
    assert [r.backend for r in routed.routes] == [LoraBackend.DIFFUSERS]
    assert routed.applied and not routed.warnings, routed.warnings
    assert has_peft_layers(ours)  # adapters at run time, weights untouched
    assert all(torch.equal(v, before[k]) for k, v in _base_state(ours.transformer).items())
    # independent reference: diffusers' own loader and fuse on a copy of the same model
    reference.load_lora_weights({k: v.clone() for k, v in tensors.items()}, adapter_name="ref")
    reference.fuse_lora(components=["transformer", "text_encoder"], lora_scale=multiplier)
    want, got = _forward(reference), _forward(ours)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # native writes the same weights diffusers fuses
    _apply(native, path, Strengths.uniform(multiplier), LoraBackend.NATIVE)
    ref_weights = _base_state(reference.transformer)
    for key, value in native.transformer.state_dict().items():
        _close(value, ref_weights[key], key)
    _close(_forward(native), got, "output")
    backends.restore()
    assert not has_peft_layers(ours)
    assert all(torch.equal(v, before[k]) for k, v in ours.transformer.state_dict().items())


def test_fused_fallback_weights_equal_native_and_restore_bit_exact(tmp_path: Path) -> None:
    ours, native = _pipe(), _pipe()
    path, _ = _peft_file(tmp_path, ours)
    before = {"transformer": _state(ours.transformer), "text_encoder": _state(ours.text_encoder)}
    backends, routed = _apply(
        ours, path, Strengths(te1=0.5, unet=0.7), LoraBackend.DIFFUSERS, fuse=True
    )
    assert routed.applied and not routed.warnings, routed.warnings
    assert backends.fallback.is_fused
    _apply(native, path, Strengths(te1=0.5, unet=0.7), LoraBackend.NATIVE)
    for name in ("transformer", "text_encoder"):
        fused = _base_state(getattr(ours, name))
        for key, value in getattr(native, name).state_dict().items():
            _close(fused[key], value, f"{name}.{key}")
    # te1 is CLIP-L's scale: its q_proj moved by exactly 0.5 of the file's delta
    q_proj = dict(ours.text_encoder.named_modules())[CLIP_TARGET]
    weight = q_proj.get_base_layer().weight if hasattr(q_proj, "get_base_layer") else q_proj.weight
    up, down = _low_rank(30, tuple(weight.shape))
    _close(weight, before["text_encoder"][f"{CLIP_TARGET}.weight"] + 0.5 * up @ down, "te1")
    backends.restore()
    assert not has_peft_layers(ours)
    for name, state in before.items():
        after = getattr(ours, name).state_dict()
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], v) for k, v in state.items()), name


def test_switch_between_fallback_files_then_restore_is_bit_exact(tmp_path: Path) -> None:
    pipe = _pipe()
    first, _ = _peft_file(tmp_path, pipe)
    second = tmp_path / "second.safetensors"
    module = dict(pipe.transformer.named_modules())["transformer_blocks.1.attn.to_k"]
    up, down = _low_rank(50, tuple(module.weight.shape))
    save_file(
        {
            "transformer.transformer_blocks.1.attn.to_k.lora_A.weight": down,
            "transformer.transformer_blocks.1.attn.to_k.lora_B.weight": up,
        },
        second,
        metadata=FLUX_META,
    )
    before = _state(pipe.transformer)
    backends = LoraBackends(pipe, Arch.FLUX1, fuse=True)
    for path in (first, second, first):
        network = read_network(path)
        routed = backends.apply(
            [ChosenNetwork(network.name, network, Strengths.uniform(0.8))], LoraBackend.DIFFUSERS
        )
        assert routed.applied and not routed.warnings, routed.warnings
    backends.restore()
    assert not has_peft_layers(pipe)
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())


def test_auto_keeps_native_for_a_file_native_maps_and_says_so(tmp_path: Path) -> None:
    pipe = _pipe()
    path, _ = _peft_file(tmp_path, pipe)
    backends, routed = _apply(pipe, path, Strengths.uniform(1.0), LoraBackend.AUTO)
    (route,) = routed.routes
    assert route.backend is LoraBackend.NATIVE and route.applied
    assert route.describe() == "peft_flux: native backend, applied (auto: native maps every module)"
    assert not has_peft_layers(pipe)
    backends.restore()


def test_forcing_diffusers_is_reported(tmp_path: Path) -> None:
    """Before issue 18's fallback work this file was refused ("native patcher only")."""
    pipe = _pipe()
    path, _ = _peft_file(tmp_path, pipe)
    backends, routed = _apply(pipe, path, Strengths.uniform(1.0), LoraBackend.DIFFUSERS)
    (route,) = routed.routes
    assert route.describe() == (
        "peft_flux: diffusers backend, applied (LoRA backend setting: diffusers)"
    )
    assert list(backends.fallback.adapters.values()) == ["peft_flux"]
    backends.restore()


def test_kohya_xlabs_and_onetrainer_through_diffusers_equal_native(tmp_path: Path) -> None:
    """The converters that run at any width: kohya's fused double-block qkv (split evenly),
    XLabs' image/text qkv, OneTrainer's diffusers names with alpha."""
    pipe, native = _pipe(), _pipe()
    transformer = pipe.transformer
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    to_q = tuple(dict(transformer.named_modules())["transformer_blocks.1.attn.to_q"].weight.shape)
    files = {
        "kohya": {
            "lora_unet_double_blocks_0_img_attn_qkv": (3 * hidden, hidden, 2.0, "lora_up"),
            "lora_unet_double_blocks_1_txt_attn_qkv": (3 * hidden, hidden, None, "lora_up"),
        },
        "onetrainer": {"lora_transformer_transformer_blocks_1_attn_to_q": (*to_q, 8.0, "lora_up")},
    }
    paths = []
    for name, modules in files.items():
        tensors = {}
        for i, (key, (rows, cols, alpha, up_name)) in enumerate(modules.items()):
            up, down = _low_rank(60 + i, (rows, cols))
            tensors[f"{key}.{up_name}.weight"], tensors[f"{key}.lora_down.weight"] = up, down
            if alpha is not None:
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
        paths.append(tmp_path / f"{name}.safetensors")
        save_file(tensors, paths[-1], metadata={"ss_base_model_version": "flux1"})
    up, down = _low_rank(70, (3 * hidden, hidden))
    paths.append(tmp_path / "xlabs.safetensors")
    save_file(
        {
            "double_blocks.0.processor.qkv_lora2.up.weight": up,
            "double_blocks.0.processor.qkv_lora2.down.weight": down,
        },
        paths[-1],
        metadata={"ss_base_model_version": "flux1"},
    )
    networks = [read_network(p) for p in paths]
    chosen = [ChosenNetwork(n.name, n, Strengths.uniform(0.7)) for n in networks]
    before = _state(transformer)
    backends = LoraBackends(pipe, Arch.FLUX1, fuse=True)
    routed = backends.apply(chosen, LoraBackend.DIFFUSERS)
    assert len(routed.applied) == 3 and not routed.warnings, routed.warnings
    LoraBackends(native, Arch.FLUX1).apply(chosen, LoraBackend.NATIVE)
    fused = _base_state(transformer)
    for key, value in native.transformer.state_dict().items():
        _close(fused[key], value, key)
    backends.restore()
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())


def test_per_block_weights_warn_and_apply_the_plain_strengths(tmp_path: Path) -> None:
    pipe, plain = _pipe(), _pipe()
    path, _ = _peft_file(tmp_path, pipe, clip=False)
    blocks = Strengths(te=0.6, unet=0.6, in_blocks=0.0, blocks={"IN01": 0.0})
    backends, routed = _apply(pipe, path, blocks, LoraBackend.DIFFUSERS)
    assert routed.applied
    assert routed.warnings == [
        "peft_flux: diffusers scales this model's transformer only as a whole, so the diffusers "
        "backend ignored its per-block weights and applied the plain strengths"
    ]
    _apply(plain, path, Strengths.uniform(0.6), LoraBackend.DIFFUSERS)
    assert torch.equal(_forward(pipe), _forward(plain))
    backends.restore()


def _kohya_file(
    tmp_path: Path, name: str, key: str, shape: tuple[int, ...], seed: int, **metadata: str
) -> Path:
    """A one-module LoRA in kohya's up/down names."""
    up, down = _low_rank(seed, shape)
    path = tmp_path / f"{name}.safetensors"
    save_file({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down}, path, metadata)
    return path


def _kohya_linear1(tmp_path: Path, pipe) -> Path:
    single = dict(pipe.transformer.named_modules())["single_transformer_blocks.0"]
    rows = 3 * single.attn.to_q.weight.shape[0] + single.proj_mlp.weight.shape[0]
    shape = (rows, single.attn.to_q.weight.shape[1])
    return _kohya_file(tmp_path, "linear1", "lora_unet_single_blocks_0_linear1", shape, 80)


def _t5(tmp_path: Path, pipe) -> Path:
    q = dict(pipe.text_encoder_2.named_modules())["encoder.block.0.layer.0.SelfAttention.q"]
    key = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    return _kohya_file(
        tmp_path, "t5", key, tuple(q.weight.shape), 81, ss_base_model_version="flux1"
    )


def _onetrainer_without_alpha(tmp_path: Path, pipe) -> Path:
    to_q = dict(pipe.transformer.named_modules())["transformer_blocks.0.attn.to_q"]
    key = "lora_transformer_transformer_blocks_0_attn_to_q"
    shape = tuple(to_q.weight.shape)
    return _kohya_file(tmp_path, "onetrainer", key, shape, 82, ss_base_model_version="flux1")


def _peft_wrapper(tmp_path: Path, pipe) -> Path:
    to_q = dict(pipe.transformer.named_modules())["transformer_blocks.0.attn.to_q"]
    up, down = _low_rank(83, tuple(to_q.weight.shape))
    path = tmp_path / "simpletuner.safetensors"
    key = "base_model.model.transformer_blocks.0.attn.to_q"
    save_file({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}, path, metadata=FLUX_META)
    return path


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (
            _kohya_linear1,
            "fused single-block linear1 layers of 224 rows, which diffusers' FLUX.1 converter "
            "splits only at the full model's 21504 (3072 x 3 + 12288)",
        ),
        (
            _t5,
            "T5 (te2) layers such as lora_te3_encoder_block_0_layer_0_SelfAttention_q, which "
            "diffusers' FLUX.1 loader drops (it loads the transformer and CLIP-L only)",
        ),
        (
            _onetrainer_without_alpha,
            "OneTrainer layers without alpha such as "
            "lora_transformer_transformer_blocks_0_attn_to_q, which diffusers' FLUX.1 converter "
            "requires",
        ),
        (
            _peft_wrapper,
            "PEFT `base_model.model.` names on diffusers layers, which diffusers' FLUX.1 loader "
            "mistakes for fal's BFL layout",
        ),
    ],
    ids=["kohya-linear1", "t5", "onetrainer-no-alpha", "base-model-wrapper"],
)
def test_a_file_diffusers_cannot_take_is_one_sentence_and_writes_nothing(
    tmp_path: Path, write, reason: str
) -> None:
    pipe = _pipe()
    path = write(tmp_path, pipe)
    before = {
        c: _state(getattr(pipe, c)) for c in ("transformer", "text_encoder", "text_encoder_2")
    }
    _, routed = _apply(pipe, path, Strengths.uniform(1.0), LoraBackend.DIFFUSERS)
    assert routed.warnings == [f"{path.name}: diffusers cannot load it: {reason}"]
    assert not routed.applied and not has_peft_layers(pipe)
    for component, state in before.items():
        after = getattr(pipe, component).state_dict()
        assert all(torch.equal(after[k], v) for k, v in state.items()), component
    # the same file in auto mode goes to native, which maps it
    _, auto = _apply(pipe, path, Strengths.uniform(1.0), LoraBackend.AUTO)
    assert [r.backend for r in auto.routes] == [LoraBackend.NATIVE] and auto.applied


@pytest.mark.parametrize(
    "write",
    [_kohya_linear1, _t5, _onetrainer_without_alpha, _peft_wrapper],
    ids=["kohya-linear1", "t5", "onetrainer-no-alpha", "base-model-wrapper"],
)
def test_the_refused_files_really_fail_in_diffusers(tmp_path: Path, write) -> None:
    """The key checks agree with diffusers 0.42.1 itself: each refused file raises in
    `load_lora_weights` or leaves its layers out (T5)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = _pipe()
    path = write(tmp_path, pipe)
    try:
        pipe.load_lora_weights(str(path), adapter_name="probe")
    except (AssertionError, KeyError, ValueError):
        return
    models = (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
    wrapped = sum(isinstance(m, BaseTunerLayer) for model in models for m in model.modules())
    assert wrapped < len(read_network(path).modules)


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (_kohya_linear1, "AssertionError in its converter"),
        (
            _onetrainer_without_alpha,
            "its converter expects the key 'lora_transformer_transformer_blocks_0_attn_to_q.alpha'"
            ", which the file lacks",
        ),
    ],
    ids=["assert", "key-error"],
)
def test_a_failing_diffusers_load_is_one_sentence_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write, reason: str
) -> None:
    """Without the key checks, diffusers' own failure (an assert, a missing key) still becomes
    one sentence and leaves no adapter and the weights bit-exact."""
    import webui.networks.apply.diffusers_backend as fallback

    monkeypatch.setattr(fallback, "refusal_reason", lambda network, arch: None)
    pipe = _pipe()
    path = write(tmp_path, pipe)
    before = _state(pipe.transformer)
    backends = LoraBackends(pipe, Arch.FLUX1)
    network = read_network(path)
    routed = backends.apply(
        [ChosenNetwork(network.name, network, Strengths.uniform(1.0))], LoraBackend.DIFFUSERS
    )
    assert routed.warnings == [f"{path.name}: diffusers could not load it ({reason})"]
    assert not routed.applied and not has_peft_layers(pipe)
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())


def test_the_flux_txt2img_page_offers_the_backend_choice() -> None:
    for variant in FluxVariant:
        assert controls_for(ModelKind(Arch.FLUX1, None, variant=variant)).loras


@pytest.fixture(scope="module")
def flux_engine(tmp_path_factory):
    from engine_settings import cpu_settings
    from flux_models import write_flux_models

    from webui.engine.generate import Engine

    root = tmp_path_factory.mktemp("flux-fallback")
    models, loras = root / "models", root / "loras"
    models.mkdir()
    loras.mkdir()
    settings = cpu_settings(models, loras, root, save_outputs=False)
    names = write_flux_models(models)
    engine = Engine(settings)
    engine.load(names[FluxVariant.DEV])
    return engine


def test_generation_through_the_fallback_is_reported_and_matches_native(flux_engine) -> None:
    """Through the Engine (what the UI and API call): a scheduled FLUX LoRA forced through
    diffusers gives native's image within one 8-bit level, and the result says which backend
    took it (the panel under the image and the infotext)."""
    import numpy as np

    from webui.engine.generate import GenerationRequest

    eng = flux_engine
    _peft_file(eng.settings.loras_dir, eng.model.pipe)
    eng.catalog.refresh()
    small = {"steps": 3, "width": 64, "height": 64, "seed": 11, "cfg_scale": 1.0}
    prompt = "a fox <lora:peft_flux:1:unet=1.5@1,0.3@3>"
    images = {}
    for choice in (LoraBackend.NATIVE, LoraBackend.DIFFUSERS):
        result = eng.generate(GenerationRequest(prompt, lora_backend=choice, **small))
        assert not result.warnings, result.warnings
        (route,) = result.lora_routes
        assert route.backend is choice and route.applied
        assert result.images[0].infotext.params["Lora backend"] == f"peft_flux={choice.value}"
        images[choice] = np.asarray(result.images[0].image).astype(np.int16)
    plain = eng.generate(GenerationRequest("a fox", **small))
    assert np.abs(images[LoraBackend.NATIVE] - images[LoraBackend.DIFFUSERS]).max() <= 1
    assert not np.array_equal(images[LoraBackend.NATIVE], np.asarray(plain.images[0].image))
    assert not has_peft_layers(eng.model.pipe)
