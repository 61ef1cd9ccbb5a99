"""What the diffusers fallback can load, told from a file's keys alone (the refusals, checked
against diffusers 0.42.1's kohya converters and PEFT loader; FLUX.1's own in `diffusers_flux`),
its adapter names, the pipeline model each `Component` is (FLUX.1's transformer stands where SD's
UNet is), and the PEFT layers a pipeline holds."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from webui.arch import Arch
from webui.networks.apply.diffusers_flux import flux_refusal
from webui.networks.apply.keys import Component
from webui.networks.apply.patcher import NetworkReport
from webui.networks.format.modules import Variant
from webui.networks.format.modules.lora import LoraModule
from webui.networks.format.network import Network

ADAPTER_PREFIX = "webui_lora_"
_LDM_UNET_NAMES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
_KOHYA_TEXT_MARKERS = ("_out_proj", "_fc1", "_fc2")
ATTENTION_BLOCKS = ("down_blocks.", "up_blocks.", "mid_block.")


class DiffusersLoadError(ValueError):
    """A file the diffusers fallback cannot apply; the message names the file and why."""


@dataclass(frozen=True)
class FallbackReport(NetworkReport):
    """A network's report from the diffusers fallback; `refusal` says why it was not applied."""

    refusal: str | None = None

    @property
    def warnings(self) -> list[str]:
        return [self.refusal] if self.refusal else super().warnings


# a family's own checks of what its diffusers loader cannot take (after the variant checks)
_FAMILY_REFUSALS: dict[Arch, Callable[[Network], str | None]] = {Arch.FLUX1: flux_refusal}


def refusal_reason(network: Network, arch: Arch | None) -> str | None:
    """Why diffusers cannot load `network` correctly, from its keys alone (None: it can try).
    Checked against diffusers 0.42.1's kohya converters and PEFT loader."""
    others = sorted({m.variant.value for m in network.modules.values()} - {Variant.LORA.value})
    if others:
        return f"{'/'.join(others)} layers (diffusers loads only plain LoRA/LoCon)"
    lora_modules = [m for m in network.modules.values() if isinstance(m, LoraModule)]
    if any(m.mid is not None for m in lora_modules):
        return "Tucker (lora_mid) layers, which diffusers' converter rejects"
    if any(m.dora is not None for m in lora_modules):
        return "DoRA (dora_scale), which diffusers drops with only a warning"
    family = _FAMILY_REFUSALS.get(arch) if arch is not None else None
    if family is not None and (reason := family(network)) is not None:
        return reason
    if arch is not Arch.SDXL and any(p.startswith(_LDM_UNET_NAMES) for p in network.modules):
        return "original (LDM) layout names, which diffusers maps only on SDXL"
    kohya_text = [p for p in network.modules if p.startswith("lora_te")]
    if kohya_text and not any(p.endswith(_KOHYA_TEXT_MARKERS) for p in kohya_text):
        # diffusers tells converted kohya text-encoder names apart by a `to_out_lora` or MLP key
        return "kohya text-encoder layers without out_proj/fc1/fc2, which diffusers cannot classify"
    return None


def diffusers_name(pipe: Any, component: Component) -> str:
    """diffusers' name of `component` in `pipe`: `transformer` for the denoiser of a pipeline
    without a UNet (FLUX.1), else the component's own name."""
    if component is Component.UNET and getattr(pipe, "unet", None) is None:
        return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    return component.value


def component_model(pipe: Any, component: Component) -> nn.Module | None:
    """The model of `component` in `pipe` (None when the pipeline has none)."""
    return getattr(pipe, diffusers_name(pipe, component), None)


def lora_components(pipe: Any) -> tuple[Component, ...]:
    """The components of `pipe` its diffusers loader puts LoRA layers in (FLUX.1: not T5)."""
    loadable = getattr(pipe, "_lora_loadable_modules", None)
    return tuple(
        c
        for c in Component
        if component_model(pipe, c) is not None
        and (loadable is None or diffusers_name(pipe, c) in loadable)
    )


def adapter_name(network: Network) -> str:
    """A unique, safe adapter name for one loaded file: `webui_lora_` + 12 hex of its path,
    size and modification time (a changed file gets a new name)."""
    stat = network.path.stat()
    token = f"{network.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{id(network)}"
    return ADAPTER_PREFIX + hashlib.sha256(token.encode()).hexdigest()[:12]


def tuner_layers(model: nn.Module) -> Iterator[tuple[str, BaseTunerLayer]]:
    """Every PEFT layer of a model, by path."""
    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield path, module


def has_empty_wrappers(pipe: Any) -> bool:
    """Whether a PEFT layer of `pipe` holds no adapter any more."""
    return any(
        not getattr(layer, "lora_A", {"?": None})
        for model in (component_model(pipe, c) for c in Component)
        if model is not None
        for _, layer in tuner_layers(model)
    )


def has_peft_layers(pipe: Any) -> bool:
    """Whether any text encoder or denoiser of `pipe` still holds a PEFT layer."""
    return any(
        next(tuner_layers(model), None) is not None
        for model in (component_model(pipe, c) for c in Component)
        if model is not None
    )
