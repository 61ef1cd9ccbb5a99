"""Which Stable Diffusion family a LoRA was trained for, from its metadata or, failing that, from
its key names and tensor shapes (both read from the safetensors header; no tensor is loaded)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from webui.arch import Arch

logger = logging.getLogger(__name__)

SOURCE_MODELSPEC = "metadata modelspec.architecture"
SOURCE_BASE_VERSION = "metadata ss_base_model_version"
SOURCE_V2_FLAG = "metadata ss_v2"
SOURCE_KEYS = "keys"
SOURCE_NONE = "none"


@dataclass(frozen=True)
class BaseDetection:
    """The detected family (None when unknown or not SD1/SD2/SDXL), where it came from, and a
    human-readable reason."""

    arch: Arch | None
    source: str
    detail: str


@dataclass(frozen=True)
class _Reading:
    """One metadata value read: a family, or known to name something else (SD3, Flux, ...)."""

    arch: Arch | None
    recognised: bool


# Cross-attention context width (attn2 to_k/to_v inputs) and text-encoder hidden width per family.
_CONTEXT_WIDTHS = {768: Arch.SD1, 1024: Arch.SD2, 2048: Arch.SDXL}
_TEXT_WIDTHS = {768: Arch.SD1, 1024: Arch.SD2, 1280: Arch.SDXL}
# Tensor-name endings whose shape[1] is the wrapped layer's input width.
_INPUT_SIDE_SUFFIXES = (
    "lora_down.weight",
    "lora_A.weight",
    "lora_A.default.weight",
    "down.weight",  # old diffusers `to_k_lora.down.weight`, `lora.down.weight`
    "hada_w1_b",
    "hada_w2_b",
    "diff",
)
# LoRA down weights keep the wrapped layer's kind: 4-d for a conv, 2-d for a linear layer.
_LORA_DOWN_SUFFIXES = ("lora_down.weight", "lora_A.weight", "lora_A.default.weight", "down.weight")

# Names only SDXL UNets have: te1/te2 prefixes, stacked transformer blocks (SD1/SD2 have depth 1),
# attention in diffusers up_blocks.0 or LDM output_blocks 0-2, the size/pooled-text embedding.
_SDXL_NAME = re.compile(
    r"^(lora_te1_|lora_te2_|text_encoder_2_)"
    r"|transformer_blocks_[1-9]"
    r"|up_blocks_0_attentions_"
    r"|output_blocks_[0-2]_1_(norm|proj_in|proj_out|transformer_blocks)"
    r"|(^|_)(add_embedding|label_emb)_"
)
# Names SDXL UNets lack: attention in the first level, a fourth level, input blocks past 8.
_NOT_SDXL_NAME = re.compile(
    r"down_blocks_0_attentions_|input_blocks_[12]_1_|down_blocks_3_|input_blocks_(9|1[01])_"
)
_CONTEXT_NAME = re.compile(r"attn2_(processor_)?to_[kv](_lora)?_")
_TEXT_ENCODER_NAME = re.compile(r"^(lora_te_|text_encoder_).*(q_proj|k_proj|v_proj|fc1)_")
_PROJ_IN_NAME = re.compile(r"(attentions_\d+|middle_block_1|(input|output)_blocks_\d+_1)_proj_in_")


# SAI model-spec's `modelspec.architecture` of each base (what `_read_modelspec` reads back).
_SPEC_ARCHITECTURE = {
    Arch.SD1: "stable-diffusion-v1",
    Arch.SD2: "stable-diffusion-v2-512",
    Arch.SDXL: "stable-diffusion-xl-v1-base",
}


def modelspec_architecture(arch: Arch, v_prediction: bool) -> str:
    """SAI model-spec's `modelspec.architecture` of a model (a LoRA of it adds `/lora`)."""
    if arch is Arch.SD2 and v_prediction:
        return "stable-diffusion-v2-768-v"
    return _SPEC_ARCHITECTURE[arch]


def _read_modelspec(value: str) -> _Reading:
    architecture = value.strip().lower().split("/", 1)[0]
    if architecture.startswith("stable-diffusion-xl"):
        # The refiner's UNet differs from the base; base LoRAs do not fit it and vice versa.
        if "refiner" in architecture:
            return _Reading(None, recognised=True)
        return _Reading(Arch.SDXL, recognised=True)
    if architecture.startswith("stable-diffusion-v2"):
        return _Reading(Arch.SD2, recognised=True)
    if architecture.startswith("stable-diffusion-v1"):
        return _Reading(Arch.SD1, recognised=True)
    return _Reading(None, recognised=bool(architecture))


def _read_base_version(value: str) -> _Reading:
    version = value.strip().lower().replace("-", "_").replace(" ", "_")
    if re.match(r"(sdxl|sd_xl|xl)(_|$)", version):
        return _Reading(None if "refiner" in version else Arch.SDXL, recognised=True)
    if re.match(r"(sd_?v?2|v2)([._]|$)", version):
        return _Reading(Arch.SD2, recognised=True)
    if re.match(r"(sd_?v?1|v1)([._]|$)", version):
        return _Reading(Arch.SD1, recognised=True)
    # sd3, flux1, ...: a real base, but not one of ours.
    return _Reading(None, recognised=False)


def _flat(key: str) -> str:
    return key.replace(".", "_")


def _input_width(key: str, shape: tuple[int, ...]) -> int | None:
    if len(shape) >= 2 and key.endswith(_INPUT_SIDE_SUFFIXES):
        return shape[1]
    return None


def detect_from_keys(tensor_shapes: Mapping[str, tuple[int, ...]]) -> BaseDetection:
    """Detect the family from tensor names and shapes alone."""
    flat_keys = {key: _flat(key) for key in tensor_shapes}
    sdxl_names = sorted(k for k, f in flat_keys.items() if _SDXL_NAME.search(f))
    if sdxl_names:
        return BaseDetection(Arch.SDXL, SOURCE_KEYS, f"SDXL-only name {sdxl_names[0]!r}")

    for pattern, widths, what in (
        (_CONTEXT_NAME, _CONTEXT_WIDTHS, "cross-attention context width"),
        (_TEXT_ENCODER_NAME, _TEXT_WIDTHS, "text encoder width"),
    ):
        for key, flat_key in sorted(flat_keys.items()):
            width = _input_width(key, tuple(tensor_shapes[key]))
            if width in widths and pattern.search(flat_key):
                return BaseDetection(widths[width], SOURCE_KEYS, f"{what} {width} ({key!r})")

    # SD1 projects in/out of attention with 1x1 convs; SD2 and SDXL use linear layers.
    for key, flat_key in sorted(flat_keys.items()):
        if not key.endswith(_LORA_DOWN_SUFFIXES) or not _PROJ_IN_NAME.search(flat_key):
            continue
        if len(tensor_shapes[key]) == 4:
            return BaseDetection(Arch.SD1, SOURCE_KEYS, f"convolutional proj_in ({key!r})")
        not_sdxl = sorted(k for k, f in flat_keys.items() if _NOT_SDXL_NAME.search(f))
        if not_sdxl:
            return BaseDetection(
                Arch.SD2,
                SOURCE_KEYS,
                f"linear proj_in ({key!r}) in a non-SDXL layout ({not_sdxl[0]!r})",
            )
    return BaseDetection(
        None, SOURCE_NONE, "no base model metadata, and key names are inconclusive"
    )


def detect_base(
    metadata: Mapping[str, str], tensor_shapes: Mapping[str, tuple[int, ...]]
) -> BaseDetection:
    """The family a LoRA targets. Metadata wins (`modelspec.architecture`, then
    `ss_base_model_version`); then SDXL-only key names; then `ss_v2`; then key widths/shapes.
    A metadata base that is not SD1/SD2/SDXL (SD3, Flux, ...) gives arch None."""
    unsupported: list[str] = []
    for field_name, source, read in (
        ("modelspec.architecture", SOURCE_MODELSPEC, _read_modelspec),
        ("ss_base_model_version", SOURCE_BASE_VERSION, _read_base_version),
    ):
        value = metadata.get(field_name)
        if not value:
            continue
        reading = read(value)
        if reading.arch is not None:
            return _checked(
                BaseDetection(reading.arch, source, f"{field_name}={value!r}"), tensor_shapes
            )
        if reading.recognised:
            return BaseDetection(
                None, source, f"not an SD1/SD2/SDXL network: {field_name}={value!r}"
            )
        unsupported.append(f"{field_name}={value!r}")

    from_keys = detect_from_keys(tensor_shapes)
    if from_keys.arch is Arch.SDXL:
        return from_keys
    # Kohya wrote only ss_v2 before SDXL existed, so the flag decides between SD1 and SD2 alone.
    v2_flag = metadata.get("ss_v2", "").strip().lower()
    if v2_flag in ("true", "false"):
        arch = Arch.SD2 if v2_flag == "true" else Arch.SD1
        return _checked(
            BaseDetection(arch, SOURCE_V2_FLAG, f"ss_v2={metadata['ss_v2']!r}"), tensor_shapes
        )
    if from_keys.arch is None and unsupported:
        return BaseDetection(
            None, SOURCE_BASE_VERSION, f"unknown base model: {', '.join(unsupported)}"
        )
    return from_keys


def _checked(
    detection: BaseDetection, tensor_shapes: Mapping[str, tuple[int, ...]]
) -> BaseDetection:
    """Keep the metadata answer, but say so when the keys clearly disagree (copied metadata)."""
    from_keys = detect_from_keys(tensor_shapes)
    if from_keys.arch is None or from_keys.arch is detection.arch:
        return detection
    logger.warning(
        "metadata says %s (%s) but keys say %s (%s)",
        detection.arch.value if detection.arch else None,
        detection.detail,
        from_keys.arch.value,
        from_keys.detail,
    )
    return BaseDetection(
        detection.arch,
        detection.source,
        f"{detection.detail}; keys disagree: {from_keys.arch.value} from {from_keys.detail}",
    )


def is_compatible(lora_arch: Arch | None, model_arch: Arch) -> bool:
    """Whether a LoRA of `lora_arch` can be applied to a model of `model_arch`. Unknown LoRAs are
    allowed (the patcher reports keys that match nothing); SD2 covers SD2-768-v."""
    return lora_arch is None or lora_arch is model_arch
