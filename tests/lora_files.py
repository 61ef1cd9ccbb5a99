"""Real LoRA files for tests, written by the trainers' own code (LyCORIS' kohya network,
diffusers/PEFT `save_lora_weights`) or by hand in kohya's format (lora_down/lora_up/alpha).

Shared by every test that needs a LoRA file; nothing here asserts anything.
"""

from __future__ import annotations

import os

# Set before diffusers/transformers import huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from lycoris.config import PRESET
from lycoris.kohya import LycorisNetworkKohya, create_network
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from webui.arch import Arch
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.layouts.unet import unet_module_names

# Kohya's own targets for SD UNets/CLIP, plus the stray top-level layers LyCORIS can name.
# A preset of our own: LyCORIS' "full" also targets TimestepEmbedding, which duplicates
# time_embedding.linear_1 on SD UNets and fails its own assertion.
LYCORIS_PRESET: dict[str, Any] = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": [
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
        "add_embedding.linear_1",
        "add_embedding.linear_2",
    ],
    "text_encoder_target_module": ["CLIPEncoderLayer"],
    "text_encoder_target_name": [r".*final_layer_norm$", r".*text_projection$"],
    "module_algo_map": {},
    "name_algo_map": {},
    "use_fnmatch": False,
    "exclude_name": [],
}
# LyCORIS keeps the active preset in these class attributes (TRAPS.md).
_PRESET_ATTRIBUTES = (
    "ENABLE_CONV",
    "UNET_TARGET_REPLACE_MODULE",
    "UNET_TARGET_REPLACE_NAME",
    "TEXT_ENCODER_TARGET_REPLACE_MODULE",
    "TEXT_ENCODER_TARGET_REPLACE_NAME",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
    "USE_FNMATCH",
    "TARGET_EXCLUDE_NAME",
)

# kohya sd-scripts' `ss_base_model_version` values, as trainers write them.
BASE_MODEL_VERSION = {Arch.SD1: "sd_v1", Arch.SD2: "sd_v2", Arch.SDXL: "sdxl_base_v1-0"}


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch ops on one thread: tiny models gain nothing from more, and on a busy machine
    (xdist workers, 2 cores) OpenMP threads waiting for each other make small ops ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def register_preset(monkeypatch: pytest.MonkeyPatch, name: str, **overrides: Any) -> str:
    """Register our preset (with `overrides`) under `name`; LyCORIS' class-level preset state
    is put back when `monkeypatch` undoes."""
    for attribute in _PRESET_ATTRIBUTES:
        monkeypatch.setattr(LycorisNetworkKohya, attribute, getattr(LycorisNetworkKohya, attribute))
    monkeypatch.setitem(PRESET, name, {**LYCORIS_PRESET, **overrides})
    return name


@contextmanager
def lycoris_preset(**overrides: Any) -> Iterator[str]:
    """`register_preset` for code outside a test function (module or session fixtures)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield register_preset(monkeypatch, "webui-test", **overrides)


def text_encoders(pipeline: DiffusionPipeline) -> nn.Module | list[nn.Module]:
    """The text encoder(s) as LyCORIS' `create_network` wants them (a list on SDXL)."""
    text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
    return (
        pipeline.text_encoder if text_encoder_2 is None else [pipeline.text_encoder, text_encoder_2]
    )


@torch.no_grad()
def randomise(module: nn.Module, std: float = 0.2) -> None:
    """Trainers initialise to a zero delta (or identity); make every trainable tensor matter."""
    for name, param in module.named_parameters():
        if ".base_layer." in name:
            continue  # PEFT wraps the original layer, which must stay as it was
        if name.endswith(("dora_scale", "lora_magnitude_vector.default.weight")):
            param.mul_(1 + std * torch.randn_like(param))
        elif name.endswith("rescale"):
            param.copy_(1 + std * torch.randn_like(param))
        else:
            param.normal_(0, std)


def write_lycoris(
    pipeline: DiffusionPipeline,
    path: Path,
    *,
    preset: str,
    algo: str,
    dim: int = 4,
    alpha: float = 2.0,
    metadata: Mapping[str, str] | None = None,
    std: float | None = 0.2,
    **kwargs: Any,
) -> LycorisNetworkKohya:
    """Write a LyCORIS kohya file via its own `save_weights`, with randomised tensors (or, with
    `std=None`, the trainer's initial ones).

    The returned network's modules still wrap `pipeline`'s layers (forwards unhooked), so a
    test can call each module's `merge_to` on that pipeline to get the trainer's weights."""
    network = create_network(
        1.0, dim, alpha, None, text_encoders(pipeline), pipeline.unet, algo=algo, preset=preset,
        **kwargs,
    )  # fmt: skip
    # Trainers register the modules through apply_to (it hooks forwards); undo the hooks after.
    network.apply_to(
        text_encoders(pipeline), pipeline.unet, apply_text_encoder=True, apply_unet=True
    )
    try:
        for lora in network.loras if std is not None else ():
            if type(lora).__name__ == "FullModule":
                # Full holds the whole weight after apply_to: nudge it rather than replace it.
                with torch.no_grad():
                    for param in lora.parameters():
                        param.add_(std * torch.randn_like(param))
            else:
                randomise(lora, std)
        network.save_weights(str(path), None, dict(metadata or {}))
    finally:
        network.restore()
    return network


def lycoris_wrapped(network: LycorisNetworkKohya) -> dict[str, nn.Module]:
    """LyCORIS lora name -> the layer it wraps."""
    return {lora.lora_name: lora.org_module[0] for lora in network.loras}


def file_prefixes(path: Path) -> set[str]:
    """The module prefixes (text before the first dot) of a safetensors file's keys."""
    with safe_open(str(path), framework="pt") as handle:
        return {key.split(".", 1)[0] for key in handle.keys()}  # noqa: SIM118 (not a Mapping)


def read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        return tensors, dict(handle.metadata() or {})


def ldm_names(unet: nn.Module, kohya_names: list[str]) -> dict[str, str]:
    """The original-layout kohya names of diffusers-layout ones, via the LDM map."""
    flat_to_path = {path.replace(".", "_"): path for path, _ in unet.named_modules()}
    ldm = unet_module_names(unet.config)
    return {
        name: "lora_unet_" + ldm[flat_to_path[name.removeprefix("lora_unet_")]].replace(".", "_")
        for name in kohya_names
    }


def rename_to_ldm(unet: nn.Module, source: Path, target: Path) -> dict[str, str]:
    """Copy a kohya file with every `lora_unet_` prefix in the original LDM layout; returns the
    renaming (old prefix -> new prefix)."""
    tensors, metadata = read_file(source)
    prefixes = sorted({k.split(".", 1)[0] for k in tensors if k.startswith("lora_unet_")})
    renames = ldm_names(unet, prefixes)
    renamed = {}
    for key, tensor in tensors.items():
        prefix, _, rest = key.partition(".")
        renamed[f"{renames.get(prefix, prefix)}.{rest}"] = tensor
    save_file(renamed, str(target), metadata)
    return renames


PEFT_UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
]
PEFT_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def write_peft(
    pipeline: DiffusionPipeline,
    directory: Path,
    *,
    rank: int = 4,
    alpha: float = 8,
    unet_targets: list[str] = PEFT_UNET_TARGETS,
    init_lora_weights: bool = False,
    adapter_metadata: bool = True,
) -> Path:
    """Wrap `pipeline` with PEFT LoRA adapters (random ones unless `init_lora_weights`, PEFT's
    zero-delta start) and save them with diffusers' `save_lora_weights`, adapter metadata
    (alphas) included if `adapter_metadata`. `pipeline` stays wrapped."""
    components = ["unet", "text_encoder"] + (
        ["text_encoder_2"] if getattr(pipeline, "text_encoder_2", None) is not None else []
    )
    layers: dict[str, Any] = {}
    for name in components:
        model = getattr(pipeline, name)
        targets = unet_targets if name == "unet" else PEFT_TEXT_TARGETS
        model.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=alpha,
                target_modules=targets,
                init_lora_weights=init_lora_weights,
            )
        )
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        if adapter_metadata:
            layers[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    type(pipeline).save_lora_weights(str(directory), **layers)
    return directory / "pytorch_lora_weights.safetensors"


KOHYA_TEXT_PREFIXES = {
    Arch.SD1: {"text_encoder": "lora_te_"},
    Arch.SD2: {"text_encoder": "lora_te_"},
    Arch.SDXL: {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}


def write_kohya_layers(
    path: Path,
    pipeline: DiffusionPipeline,
    arch: Arch,
    *,
    include: Callable[[str, str], bool] = lambda component, module_path: True,
    every: int = 1,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    std: float = 0.2,
    unet_first: bool = False,
    drop_text_model: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """A plain kohya LoRA (lora_down/lora_up/alpha, LoCon on convs) on every `every`-th
    Linear/Conv2d of the pipeline's text encoder(s) and UNet (in that order, or the UNet first)
    for which `include(component, module_path)` holds, random with `std` from `seed`; returns
    the prefixes written. `drop_text_model` names text-encoder layers without CLIP's
    `text_model.` segment. Cheap and deterministic: for tests of the patcher's bookkeeping."""
    generator = torch.Generator().manual_seed(seed)
    heads = {**KOHYA_TEXT_PREFIXES[arch], "unet": "lora_unet_"}
    if unet_first:
        heads = {"unet": heads.pop("unet"), **heads}
    tensors: dict[str, Tensor] = {}
    for component, head in heads.items():
        layers = [
            (module_path, module)
            for module_path, module in getattr(pipeline, component).named_modules()
            if isinstance(module, nn.Linear | nn.Conv2d) and include(component, module_path)
        ]
        for module_path, module in layers[::every]:
            if drop_text_model and component != "unet":
                module_path = module_path.removeprefix("text_model.")
            prefix = head + module_path.replace(".", "_")
            out_features, in_features = module.weight.shape[:2]
            kernel = tuple(module.weight.shape[2:])
            down = torch.randn((rank, in_features, *kernel), generator=generator) * std
            up_shape = (out_features, rank, *(1 for _ in kernel))
            up = torch.randn(up_shape, generator=generator) * std
            tensors[f"{prefix}.lora_down.weight"] = down
            tensors[f"{prefix}.lora_up.weight"] = up
            tensors[f"{prefix}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), None if metadata is None else dict(metadata))
    return sorted({key.split(".", 1)[0] for key in tensors})


ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "q_proj", "v_proj")


@cache
def _built_tiny_pipeline(arch: Arch) -> tuple[DiffusionPipeline, Tensor]:
    """`build_pipeline(ModelSpec(arch))` once per process (only read: never handed out), and the
    global RNG state building it leaves."""
    pipeline = build_pipeline(ModelSpec(arch))
    return pipeline, torch.get_rng_state()


def tiny_pipeline_to_read(arch: Arch) -> DiffusionPipeline:
    """What a fresh `build_pipeline(ModelSpec(arch))` gives a reader, global RNG state included
    (building reseeds it), without building it again: for writing LoRA files, never to patch."""
    pipeline, rng_state = _built_tiny_pipeline(arch)
    torch.set_rng_state(rng_state)
    return pipeline


def write_kohya_lora(path: Path, arch: Arch, metadata: dict[str, str] | None = None) -> None:
    """A kohya-format LoRA over the attention projections of a fresh tiny model's UNet and text
    encoder(s), with random values (names built from the modules' diffusers paths, as kohya
    does)."""
    write_kohya_layers(
        path,
        tiny_pipeline_to_read(arch),
        arch,
        include=lambda component, module_path: (
            module_path.rsplit(".", 1)[-1] in ATTENTION_PROJECTIONS
        ),
        seed=1,
        std=0.3,
        unet_first=True,
        metadata=metadata,
    )
