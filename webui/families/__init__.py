"""The model families: the ones this app runs (SD1, SD2, SDXL) and the ones it only recognises,
so that their LoRAs are named and never written into a model. One module per row, as data;
adding a family is adding a module and a line in `FAMILIES`."""

from __future__ import annotations

import re

from webui.families import (
    anima,
    chroma,
    flux1,
    flux2,
    hidream,
    hunyuan_image,
    krea2,
    lumina2,
    qwen_image,
    sd1,
    sd2,
    sd3,
    sdxl,
    sdxl_refiner,
    wan,
    z_image,
)
from webui.families.family import Family, WidthSignature

# Order matters where rows share evidence: more specific rows first (the refiner before SDXL,
# Chroma before FLUX.1, whose names it shares).
FAMILIES: tuple[Family, ...] = (
    sd1.FAMILY,
    sd2.FAMILY,
    sdxl_refiner.FAMILY,
    sdxl.FAMILY,
    chroma.FAMILY,
    flux2.FAMILY,
    hunyuan_image.FAMILY,
    qwen_image.FAMILY,
    krea2.FAMILY,
    flux1.FAMILY,
    sd3.FAMILY,
    hidream.FAMILY,
    anima.FAMILY,
    wan.FAMILY,
    z_image.FAMILY,
    lumina2.FAMILY,
)
FOREIGN: tuple[Family, ...] = tuple(f for f in FAMILIES if not f.runs)
_RUN = [f.name for f in FAMILIES if f.runs]
RUN_NAMES = ", ".join(_RUN[:-1]) + " and " + _RUN[-1]  # "SD1, SD2 and SDXL"


def by_name(name: str) -> Family:
    """The row of a family name (KeyError when there is none)."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


def by_modelspec(value: str) -> Family | None:
    """The family a `modelspec.architecture` value names (`flux-1-dev/lora` -> FLUX.1)."""
    architecture = value.strip().lower().split("/", 1)[0]
    for family in FAMILIES:
        if any(architecture.startswith(prefix) for prefix in family.modelspec):
            return family
    return None


def by_base_version(value: str) -> Family | None:
    """The family an `ss_base_model_version` value names (`flux1` -> FLUX.1)."""
    version = value.strip().lower().replace("-", "_").replace(" ", "_")
    for family in FAMILIES:
        if any(re.match(pattern, version) for pattern in family.base_versions):
            return family
    return None


def by_civitai(value: str) -> Family | None:
    """The family of a civitai `baseModel` value (`Flux.1 D` -> FLUX.1)."""
    wanted = value.strip().lower()
    for family in FAMILIES:
        if any(wanted == name.lower() for name in family.civitai):
            return family
    return None


__all__ = [
    "FAMILIES",
    "FOREIGN",
    "RUN_NAMES",
    "Family",
    "WidthSignature",
    "by_base_version",
    "by_civitai",
    "by_modelspec",
    "by_name",
]
