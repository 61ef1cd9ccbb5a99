"""Which model family a LoRA was made for, from all the evidence together: metadata
(`modelspec.architecture`, `ss_base_model_version`, `ss_v2`), key names and tensor widths (read
from the safetensors header; no tensor is loaded), against the family table (`webui.families`).
Any evidence of a family this app does not run wins: such a file is never written into a model."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from webui import families
from webui.arch import Arch
from webui.families import Family
from webui.networks.format.key_formats import (
    UNKNOWN,
    canonical_prefix,
    identify_format,
    is_embedding_key,
)
from webui.networks.format.modules.registry import split_module_key

logger = logging.getLogger(__name__)

SOURCE_MODELSPEC = "metadata modelspec.architecture"
SOURCE_BASE_VERSION = "metadata ss_base_model_version"
SOURCE_V2_FLAG = "metadata ss_v2"
SOURCE_KEYS = "keys"
SOURCE_NONE = "none"
SOURCE_CIVITAI = "metadata civitai baseModel"
ANOTHER_FAMILY = "another model family"  # transformer names no row claims


@dataclass(frozen=True)
class BaseDetection:
    """What a LoRA was made for: the family (None when unknown), the `Arch` this app runs it as
    (None when unknown or a family it does not run), the key format, where the answer came from
    and a human-readable reason."""

    arch: Arch | None
    source: str
    detail: str
    family: str | None = None
    key_format: str = UNKNOWN

    @property
    def foreign(self) -> bool:
        """Made for a family this app recognises but does not run."""
        return self.family is not None and self.arch is None

    def refusal(self, file_name: str) -> str | None:
        """The one sentence that says why a foreign file is not applied (None: not foreign)."""
        if not self.foreign:
            return None
        if self.family == ANOTHER_FAMILY:
            what = f"a LoRA of {ANOTHER_FAMILY}"
        else:
            vowel = self.family and self.family.upper().startswith(("A", "E", "I", "O", "U", "SD"))
            what = f"{'an' if vowel else 'a'} {self.family} LoRA"
        return (
            f"{file_name} is {what} ({self.key_format} format): "
            f"this app runs {families.RUN_NAMES} models"
        )


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
# LoKr factors the input width: the layer's is w1's times w2's (w1 and w2 full or low-rank).
_LOKR_W1 = ("lokr_w1", "lokr_w1_b")
_LOKR_W2 = ("lokr_w2", "lokr_w2_b")
# LoRA down weights keep the wrapped layer's kind: 4-d for a conv, 2-d for a linear layer.
_LORA_DOWN_SUFFIXES = ("lora_down.weight", "lora_A.weight", "lora_A.default.weight", "down.weight")
_SD1, _SD2, _SDXL = (families.by_name(a.value) for a in (Arch.SD1, Arch.SD2, Arch.SDXL))
# Cross-attention context width (attn2 to_k/to_v inputs) and text-encoder hidden width per family.
_CONTEXT_WIDTHS = {768: Arch.SD1, 1024: Arch.SD2, 2048: Arch.SDXL}
_TEXT_WIDTHS = {w: f.arch for f in (_SD1, _SD2) for w in f.text_widths if f.arch is not None}
# Names SDXL UNets lack: attention in the first level, a fourth level, input blocks past 8.
_NOT_SDXL_NAME = re.compile(
    r"down_blocks_0_attentions_|input_blocks_[12]_1_|down_blocks_3_|input_blocks_(9|1[01])_"
)
_CONTEXT_NAME = re.compile(r"attn2_(processor_)?to_[kv](_lora)?_")
_TEXT_ENCODER_NAME = re.compile(r"^(lora_te1?_|text_encoder_).*(q_proj|k_proj|v_proj|fc1)_")
_TE2_NAME = re.compile(r"^(lora_te2_|text_encoder_2_)")
# IA3 keeps one vector per output channel: on a text encoder's k/v projection, the hidden width.
_IA3_TEXT_NAME = re.compile(r"^(lora_te1?_|text_encoder_).*(k_proj|v_proj)_weight$")
_PROJ_IN_NAME = re.compile(r"(attentions_\d+|middle_block_1|(input|output)_blocks_\d+_1)_proj_in_")
# Evidence of some DiT family without its row's own names: T5/LLM encoders, transformer roots.
_OTHER_FAMILY_NAME = re.compile(r"^(lora_te[34]_|lora_transformer_|transformer_)")


def _flat(key: str) -> str:
    return key.replace(".", "_")


def _canonical_key(key: str) -> str:
    prefix, suffix = split_module_key(key)
    return f"{canonical_prefix(prefix)}.{suffix}" if suffix else canonical_prefix(prefix)


def _input_width(key: str, shape: tuple[int, ...]) -> int | None:
    if len(shape) >= 2 and key.endswith(_INPUT_SIDE_SUFFIXES):
        return shape[1]
    return None


def _input_widths(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The wrapped layer's input width, on each key that shows it (LoKr: on its w2 key)."""
    widths = {k: w for k, s in shapes.items() if (w := _input_width(k, s)) is not None}
    for key, shape in shapes.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix not in _LOKR_W2 or len(shape) < 2:
            continue
        w1 = next((shapes[f"{prefix}.{n}"] for n in _LOKR_W1 if f"{prefix}.{n}" in shapes), None)
        if w1 is not None and len(w1) == 2:
            widths[key] = w1[1] * shape[1]
    return widths


# Transformer families, in the table's order: those this app does not run and FLUX.1.
_DIT_FAMILIES = tuple(f for f in families.FAMILIES if f.arch is None or not f.arch.has_unet)
# A BFL control LoRA (FLUX.1 Depth/Canny) widens img_in to 128 input channels (image + control).
_CONTROL_IMG_IN = re.compile(r"(^|[._])img_in\.(lora_A\.weight|lora_down\.weight|diff)$")
_CONTROL_WIDTH = 128
CONTROL_FAMILY = "FLUX.1 control (Depth/Canny)"


def _control_lora(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    for key, shape in shapes.items():
        if _CONTROL_IMG_IN.search(key) and len(shape) == 2 and shape[1] == _CONTROL_WIDTH:
            return f"img_in widened to {_CONTROL_WIDTH} input channels ({key!r})"
    return None


def _foreign_from_keys(
    flat_keys: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[Family, str] | None:
    """A transformer family (run or not), named by a key only it has or a shared key at its
    width."""
    for family in _DIT_FAMILIES:
        for pattern in family.keys:
            for key, flat_key in flat_keys.items():
                if pattern.search(flat_key):
                    return family, f"{family.name} name {key!r}"
    widths = _input_widths(shapes)
    for family in _DIT_FAMILIES:
        for signature in family.widths:
            for key, flat_key in flat_keys.items():
                width = widths.get(key)
                if width in signature.widths and signature.pattern.search(flat_key):
                    return family, f"{family.name} layer of width {width} ({key!r})"
    return None


def detect_from_keys(tensor_shapes: Mapping[str, tuple[int, ...]]) -> BaseDetection:
    """Detect the family from tensor names and shapes alone (any key spelling: names are
    normalised first; bundled embeddings are left out)."""
    shapes = {
        _canonical_key(key): tuple(shape)
        for key, shape in tensor_shapes.items()
        if not is_embedding_key(key)
    }
    key_format = identify_format(split_module_key(key)[0] for key in tensor_shapes)
    flat_keys = {key: _flat(key) for key in shapes}
    control = _control_lora(shapes)
    if control is not None:
        return BaseDetection(None, SOURCE_KEYS, control, CONTROL_FAMILY, key_format)
    foreign = _foreign_from_keys(flat_keys, shapes)
    if foreign is not None:
        family, detail = foreign
        return BaseDetection(family.arch, SOURCE_KEYS, detail, family.name, key_format)
    others = sorted(k for k, f in flat_keys.items() if _OTHER_FAMILY_NAME.search(f))
    if others:
        return BaseDetection(
            None, SOURCE_KEYS, f"not an SD name {others[0]!r}", ANOTHER_FAMILY, key_format
        )

    def found(arch: Arch, detail: str) -> BaseDetection:
        return BaseDetection(arch, SOURCE_KEYS, detail, arch.value, key_format)

    sdxl_names = sorted(k for k, f in flat_keys.items() if any(p.search(f) for p in _SDXL.keys))
    if sdxl_names:
        return found(Arch.SDXL, f"SDXL-only name {sdxl_names[0]!r}")

    input_widths = _input_widths(shapes)
    for pattern, widths, what in (
        (_CONTEXT_NAME, _CONTEXT_WIDTHS, "cross-attention context width"),
        (_TEXT_ENCODER_NAME, _TEXT_WIDTHS, "text encoder width"),
    ):
        for key, flat_key in sorted(flat_keys.items()):
            width = input_widths.get(key)
            if width in widths and pattern.search(flat_key):
                return found(widths[width], f"{what} {width} ({key!r})")
    for key, flat_key in sorted(flat_keys.items()):
        shape = shapes[key]
        if len(shape) == 1 and shape[0] in _TEXT_WIDTHS and _IA3_TEXT_NAME.search(flat_key):
            return found(_TEXT_WIDTHS[shape[0]], f"IA3 text encoder width {shape[0]} ({key!r})")

    # SD1 projects in/out of attention with 1x1 convs; SD2 and SDXL use linear layers.
    for key, flat_key in sorted(flat_keys.items()):
        if not key.endswith(_LORA_DOWN_SUFFIXES) or not _PROJ_IN_NAME.search(flat_key):
            continue
        if len(shapes[key]) == 4:
            return found(Arch.SD1, f"convolutional proj_in ({key!r})")
        not_sdxl = sorted(k for k, f in flat_keys.items() if _NOT_SDXL_NAME.search(f))
        if not_sdxl:
            return found(
                Arch.SD2, f"linear proj_in ({key!r}) in a non-SDXL layout ({not_sdxl[0]!r})"
            )
    return BaseDetection(
        None,
        SOURCE_NONE,
        "no base model metadata, and key names are inconclusive",
        key_format=key_format,
    )


def _from_metadata(metadata: Mapping[str, str]) -> tuple[Family, str, str] | None:
    """The family metadata names: (family, source, detail), first field that names one."""
    for field_name, source, read in (
        ("modelspec.architecture", SOURCE_MODELSPEC, families.by_modelspec),
        ("ss_base_model_version", SOURCE_BASE_VERSION, families.by_base_version),
        ("baseModel", SOURCE_CIVITAI, families.by_civitai),
    ):
        value = metadata.get(field_name)
        if value and (family := read(value)) is not None:
            return family, source, f"{field_name}={value!r}"
    return None


def detect_base(
    metadata: Mapping[str, str], tensor_shapes: Mapping[str, tuple[int, ...]]
) -> BaseDetection:
    """What a LoRA was made for, from all the evidence. A family this app does not run, named by
    metadata or by keys, wins (its CLIP parts look like SD1/SDXL ones); then metadata naming
    SD1/SD2/SDXL (checked against the keys); then SDXL-only key names; then `ss_v2`; then key
    widths and shapes."""
    from_keys = detect_from_keys(tensor_shapes)
    key_format = from_keys.key_format
    named = _from_metadata(metadata)
    if named is not None and not named[0].runs:
        family, source, detail = named
        return BaseDetection(None, source, detail, family.name, key_format)
    # FLUX.1's own transformer names (`transformer.`, `lora_transformer_`) at widths no row knows
    # (tiny or pruned files) are only a guess of "another family": metadata naming FLUX.1 wins.
    flux_named = named is not None and named[0].arch is Arch.FLUX1
    if from_keys.foreign and not (flux_named and from_keys.family == ANOTHER_FAMILY):
        return from_keys
    if named is not None:
        family, source, detail = named
        assert family.arch is not None
        return _checked(
            BaseDetection(family.arch, source, detail, family.name, key_format), from_keys
        )
    if from_keys.arch in (Arch.SDXL, Arch.FLUX1):
        return from_keys
    # Kohya wrote only ss_v2 before SDXL existed, so the flag decides between SD1 and SD2 alone.
    v2_flag = metadata.get("ss_v2", "").strip().lower()
    if v2_flag in ("true", "false"):
        arch = Arch.SD2 if v2_flag == "true" else Arch.SD1
        return _checked(
            BaseDetection(
                arch, SOURCE_V2_FLAG, f"ss_v2={metadata['ss_v2']!r}", arch.value, key_format
            ),
            from_keys,
        )
    unread = [
        f"{name}={metadata[name]!r}"
        for name in ("modelspec.architecture", "ss_base_model_version")
        if metadata.get(name)
    ]
    if from_keys.arch is None and unread:
        return BaseDetection(
            None, SOURCE_BASE_VERSION, f"unknown base model: {', '.join(unread)}", None, key_format
        )
    return from_keys


def _checked(detection: BaseDetection, from_keys: BaseDetection) -> BaseDetection:
    """Keep the metadata answer, but say so when the keys clearly disagree (copied metadata)."""
    if from_keys.arch is None or from_keys.arch is detection.arch:
        return detection
    logger.warning(
        "metadata says %s (%s) but keys say %s (%s)",
        detection.arch.value if detection.arch else None,
        detection.detail,
        from_keys.arch.value,
        from_keys.detail,
    )
    return replace(
        detection,
        detail=f"{detection.detail}; keys disagree: {from_keys.arch.value} from {from_keys.detail}",
    )


def fits(detection: BaseDetection, model_arch: Arch | None) -> bool:
    """Whether a LoRA may be written into a model of `model_arch`: never when it was made for a
    family this app does not run; unknown LoRAs are allowed (the patcher reports keys that match
    nothing)."""
    if detection.foreign:
        return False
    return model_arch is None or is_compatible(detection.arch, model_arch)


def is_compatible(lora_arch: Arch | None, model_arch: Arch) -> bool:
    """Whether a LoRA of `lora_arch` can be applied to a model of `model_arch`. Unknown LoRAs are
    allowed (the patcher reports keys that match nothing); SD2 covers SD2-768-v."""
    return lora_arch is None or lora_arch is model_arch
