"""What a LoRA file holds, for `app.py inspect-lora`: variants, base, ranks and alphas, modules per
component, a summary of its training metadata, its hashes, and (given a model) how it fits."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from webui.arch import Arch
from webui.networks.format.files import FileHashes, compute_hashes, is_safetensors, read_header
from webui.networks.format.key_formats import UNKNOWN, embedding_name, is_embedding_key
from webui.networks.format.modules import LowRankModule, canonical_suffix, split_module_key
from webui.networks.format.network import Network
from webui.networks.format.training_metadata import tag_frequency

log = logging.getLogger(__name__)

TOP_TAGS = 10
EXAMPLES = 5  # names shown per list (matched, unmatched, ...) in text and JSON

# Prefix -> component label, longest first; the SD1/SD2 text encoder is "te", SDXL's are te1/te2.
_COMPONENT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te"),
    ("lora_unet_", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te"),
    ("unet.", "unet"),
    ("model.diffusion_model.", "unet"),
    ("diffusion_model.", "unet"),
)
# FLUX.1: CLIP-L is te1 and T5-XXL te2 (the strengths' names; sd-scripts writes T5 as lora_te3_,
# OneTrainer as lora_te2_), the transformer is unet.
_FLUX_COMPONENT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te2"),
    ("lora_te_", "te1"),
    ("lora_unet_", "unet"),
    ("lora_transformer_", "unet"),
    ("text_encoders.clip_l.", "te1"),
    ("text_encoders.t5xxl.", "te2"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te1"),
    ("transformer.", "unet"),
    ("model.diffusion_model.", "unet"),
    ("diffusion_model.", "unet"),
)
_KEY_FORMATS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("lora_unet_", "lora_te", "lora_transformer_"), "kohya"),
    (
        ("unet.", "text_encoder.", "text_encoder_2.", "transformer.", "base_model.model."),
        "diffusers/PEFT",
    ),
    (("model.diffusion_model.", "diffusion_model."), "LDM"),
    (("text_encoders.",), "ComfyUI"),
)
_CHECKPOINT_UNET = "model.diffusion_model."


class NotALoraError(ValueError):
    """A file that reads fine but holds no LoRA modules (a checkpoint, an embedding, ...)."""


@dataclass(frozen=True)
class ValueCount:
    """One distinct value (a rank, an alpha) and how many modules have it; None: not stored."""

    value: float | None
    count: int


@dataclass(frozen=True)
class UnsupportedModule:
    """A module prefix whose keys no variant understands."""

    prefix: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class MetadataSummary:
    """The training metadata a user looks for; the tag frequencies reduced to the top tags."""

    output_name: str | None = None
    base_model_version: str | None = None
    network_module: str | None = None
    network_dim: str | None = None
    network_alpha: str | None = None
    network_args: str | None = None
    epochs: str | None = None
    steps: str | None = None
    resolution: str | None = None
    modelspec_title: str | None = None
    modelspec_architecture: str | None = None
    top_tags: tuple[tuple[str, int], ...] = ()
    keys: int = 0  # how many metadata entries the file has


@dataclass(frozen=True)
class ModelCheck:
    """How the LoRA fits one loaded model (from the patcher's report)."""

    model: str
    model_arch: str
    base_fits: bool
    matched: int
    unmatched: int
    shape_mismatch: int
    unsupported: int
    matched_examples: tuple[str, ...]
    unmatched_examples: tuple[str, ...]
    shape_mismatch_examples: tuple[str, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class LoraInspection:
    """Everything `inspect-lora` reports about one file."""

    path: str
    name: str
    file_type: str  # safetensors or pickle
    key_formats: tuple[str, ...]  # kohya, diffusers/PEFT, LDM, other
    variants: tuple[str, ...]
    dora_modules: int
    modules: int
    modules_by_component: Mapping[str, int]
    ranks: tuple[ValueCount, ...]
    alphas: tuple[ValueCount, ...]
    base: str | None
    base_source: str
    base_detail: str
    metadata: MetadataSummary
    autov2: str
    autov3: str | None
    sha256: str
    unsupported: tuple[UnsupportedModule, ...]
    model_check: ModelCheck | None = None
    family: str | None = None  # also a family this app does not run (then `base` is None)
    key_format: str = UNKNOWN  # `identify_format`'s name: kohya, OneTrainer, PEFT/diffusers, ...
    embeddings: tuple[str, ...] = ()  # names of the bundled textual-inversion embeddings

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (dataclasses and tuples become objects and lists), the verdict
        line first."""
        return {"verdict": verdict(self), **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def looks_like_checkpoint(keys: Iterable[str]) -> bool:
    """True for a Stable Diffusion checkpoint's keys: UNet weights and no LoRA tensor suffix."""
    keys = list(keys)
    has_unet = any(key.startswith(_CHECKPOINT_UNET) for key in keys)
    # a plain `weight` is also IA3's suffix, but IA3 modules come with `on_input`
    lora_like = any(
        canonical_suffix(split_module_key(key)[1]) not in (None, "weight") for key in keys
    )
    return has_unet and not lora_like


def refuse_checkpoint(path: Path) -> None:
    """Raise NotALoraError for a safetensors checkpoint, from its header alone (loading a
    checkpoint's tensors as a LoRA would read gigabytes for nothing)."""
    if is_safetensors(path) and looks_like_checkpoint(read_header(path).tensors):
        raise NotALoraError(
            f"{path} is a Stable Diffusion checkpoint, not a LoRA (pass it as --model)"
        )


def component_of(prefix: str, arch: Arch | None = None) -> str:
    """The component label (te, te1, te2, unet, other) a module prefix belongs to."""
    name = prefix.removeprefix("base_model.model.")
    if arch is Arch.FLUX1:
        return next(
            (lb for start, lb in _FLUX_COMPONENT_PREFIXES if name.startswith(start)), "other"
        )
    for start, label in _COMPONENT_PREFIXES:
        if name.startswith(start):
            # PEFT names SDXL's first encoder text_encoder., kohya names it lora_te1_
            return "te1" if label == "te" and arch is Arch.SDXL else label
    return "other"


def _key_formats(prefixes: Iterable[str]) -> tuple[str, ...]:
    """The key formats present, in the table's order (then "other"), whatever the file's order."""
    found = {
        next((name for starts, name in _KEY_FORMATS if prefix.startswith(starts)), "other")
        for prefix in prefixes
    }
    return tuple(name for name in (*(name for _, name in _KEY_FORMATS), "other") if name in found)


def _counts(values: Iterable[float | None]) -> tuple[ValueCount, ...]:
    counter = Counter(values)
    ordered = sorted(counter.items(), key=lambda item: (-item[1], item[0] is None, item[0] or 0))
    return tuple(ValueCount(value, count) for value, count in ordered)


def summarize_metadata(metadata: Mapping[str, str]) -> MetadataSummary:
    """The fields of kohya (`ss_*`) and SAI modelspec metadata worth showing."""

    def first(*names: str) -> str | None:
        for name in names:
            value = metadata.get(name)
            if value not in (None, "", "None"):
                return value
        return None

    return MetadataSummary(
        output_name=first("ss_output_name"),
        base_model_version=first("ss_base_model_version"),
        network_module=first("ss_network_module"),
        network_dim=first("ss_network_dim"),
        network_alpha=first("ss_network_alpha"),
        network_args=first("ss_network_args"),
        epochs=first("ss_num_epochs", "ss_epoch"),
        steps=first("ss_max_train_steps", "ss_steps"),
        resolution=first("ss_resolution", "modelspec.resolution"),
        modelspec_title=first("modelspec.title"),
        modelspec_architecture=first("modelspec.architecture"),
        top_tags=tag_frequency(metadata.get("ss_tag_frequency"), TOP_TAGS),
        keys=len(metadata),
    )


def inspect_network(
    network: Network,
    check: ModelCheck | None = None,
    *,
    hashes: FileHashes | None = None,
) -> LoraInspection:
    """The inspection of a loaded network; `hashes` are computed from its file when not given.
    Raises NotALoraError when the file has no module any variant understands."""
    if not network.modules:
        keys = [
            f"{prefix}.{suffix}"
            for prefix, group in network.unsupported.items()
            for suffix in group
        ]
        if looks_like_checkpoint(keys):
            raise NotALoraError(
                f"{network.path} is a Stable Diffusion checkpoint, not a LoRA (pass it as --model)"
            )
        example = next(iter(network.unsupported), None)
        detail = f", e.g. {example!r}" if example else ""
        raise NotALoraError(
            f"{network.path} holds no LoRA modules ({len(network.unsupported)} unrecognised "
            f"groups{detail}): not a LoRA file"
        )
    hashes = hashes or compute_hashes(network.path)
    arch = network.base.arch
    low_rank = [m for m in network.modules.values() if isinstance(m, LowRankModule)]
    by_component = Counter(component_of(prefix, arch) for prefix in network.modules)
    return LoraInspection(
        path=str(network.path),
        name=network.name,
        file_type="safetensors" if network.path.suffix.lower() == ".safetensors" else "pickle",
        key_formats=_key_formats([*network.modules, *network.unsupported]),
        variants=tuple(v.value for v in network.variants),
        dora_modules=sum(1 for m in low_rank if m.dora is not None),
        modules=len(network.modules),
        modules_by_component={
            label: by_component[label]
            for label in ("te", "te1", "te2", "unet", "other")
            if by_component[label]
        },
        ranks=_counts(
            None if m.rank is None else float(m.rank) for m in low_rank
        ),  # LoKr with full factors has no rank
        alphas=_counts(m.alpha for m in low_rank),
        base=arch.value if arch else None,
        base_source=network.base.source,
        base_detail=network.base.detail,
        metadata=summarize_metadata(network.metadata),
        autov2=hashes.autov2,
        autov3=hashes.autov3,
        sha256=hashes.sha256,
        unsupported=tuple(
            UnsupportedModule(prefix, tuple(keys)) for prefix, keys in network.unsupported.items()
        ),
        model_check=check,
        family=network.base.family,
        key_format=network.base.key_format,
        embeddings=_embeddings(network.path),
    )


def _embeddings(path: Path) -> tuple[str, ...]:
    """The bundled embeddings' names, from a safetensors header (pickles: none reported)."""
    if not is_safetensors(path):
        return ()
    names = (embedding_name(key) for key in read_header(path).tensors if is_embedding_key(key))
    return tuple(dict.fromkeys(names))


# How the verdict names a variant beside "LoRA" (plain LoRA needs no word).
_VARIANT_WORDS = {
    "loha": "LoHa",
    "lokr": "LoKr",
    "ia3": "IA3",
    "glora": "GLoRA",
    "oft": "OFT",
    "boft": "BOFT",
    "full": "full weights",
    "norm": "norm layers",
}


def verdict(inspection: LoraInspection) -> str:
    """One plain line first: what the file is and whether this app runs it, e.g.
    `SDXL LoRA, OneTrainer format, DoRA, 722 modules, 1 bundled embedding "sks_dog"` or
    `FLUX.1 LoRA, kohya format: needs a FLUX.1 model`."""
    i = inspection
    fmt = f"{i.key_format} format"
    if i.base is None and i.family is not None:  # recognised, but not a family this app runs
        if i.family == "another model family":
            return f"LoRA of another model family, {fmt}: needs a model of that family"
        return f"{i.family} LoRA, {fmt}: needs a {i.family} model"
    parts = [f"{i.base} LoRA" if i.base else "LoRA of unknown base", fmt]
    parts += [_VARIANT_WORDS[v] for v in i.variants if v in _VARIANT_WORDS]
    if i.dora_modules:
        parts.append("DoRA")
    parts.append(f"{i.modules} module{'s' if i.modules != 1 else ''}")
    if i.embeddings:
        names = ", ".join(f'"{name}"' for name in i.embeddings)
        plural = "s" if len(i.embeddings) != 1 else ""
        parts.append(f"{len(i.embeddings)} bundled embedding{plural} {names}")
    return ", ".join(parts)


def _number(value: float | None, missing: str) -> str:
    if value is None:
        return missing
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _value_counts(values: tuple[ValueCount, ...], missing: str) -> str:
    if not values:
        return "-"
    return ", ".join(f"{_number(v.value, missing)} ×{v.count}" for v in values)


def _examples(names: tuple[str, ...], total: int) -> str:
    if not names:
        return ""
    more = f", … (+{total - len(names)})" if total > len(names) else ""
    return f": {', '.join(names)}{more}"


def format_text(inspection: LoraInspection) -> str:
    """The human-readable report `inspect-lora` prints."""
    i = inspection
    meta = i.metadata
    variants = ", ".join(i.variants) + (f" (DoRA on {i.dora_modules})" if i.dora_modules else "")
    lines = [
        verdict(i),
        f"{i.name}  ({i.path})",
        f"  format:      {i.file_type}, {' + '.join(i.key_formats)} key names",
        f"  variant:     {variants}",
        f"  base:        {i.base or 'unknown'} ({i.base_detail})",
        f"  rank:        {_value_counts(i.ranks, 'full')}",
        f"  alpha:       {_value_counts(i.alphas, 'none (= rank)')}",
        f"  modules:     {i.modules} ("
        + ", ".join(f"{label} {n}" for label, n in i.modules_by_component.items())
        + ")",
        f"  hashes:      AutoV2 {i.autov2}, AutoV3 {i.autov3 or '-'}",
    ]
    fields = (
        ("output name", meta.output_name),
        ("base model", meta.base_model_version),
        ("network", meta.network_module),
        ("dim / alpha", " / ".join(v for v in (meta.network_dim, meta.network_alpha) if v)),
        ("network args", meta.network_args),
        ("epochs", meta.epochs),
        ("steps", meta.steps),
        ("resolution", meta.resolution),
        ("title", meta.modelspec_title),
        ("architecture", meta.modelspec_architecture),
    )
    shown = [(label, value) for label, value in fields if value]
    if shown or meta.top_tags:
        lines.append(f"  metadata:    {meta.keys} entries")
        lines += [f"    {label + ':':<14}{value}" for label, value in shown]
        if meta.top_tags:
            tags = ", ".join(f"{tag} ({count})" for tag, count in meta.top_tags)
            lines.append(f"    {'top tags:':<14}{tags}")
    else:
        lines.append(f"  metadata:    {meta.keys} entries, no training metadata")
    if i.unsupported:
        lines.append(f"  unsupported: {len(i.unsupported)} module(s) of an unknown format")
        lines += [f"    {u.prefix}: {', '.join(u.keys)}" for u in i.unsupported[:EXAMPLES]]
        if len(i.unsupported) > EXAMPLES:
            lines.append(f"    … (+{len(i.unsupported) - EXAMPLES})")
    if (check := i.model_check) is not None:
        fits = "yes" if check.base_fits else f"no: made for {i.base}"
        lines += [
            f"  on model {check.model} ({check.model_arch}):",
            f"    base fits:      {fits}",
            f"    matched:        {check.matched}{_examples(check.matched_examples, check.matched)}",
            f"    unmatched:      {check.unmatched}"
            + _examples(check.unmatched_examples, check.unmatched),
            f"    shape mismatch: {check.shape_mismatch}"
            + _examples(check.shape_mismatch_examples, check.shape_mismatch),
        ]
        lines += [f"    warning: {w}" for w in check.warnings]
    return "\n".join(lines)
