"""The corpus of real-world LoRA key layouts (tests/corpus/<family>/<name>.json) and the
full-size SD architectures, built on the `meta` device, that the layouts are checked against."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from webui.arch import Arch
from webui.engine.model_factory import ModelSize, ModelSpec, component_configs, t5_encoder

CORPUS = Path(__file__).parent / "corpus"
SD_FAMILIES = tuple(a.value for a in Arch)
Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Layout:
    """One listing: where it comes from, who wrote such files, what family it is for."""

    name: str
    family: str
    source: str
    trainer: str
    keys: Shapes
    metadata: dict[str, str] = field(default_factory=dict)
    xfail: str | None = None  # why we fail on it today (reported, not hidden)

    @property
    def runs(self) -> bool:
        return self.family in SD_FAMILIES

    @property
    def is_flux(self) -> bool:
        return self.family == Arch.FLUX1.value


def load_layout(path: Path) -> Layout:
    data = json.loads(path.read_text(encoding="utf-8"))
    return Layout(
        name=path.stem,
        family=data["family"],
        source=data["source"],
        trainer=data["trainer"],
        keys={k: tuple(s) for k, s in data["keys"].items()},
        metadata=data.get("metadata", {}),
        xfail=data.get("xfail"),
    )


@cache
def corpus() -> tuple[Layout, ...]:
    """Every layout of the corpus, sorted by family folder and name."""
    return tuple(load_layout(p) for p in sorted(CORPUS.glob("*/*.json")))


@cache
def meta_model(arch: Arch) -> SimpleNamespace:
    """The full-size architecture on the meta device (no memory, real names and shapes)."""
    configs = component_configs(ModelSpec(arch, size=ModelSize.FULL))
    if arch is Arch.FLUX1:  # FLUX.1-dev: the transformer stands where the UNet does
        with torch.device("meta"):
            transformer = FluxTransformer2DModel.from_config(configs["transformer"])
            clip = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
            t5 = t5_encoder(configs["text_encoder_2"])
        return SimpleNamespace(
            unet=None, transformer=transformer, text_encoder=clip, text_encoder_2=t5
        )
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        te1 = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        te2 = None
        if arch is Arch.SDXL:
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    return SimpleNamespace(unet=unet, text_encoder=te1, text_encoder_2=te2)
