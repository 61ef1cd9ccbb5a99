"""The diffusers fallback against the native patcher, and the diffusers 0.42.1 traps it handles.

The reference for every image is the native patcher (itself checked against LyCORIS and
diffusers' own merges in test_patcher_reference.py); the reference for what diffusers accepts
is diffusers' own `load_lora_weights`."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from lora_files import (
    one_torch_thread,
    register_preset,
    rename_to_ldm,
    write_kohya_layers,
    write_kohya_lora,
    write_lycoris,
    write_peft,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from pipeline_copies import pipeline_copy

from webui.arch import Arch
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.networks.apply.diffusers_backend import (
    ADAPTER_PREFIX,
    DiffusersBackend,
    adapter_name,
    has_peft_layers,
    refusal_reason,
    tuner_layers,
)
from webui.networks.apply.patcher import NetworkPatcher
from webui.networks.apply.strengths import Strengths
from webui.networks.format.network import Network, load_network

ARCH = Arch.SD1
# Same seed, fp32: the backends differ only by where the low-rank product is added (weight vs
# activation), a few float32 roundings; one 8-bit level is far above that and far below a LoRA.
MAX_PIXEL_DIFF = 1.0

STRENGTHS = {
    "uniform": Strengths.uniform(0.8),
    "per-component": Strengths(te=0.3, unet=1.1),
    "in-mid-out": Strengths(te=1.0, unet=1.0, in_blocks=0.0, mid=0.5, out=1.0),
    "lbw": Strengths(
        te=1.0,
        unet=1.0,
        blocks={"BASE": 1.0, "IN01": 0.0, "IN02": 1.0, "M00": 0.3, "OUT03": 0.0, "OUT05": 1.0},
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def base() -> DiffusionPipeline:
    torch.manual_seed(0)
    pipe = build_pipeline(ModelSpec(ARCH))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def files(base: DiffusionPipeline, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A kohya LoRA (attention layers), a LyCORIS LoCon, a diffusers PEFT file, a LoHa and the
    formats diffusers cannot load."""
    folder = tmp_path_factory.mktemp("loras")
    out = {"kohya": folder / "kohya.safetensors"}
    write_kohya_layers(
        out["kohya"],
        base,
        ARCH,
        include=lambda component, path: component != "unet" or ".attentions." in path,
        std=0.15,
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        preset = register_preset(monkeypatch, "diffusers-backend")
        for name, algo, options in (
            ("locon", "locon", {"conv_dim": 8, "conv_alpha": 2}),
            ("loha", "loha", {}),
            ("lokr", "lokr", {}),
            ("tucker", "lora", {"use_tucker": True}),
            ("dora", "lora", {"dora_wd": True}),
            ("full", "full", {}),
            ("ia3", "ia3", {}),
            ("oft", "diag-oft", {}),
        ):
            target = pipeline_copy(base)
            out[name] = folder / f"{name}.safetensors"
            write_lycoris(target, out[name], preset=preset, algo=algo, std=0.05, **options)
    out["locon-ldm"] = folder / "locon-ldm.safetensors"
    rename_to_ldm(base.unet, out["locon"], out["locon-ldm"])
    out["peft"] = write_peft(pipeline_copy(base), folder / "peft")
    out["kohya-te-qv"] = folder / "kohya-te-qv.safetensors"  # text encoder q/v only
    write_kohya_lora(out["kohya-te-qv"], ARCH)
    return out


@pytest.fixture(scope="module")
def native_pipe(base: DiffusionPipeline) -> Iterator[tuple[DiffusionPipeline, NetworkPatcher]]:
    pipe = pipeline_copy(base)
    yield pipe, NetworkPatcher(pipe, ARCH)


@pytest.fixture(scope="module")
def plain(base: DiffusionPipeline) -> np.ndarray:
    """The base model's image: what every fresh `fallback` pipeline renders before a LoRA."""
    return render(pipeline_copy(base))


@pytest.fixture
def fallback(base: DiffusionPipeline) -> tuple[DiffusionPipeline, DiffusersBackend]:
    pipe = pipeline_copy(base)
    return pipe, DiffusersBackend(pipe, ARCH)


def render(pipe: DiffusionPipeline, steps: int = 2) -> np.ndarray:
    """0..255 floats, fp32, fixed seed."""
    output = pipe(
        prompt="a cat",
        num_inference_steps=steps,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
    )
    return output.images[0] * 255.0


def native_image(native_pipe: Any, network: Network, strengths: Strengths) -> np.ndarray:
    pipe, patcher = native_pipe
    patcher.apply([(network, strengths)])
    try:
        return render(pipe)
    finally:
        patcher.restore()


def weights(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every text-encoder and UNet weight, read through PEFT wrappers to the base layers."""
    out = {}
    for component in ("text_encoder", "unet"):
        for key, tensor in getattr(pipe, component).state_dict().items():
            if ".lora_" not in key:
                out[f"{component}.{key.replace('.base_layer.', '.')}"] = tensor.clone()
    return out


def assert_same_weights(pipe: DiffusionPipeline, expected: dict[str, torch.Tensor]) -> None:
    now = weights(pipe)
    assert set(now) == set(expected)
    for key, tensor in now.items():
        assert torch.equal(tensor, expected[key]), key


@pytest.mark.parametrize("strength", list(STRENGTHS))
@pytest.mark.parametrize("kind", ["kohya", "locon", "peft"])
def test_images_agree_with_native(
    kind: str,
    strength: str,
    files: dict[str, Path],
    native_pipe: Any,
    fallback: Any,
    plain: np.ndarray,
) -> None:
    network, strengths = load_network(files[kind]), STRENGTHS[strength]
    reference = native_image(native_pipe, network, strengths)
    pipe, backend = fallback
    report = backend.apply([(network, strengths)])
    assert report.warnings == []
    image = render(pipe)
    difference = float(np.abs(image - reference).max())
    print(f"{kind} {strength}: max pixel difference native vs diffusers {difference:.5f}")
    assert difference <= MAX_PIXEL_DIFF
    assert float(np.abs(image - plain).max()) > 10 * MAX_PIXEL_DIFF  # the LoRA does something


def test_removal_unloads_every_adapter(
    files: dict[str, Path], fallback: Any, base: DiffusionPipeline
) -> None:
    pipe, backend = fallback
    original, plain = weights(pipe), render(pipe)
    networks = [load_network(files[k]) for k in ("kohya", "locon", "peft")]
    backend.apply([(n, 0.7) for n in networks])
    assert has_peft_layers(pipe)
    backend.apply([])
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.text_encoder.modules())
    assert np.array_equal(render(pipe), plain)
    assert_same_weights(pipe, original)


def test_removing_one_leaves_no_idle_wrapper(files: dict[str, Path], fallback: Any) -> None:
    pipe, backend = fallback
    kohya, locon = load_network(files["kohya"]), load_network(files["locon"])
    backend.apply([(kohya, 1.0), (locon, 1.0)])
    backend.apply([(kohya, 1.0)])
    (adapter,) = backend.adapters
    for model in (pipe.unet, pipe.text_encoder):
        for path, layer in tuner_layers(model):
            assert set(layer.lora_A) == {adapter}, path  # every wrapper serves the kept file
    layers = sum(1 for model in (pipe.unet, pipe.text_encoder) for _ in tuner_layers(model))
    assert layers == len(kohya.modules)


def test_schedules_move_scales_per_step(files: dict[str, Path], fallback: Any) -> None:
    class Ramp:
        def value_at(self, step: int, total_steps: int) -> float:
            return (step - 1) / (total_steps - 1)

    pipe, backend = fallback
    network = load_network(files["kohya"])
    backend.apply([(network, Strengths(te=1.0, unet=Ramp()))], step=1, total_steps=3)
    adapter = next(iter(backend.adapters))
    layer = next(layer for _, layer in tuner_layers(pipe.unet))
    unit = layer.lora_alpha[adapter] / layer.r[adapter]
    assert layer.scaling[adapter] == 0.0
    report = backend.set_step(2, 3)
    assert report is not None and {c.value for c in report.components_changed} == {"unet"}
    assert layer.scaling[adapter] == pytest.approx(0.5 * unit)


# -- formats diffusers cannot load -------------------------------------------------------------


REFUSED = {
    "loha": "loha",
    "lokr": "lokr",
    "tucker": "Tucker",
    "dora": "DoRA",
    "full": "full",
    "ia3": "ia3",
    "oft": "oft",
    "locon-ldm": "original (LDM) layout",
    "kohya-te-qv": "out_proj",
}


@pytest.mark.parametrize("kind", [*REFUSED, "kohya", "locon", "peft"])
def test_key_check_agrees_with_diffusers(
    kind: str, files: dict[str, Path], base: DiffusionPipeline
) -> None:
    """What our key check refuses is exactly what diffusers' own loader rejects or misloads
    (raises, or wraps other layers than the file has, or drops DoRA's magnitudes)."""
    network = load_network(files[kind])
    reason = refusal_reason(network, ARCH)
    pipe = pipeline_copy(base)
    try:
        pipe.load_lora_weights(str(files[kind]), adapter_name="probe_adapter")
        placed = sum(1 for m in (pipe.unet, pipe.text_encoder) for _ in tuner_layers(m))
        keeps_dora = any(layer.lora_magnitude_vector for _, layer in tuner_layers(pipe.unet))
        loads_correctly = placed == len(network.modules) and (
            keeps_dora or not any("dora_scale" in k for k in _keys(files[kind]))
        )
    except ValueError:
        loads_correctly = False
    if kind in REFUSED:
        assert reason is not None and REFUSED[kind] in reason
        assert not loads_correctly
    else:
        assert reason is None
        assert loads_correctly


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def test_a_refused_file_gets_a_clear_message_and_the_rest_applies(
    files: dict[str, Path], fallback: Any, native_pipe: Any
) -> None:
    pipe, backend = fallback
    original = weights(pipe)
    loha, kohya = load_network(files["loha"]), load_network(files["kohya"])
    report = backend.apply([(loha, 1.0), (kohya, 0.8)])
    (message,) = report.warnings
    assert message.startswith("loha.safetensors: diffusers cannot load it") and "loha" in message
    assert [r.applied for r in report.networks] == [False, True]
    image = render(pipe)
    assert (
        float(np.abs(image - native_image(native_pipe, kohya, Strengths.uniform(0.8))).max())
        <= MAX_PIXEL_DIFF
    )
    backend.apply([(loha, 1.0)])
    assert not has_peft_layers(pipe)
    assert_same_weights(pipe, original)


def test_a_failed_load_leaves_no_half_loaded_adapter(
    files: dict[str, Path], fallback: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """diffusers wraps the UNet before it fails on the text encoder; the backend undoes it."""
    pipe, backend = fallback
    network = load_network(files["kohya-te-qv"])
    monkeypatch.setattr("webui.networks.apply.diffusers_backend.refusal_reason", lambda n, a: None)
    report = backend.apply([(network, 1.0)])
    (message,) = report.warnings
    assert message.startswith("kohya-te-qv.safetensors: diffusers could not load it")
    assert "Could not automatically infer state dict type" in message
    assert not has_peft_layers(pipe)


# -- diffusers traps ---------------------------------------------------------------------------


def test_trap_global_scale_zero_resets_adapter_weights(
    files: dict[str, Path], fallback: Any
) -> None:
    """The trap is real in diffusers 0.42.1: one UNet call with `scale: 0` puts every adapter
    back to weight 1. The backend sets weights per adapter, so a zero stays a zero."""
    pipe, backend = fallback
    kohya, locon = load_network(files["kohya"]), load_network(files["locon"])
    backend.apply([(kohya, Strengths(te=0.0, unet=0.0)), (locon, 0.5)])
    names = {v: k for k, v in backend.adapters.items()}
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.proj_in")
    unit = {name: layer.lora_alpha[name] / layer.r[name] for name in names.values()}
    assert layer.scaling[names["kohya"]] == 0.0
    assert layer.scaling[names["locon"]] == pytest.approx(0.5 * unit[names["locon"]])
    render(pipe)  # a whole generation through the pipeline keeps them
    assert layer.scaling[names["kohya"]] == 0.0
    assert layer.scaling[names["locon"]] == pytest.approx(0.5 * unit[names["locon"]])
    # what a global scale of 0 would have done
    sample = torch.zeros(1, 4, 8, 8)
    context = torch.zeros(1, 77, pipe.unet.config.cross_attention_dim)
    pipe.unet(sample, 1, context, cross_attention_kwargs={"scale": 0.0})
    assert layer.scaling[names["kohya"]] == pytest.approx(unit[names["kohya"]])


def test_trap_fuse_scale_does_not_compound(
    files: dict[str, Path], base: DiffusionPipeline, native_pipe: Any
) -> None:
    """`fuse_lora(lora_scale=s)` multiplies the adapter scales in place, again on each fuse; the
    backend fuses at scale 1 with the strengths already in the adapters."""
    pipe = pipeline_copy(base)
    original = weights(pipe)
    backend = DiffusersBackend(pipe, ARCH, fuse=True)
    kohya, locon = load_network(files["kohya"]), load_network(files["locon"])
    reference = native_image(native_pipe, kohya, Strengths.uniform(0.5))
    for _ in range(2):  # fuse, unfuse for another set, fuse the first again
        backend.apply([(kohya, 0.5)])
        assert backend.is_fused
        assert float(np.abs(render(pipe) - reference).max()) <= MAX_PIXEL_DIFF
        backend.apply([(locon, 1.0)])
    backend.restore()
    assert not has_peft_layers(pipe)
    assert_same_weights(pipe, original)  # unfuse by subtraction would drift; we copy back


def test_trap_adapters_never_share_memory_with_a_state_dict(
    files: dict[str, Path], fallback: Any, tmp_path: Path
) -> None:
    """With low_cpu_mem_usage=True diffusers assigns the tensors it is given; the backend hands
    it paths, so two files with the same content and our own cached tensors stay apart."""
    pipe, backend = fallback
    twin = tmp_path / "twin.safetensors"
    shutil.copy(files["kohya"], twin)
    first, second = load_network(files["kohya"]), load_network(twin)
    backend.apply([(first, 1.0), (second, 1.0)])
    a, b = list(backend.adapters)
    ours = {t.data_ptr() for n in (first, second) for m in n.modules.values() for t in _tensors(m)}
    for model in (pipe.unet, pipe.text_encoder):
        for _, layer in tuner_layers(model):
            pointers_a = {layer.lora_A[a].weight.data_ptr(), layer.lora_B[a].weight.data_ptr()}
            pointers_b = {layer.lora_A[b].weight.data_ptr(), layer.lora_B[b].weight.data_ptr()}
            assert not pointers_a & pointers_b
            assert not (pointers_a | pointers_b) & ours


def _tensors(module: Any) -> list[torch.Tensor]:
    return [v for v in vars(module).values() if isinstance(v, torch.Tensor)]


def test_trap_adapter_names_never_match_inside_module_names(
    files: dict[str, Path], base: DiffusionPipeline, tmp_path: Path, native_pipe: Any
) -> None:
    """diffusers compares adapter names as substrings (`adapter_name in active_adapter`, `in
    key`): names are long, dotless and unique per file, even for a file called `q`."""
    one_letter = tmp_path / "q.safetensors"
    shutil.copy(files["kohya"], one_letter)
    networks = [load_network(one_letter), load_network(files["kohya"]), load_network(files["peft"])]
    names = [adapter_name(n) for n in networks]
    assert len(set(names)) == len(names)
    paths = [
        p for c in ("unet", "text_encoder", "vae") for p, _ in getattr(base, c).named_modules()
    ]
    for name in names:
        assert name.startswith(ADAPTER_PREFIX) and "." not in name
        assert not any(name in path for path in paths)
        assert not any(name in other for other in names if other != name)
    pipe = pipeline_copy(base)
    DiffusersBackend(pipe, ARCH).apply([(networks[0], 1.0)])
    reference = native_image(native_pipe, networks[0], Strengths.uniform(1.0))
    assert float(np.abs(render(pipe) - reference).max()) <= MAX_PIXEL_DIFF


def test_trap_hotswap_refuses_text_encoders(files: dict[str, Path], fallback: Any) -> None:
    """diffusers refuses hotswap for files with text-encoder keys; the backend never hotswaps,
    so switching between two such files works and gives what a fresh load gives."""
    pipe, backend = fallback
    kohya, peft = load_network(files["kohya"]), load_network(files["peft"])
    backend.apply([(kohya, 1.0)])
    with pytest.raises(ValueError, match="hotswapping is not supported for text encoders"):
        pipe.load_lora_weights(  # same file: the UNet part swaps, the text encoder refuses
            str(files["kohya"]), adapter_name=next(iter(backend.adapters)), hotswap=True
        )
    backend.apply([(peft, 1.0)])
    switched = render(pipe)
    backend.restore()
    backend.apply([(peft, 1.0)])
    assert np.array_equal(render(pipe), switched)


# -- SDXL: two text encoders, original-layout names -------------------------------------------


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[DiffusionPipeline, dict[str, Path]]:
    torch.manual_seed(0)
    pipe = build_pipeline(ModelSpec(Arch.SDXL))
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("sdxl-loras")
    out = {"kohya": folder / "kohya.safetensors", "locon": folder / "locon.safetensors"}
    write_kohya_layers(
        out["kohya"],
        pipe,
        Arch.SDXL,
        include=lambda component, path: component != "unet" or ".attentions." in path,
        std=0.15,
    )
    out["peft"] = write_peft(pipeline_copy(pipe), folder / "peft")
    with pytest.MonkeyPatch.context() as monkeypatch:
        preset = register_preset(monkeypatch, "diffusers-backend-sdxl")
        write_lycoris(pipeline_copy(pipe), out["locon"], preset=preset, algo="locon", std=0.05)
    return pipe, out


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_sdxl_text_encoders_and_blocks_agree_with_native(kind: str, sdxl: Any) -> None:
    base, files = sdxl
    network = load_network(files[kind])
    strengths = Strengths(te=1.0, te1=0.3, te2=0.8, unet=1.0, in_blocks=0.5, mid=0.0, out=1.0)
    native = pipeline_copy(base)
    NetworkPatcher(native, Arch.SDXL).apply([(network, strengths)])
    pipe = pipeline_copy(base)
    report = DiffusersBackend(pipe, Arch.SDXL).apply([(network, strengths)])
    assert report.warnings == []
    difference = float(np.abs(render(pipe) - render(native)).max())
    print(f"SDXL {kind}: max pixel difference native vs diffusers {difference:.5f}")
    assert difference <= MAX_PIXEL_DIFF


def test_sdxl_partial_load_is_refused(sdxl: Any) -> None:
    """diffusers' converter drops SDXL's add_embedding layers without an error; the backend
    counts the layers it placed and refuses rather than apply part of the file."""
    base, files = sdxl
    pipe = pipeline_copy(base)
    network = load_network(files["locon"])
    assert refusal_reason(network, Arch.SDXL) is None
    report = DiffusersBackend(pipe, Arch.SDXL).apply([(network, 1.0)])
    (message,) = report.warnings
    assert message.startswith("locon.safetensors: diffusers placed ")
    assert "e.g. lora_unet_add_embedding_linear_" in message
    assert not has_peft_layers(pipe)
