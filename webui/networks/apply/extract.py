"""Low-rank extraction, the pure part: weight deltas -> truncated-SVD factors with their error,
kohya module names, and the kohya LoRA state dict and metadata that A1111, Forge, ComfyUI and
diffusers all load. No file or model access here (the engine's `extract` does that).

Layout written: `NAME.lora_up.weight` [out, r] (convs [out, r, 1, 1]), `NAME.lora_down.weight`
[r, in] (convs [r, in, kh, kw]) and one `NAME.alpha` for every module, the file's largest rank R,
with each module's r/R folded into its up: the delta is exactly (alpha/r) up @ down for every
reader, including those that take a single alpha for the whole file (diffusers does for modules
its `alpha_pattern` misses)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import torch
from torch import Tensor

from webui.arch import Arch, FluxVariant
from webui.families.flux1 import model as flux1
from webui.layouts.flux import lora_targets
from webui.networks.apply.keys import Component
from webui.networks.format.base_detection import modelspec_architecture

# Random projections wider than the rank by this much make `svd_lowrank` as good as the full SVD
# on the leading singular vectors (Halko et al.); the full SVD is used when it is not much bigger.
_OVERSAMPLE = 8
_LOWRANK_POWER_ITERATIONS = 4
_LOWRANK_SEED = 0
# CLIP's module names below `text_model.` (kohya always writes them with `text_model_`).
_CLIP_INNER_ROOTS = ("encoder", "embeddings", "final_layer_norm")
# sd-scripts' text-encoder prefixes (FLUX.1: networks/lora_flux.py, CLIP-L te1 and T5-XXL te3).
_TEXT_PREFIXES: Mapping[tuple[Component, Arch], str] = {
    (Component.TEXT_ENCODER, Arch.SD1): "lora_te_",
    (Component.TEXT_ENCODER, Arch.SD2): "lora_te_",
    (Component.TEXT_ENCODER, Arch.SDXL): "lora_te1_",
    (Component.TEXT_ENCODER_2, Arch.SDXL): "lora_te2_",
    (Component.TEXT_ENCODER, Arch.FLUX1): "lora_te1_",
    (Component.TEXT_ENCODER_2, Arch.FLUX1): "lora_te3_",
}
_T5 = (Component.TEXT_ENCODER_2, Arch.FLUX1)
# kohya sd-scripts' `ss_base_model_version`, `ss_network_module` and SAI model-spec
# implementations of a LoRA.
BASE_MODEL_VERSION = {
    Arch.SD1: "sd_v1",
    Arch.SD2: "sd_v2",
    Arch.SDXL: "sdxl_base_v1-0",
    Arch.FLUX1: "flux1",
}
_NETWORK_MODULE = {Arch.FLUX1: "networks.lora_flux"}
_SPEC_IMPLEMENTATION = {
    Arch.SD1: "diffusers",
    Arch.SD2: "diffusers",
    Arch.SDXL: "https://github.com/Stability-AI/generative-models",
    Arch.FLUX1: "https://github.com/black-forest-labs/flux",
}
EXTRACTION_METADATA_KEY = "lora_webui.extraction"
TRIGGER_WORDS_DATASET = "trigger words"


@dataclass(frozen=True)
class RankRule:
    """How many singular values a module keeps: a fixed `rank`, or the fewest whose squared sum
    reaches `energy` (a fraction of the total), capped by `max_rank` when given."""

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give either a rank or an energy threshold, not both")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be at least 1 (got {self.rank})")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1] (got {self.energy})")
        if self.max_rank is not None and self.max_rank < 1:
            raise ValueError(f"max rank must be at least 1 (got {self.max_rank})")

    def choose(self, singular_values: Tensor) -> int:
        """The rank to keep of a matrix with these singular values (descending, not all 0)."""
        available = singular_values.numel()
        if self.rank is not None:
            rank = self.rank
        else:
            squares = singular_values.double() ** 2
            kept = torch.cumsum(squares, 0) / squares.sum()
            # the first index whose cumulative share reaches the threshold (rounding may leave
            # the last share a hair under 1: then everything is kept)
            rank = int(torch.searchsorted(kept, torch.tensor([self.energy], dtype=kept.dtype)))
            rank += 1
        if self.max_rank is not None:
            rank = min(rank, self.max_rank)
        return max(1, min(rank, available))

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank {self.rank}"
        cap = f", max rank {self.max_rank}" if self.max_rank is not None else ""
        return f"energy {self.energy:g}{cap}"


@dataclass(frozen=True)
class LowRankDelta:
    """A delta's truncated SVD as kohya factors, and how far their product is from the delta."""

    up: Tensor
    down: Tensor
    relative_error: float  # ||D - up @ down||_F / ||D||_F, with the factors as stored
    delta_norm: float  # ||D||_F

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape: [out, in] or [out, in, kh, kw]."""
        return (self.up.shape[0], *self.down.shape[1:])

    def product(self) -> Tensor:
        """up @ down in fp32, shaped as the weight (what a loader adds at strength 1)."""
        return (self.up.float().flatten(1) @ self.down.float().flatten(1)).reshape(self.shape)


def _svd(matrix: Tensor, rule: RankRule) -> tuple[Tensor, Tensor, Tensor]:
    """U, S, Vh of `matrix` (fp32): randomized for a fixed rank well below the matrix size."""
    smallest = min(matrix.shape)
    if rule.rank is not None and (rule.rank + _OVERSAMPLE) * 4 <= smallest:
        # a fixed seed, without touching the caller's random state: the same inputs give the
        # same file
        devices = [matrix.device] if matrix.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_LOWRANK_SEED)
            u, s, v = torch.svd_lowrank(
                matrix, q=rule.rank + _OVERSAMPLE, niter=_LOWRANK_POWER_ITERATIONS
            )
        return u, s, v.mT
    return torch.linalg.svd(matrix, full_matrices=False)


@torch.no_grad()
def low_rank(
    delta: Tensor,
    rule: RankRule,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
) -> LowRankDelta:
    """Approximate a Linear ([out, in]) or Conv2d ([out, in, kh, kw]) weight delta by rank-r
    factors (SVD in fp32 on `device`, the delta's own by default; the singular values are split
    evenly between up and down). The factors come back on the CPU in `dtype`; the error is
    measured with them as stored. Raises ValueError for other shapes and for an all-zero delta."""
    if delta.ndim not in (2, 4):
        raise ValueError(
            f"only Linear and Conv2d deltas have a LoRA form (shape {tuple(delta.shape)})"
        )
    matrix = delta.to(device or delta.device, torch.float32).reshape(delta.shape[0], -1)
    norm = float(torch.linalg.matrix_norm(matrix))
    if norm == 0 or not math.isfinite(norm):
        raise ValueError(f"delta norm is {norm}: nothing to approximate")
    u, s, vh = _svd(matrix, rule)
    rank = rule.choose(s)
    root = s[:rank].sqrt()
    up = (u[:, :rank] * root).to(dtype)
    down = (root[:, None] * vh[:rank]).to(dtype)
    error = float(torch.linalg.matrix_norm(matrix - up.float() @ down.float())) / norm
    if delta.ndim == 4:
        up = up.reshape(*up.shape, 1, 1)
        down = down.reshape(rank, *delta.shape[1:])
    return LowRankDelta(up.cpu().contiguous(), down.cpu().contiguous(), error, norm)


def kohya_name(component: Component, path: str, arch: Arch, ldm_names: Mapping[str, str]) -> str:
    """The kohya module name of a model module, as sd-scripts writes it: SD1/SD2 UNets by their
    diffusers paths, SDXL UNets by the original SGM paths (`ldm_names`, diffusers -> SGM, from
    `layouts.unet.unet_module_names`), FLUX.1 transformers by BFL names (`path` is one, as
    `BflFusion` gives them), CLIP layers under `text_model_` with `lora_te_` (SD1/SD2) or
    `lora_te1_` (SDXL, FLUX.1), SDXL's second encoder `lora_te2_`, FLUX.1's T5 `lora_te3_`.
    Raises ValueError for a module with no such name."""
    if component is Component.UNET:
        if arch is Arch.SDXL:
            if path not in ldm_names:
                raise ValueError(f"UNet module {path} has no SGM name")
            path = ldm_names[path]
        return "lora_unet_" + path.replace(".", "_")
    head = _TEXT_PREFIXES.get((component, arch))
    if head is None:
        raise ValueError(f"{component.value} is not a text encoder of {arch.value}")
    inner = path.removeprefix("text_model.")
    if (component, arch) != _T5 and inner.split(".", 1)[0] in _CLIP_INNER_ROOTS:
        inner = "text_model." + inner
    return head + inner.replace(".", "_")


@dataclass(frozen=True)
class _Slot:
    """Where a diffusers module's delta goes in its BFL weight: rows (ranges, in order)."""

    bfl: str
    rows: tuple[tuple[int, int], ...] | None
    fused_rows: int


class BflFusion:
    """FLUX.1 transformer deltas, given per diffusers module, as deltas of BFL weights: the
    pieces of a fused weight (`qkv`: q, k, v; single-block `linear1`: q, k, v, MLP; the final
    modulation's swapped halves) put back by rows, a piece that never comes counted as zero
    (from the same table `layouts.flux` converts checkpoints with)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self._slots: dict[str, _Slot] = {}
        self._parts: dict[str, int] = {}
        for target in lora_targets(transformer):
            self._parts[target.bfl] = len(target.parts)
            for path, rows in target.parts:
                self._slots[path] = _Slot(target.bfl, rows, target.rows)
        self._pending: dict[str, tuple[Tensor, int]] = {}  # bfl -> (fused delta, parts in)

    def add(self, path: str, delta: Tensor) -> tuple[str, Tensor] | None:
        """Take one module's delta; returns (BFL name, its delta) once the weight is complete,
        None while pieces are missing. Raises KeyError for a path with no BFL name."""
        slot = self._slots[path]
        if slot.rows is None:
            return slot.bfl, delta
        fused, seen = self._pending.pop(slot.bfl, (None, 0))
        if fused is None:
            fused = delta.new_zeros((slot.fused_rows, *delta.shape[1:]))
        offset = 0
        for start, end in slot.rows:
            fused[start:end] = delta[offset : offset + end - start]
            offset += end - start
        if seen + 1 == self._parts[slot.bfl]:
            return slot.bfl, fused
        self._pending[slot.bfl] = (fused, seen + 1)
        return None

    def rest(self) -> list[tuple[str, Tensor]]:
        """The weights some of whose pieces never came (unchanged: zero rows)."""
        done = [(bfl, fused) for bfl, (fused, _) in self._pending.items()]
        self._pending.clear()
        return done


@dataclass(frozen=True)
class ExtractedModule:
    """One module of the extracted LoRA: its kohya name and factors."""

    name: str
    factors: LowRankDelta


def file_alpha(modules: Iterable[ExtractedModule]) -> int:
    """The one alpha written for every module: the largest rank (so alpha = rank, scale 1, when
    all ranks are equal)."""
    return max((m.factors.rank for m in modules), default=1)


def lora_state_dict(modules: Iterable[ExtractedModule]) -> dict[str, Tensor]:
    """kohya keys: up, down and alpha, the same alpha for every module (`file_alpha`), each
    module's rank/alpha folded into its up so that (alpha/rank) up @ down is the delta."""
    modules = list(modules)
    alpha = file_alpha(modules)
    tensors: dict[str, Tensor] = {}
    for module in modules:
        factors = module.factors
        up = factors.up
        if factors.rank != alpha:
            up = (up.float() * (factors.rank / alpha)).to(up.dtype)
        tensors[f"{module.name}.lora_up.weight"] = up
        tensors[f"{module.name}.lora_down.weight"] = factors.down
        tensors[f"{module.name}.alpha"] = torch.tensor(float(alpha), dtype=up.dtype)
    return tensors


@dataclass(frozen=True)
class SourceLora:
    """A LoRA of the combination, for the metadata: name, strength as given, file, training
    tags (summed over its datasets) and trigger words."""

    name: str
    strength: str
    file: str
    tag_frequency: tuple[tuple[str, int], ...] = ()
    trigger_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExtractionRecord:
    """Everything the metadata of an extracted LoRA says."""

    arch: Arch
    v_prediction: bool
    title: str
    rule: RankRule
    base_model: str  # file name of the checkpoint the deltas are relative to
    modules: Sequence[ExtractedModule]
    sources: Sequence[SourceLora] = ()  # a combination's LoRAs
    tuned_model: str | None = None  # the fine-tuned checkpoint, for a difference
    created: datetime = field(default_factory=datetime.now)
    variant: FluxVariant | None = None  # FLUX.1: dev or schnell


def merged_tag_frequency(sources: Sequence[SourceLora]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency` for a combination: each source's tags as one dataset named
    after it, and the sources' trigger words as a first dataset counted above every tag, so UIs
    that list the most frequent tags show them first."""
    top = max((count for source in sources for _, count in source.tag_frequency), default=0)
    triggers: dict[str, int] = {}
    for source in sources:
        for word in source.trigger_words:
            triggers.setdefault(word, top + 1)
    datasets = {TRIGGER_WORDS_DATASET: triggers} if triggers else {}
    for source in sources:
        if source.tag_frequency:
            datasets[source.name] = dict(source.tag_frequency)
    return datasets


def overall_error(modules: Sequence[ExtractedModule]) -> float:
    """||all residuals|| / ||all deltas||, the modules taken together."""
    total = sum(m.factors.delta_norm**2 for m in modules)
    residual = sum((m.factors.relative_error * m.factors.delta_norm) ** 2 for m in modules)
    return math.sqrt(residual / total) if total else 0.0


def _spec_architecture(record: ExtractionRecord) -> str:
    if record.arch is Arch.FLUX1:
        return flux1.MODELSPEC_ARCHITECTURES[record.variant or FluxVariant.DEV]
    return modelspec_architecture(record.arch, record.v_prediction)


def lora_metadata(record: ExtractionRecord) -> dict[str, str]:
    """kohya (`ss_*`) and SAI model-spec (`modelspec.*`) metadata, plus our own record of the
    extraction: rule, sources and each module's rank and relative error."""
    ranks = {m.factors.rank for m in record.modules}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    has_conv = any(m.factors.down.ndim == 4 for m in record.modules)
    triggers = list(dict.fromkeys(w for s in record.sources for w in s.trigger_words))
    origin = (
        f"{record.tuned_model} - {record.base_model}"
        if record.tuned_model
        else " + ".join(f"{s.name}:{s.strength}" for s in record.sources)
    )
    meta = {
        "ss_base_model_version": BASE_MODEL_VERSION[record.arch],
        "ss_v2": str(record.arch is Arch.SD2),
        "ss_network_module": _NETWORK_MODULE.get(record.arch, "networks.lora"),
        "ss_network_dim": dim,
        "ss_network_alpha": str(file_alpha(record.modules)),
        "ss_output_name": record.title,
        "ss_sd_model_name": record.base_model,
        "ss_training_comment": f"extracted by lora-webui (SVD, {record.rule.describe()}): {origin}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _spec_architecture(record) + "/lora",
        "modelspec.implementation": _SPEC_IMPLEMENTATION[record.arch],
        "modelspec.title": record.title,
        "modelspec.date": record.created.isoformat(timespec="seconds"),
    }
    if record.arch.has_unet:  # FLUX.1 is a flow model: no epsilon/v
        meta["modelspec.prediction_type"] = "v" if record.v_prediction else "epsilon"
    if has_conv:
        alpha = str(file_alpha(record.modules))
        meta["ss_network_args"] = json.dumps({"conv_dim": dim, "conv_alpha": alpha})
    if record.sources:
        meta["modelspec.merged_from"] = ", ".join(f"{s.file}:{s.strength}" for s in record.sources)
        tags = merged_tag_frequency(record.sources)
        if tags:
            meta["ss_tag_frequency"] = json.dumps(tags)
    if triggers:
        meta["modelspec.trigger_phrase"] = ", ".join(triggers)
    meta[EXTRACTION_METADATA_KEY] = json.dumps(
        {
            "method": "svd",
            "rule": {
                "rank": record.rule.rank,
                "energy": record.rule.energy,
                "max_rank": record.rule.max_rank,
            },
            "base_model": record.base_model,
            "tuned_model": record.tuned_model,
            "sources": [
                {"file": s.file, "name": s.name, "strength": s.strength} for s in record.sources
            ],
            "overall_relative_error": overall_error(record.modules),
            "modules": {
                m.name: {"rank": m.factors.rank, "relative_error": m.factors.relative_error}
                for m in record.modules
            },
        }
    )
    return meta
