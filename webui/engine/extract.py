"""Extract one LoRA file: from a combination of LoRAs (their summed delta on a checkpoint) or
from two checkpoints (fine-tuned minus base). Models are loaded on the CPU in fp32; each module's
delta is approximated by a truncated SVD (`networks.extract`) on the given device, one module at
a time, and written as a kohya `.safetensors` with its metadata.

A combination's deltas are the native patcher's own (every format it applies, DoRA and OFT
included): the set is applied a few dozen modules at a time, each module's change is read back
and the weights are restored, so memory stays near one model."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from webui.arch import Prediction
from webui.engine.checkpoints import LoadedModel, ModelKind, checkpoint_from_path, load_checkpoint
from webui.engine.generate import Progress, ProgressCallback, Stage
from webui.engine.merge import (
    MergeError,
    check_bases,
    check_header_bases,
    load_lora_file,
    same_path,
)
from webui.engine.trigger_words import TriggerWordSource
from webui.layouts.unet import unet_module_names
from webui.networks.apply import (
    BflFusion,
    Component,
    ExtractedModule,
    ExtractionRecord,
    KeyMap,
    ModuleDelta,
    ModuleRef,
    NetworkPatcher,
    RankRule,
    SourceLora,
    Strengths,
    kohya_name,
    lora_metadata,
    lora_state_dict,
    low_rank,
    overall_error,
)
from webui.networks.format import Network, tag_frequency, write_safetensors
from webui.networks.library import read_civitai_info, read_user_metadata, split_words

log = logging.getLogger(__name__)

# (done, total, what): modules done of all, and what is being worked on; callers get `Progress`
_Step = Callable[[int, int, str], None]
# Modules patched at once when reading a combination's deltas (bounds the backups' memory).
CHUNK_MODULES = 64
# A checkpoint difference below this (relative to the weight) is rounding, not fine-tuning.
MIN_RELATIVE_DELTA = 1e-4
_CPU = torch.device("cpu")


class ExtractionError(Exception):
    """An extraction refused before anything is written; the message says why."""


@dataclass(frozen=True)
class CombinationPart:
    """One LoRA of a combination, at its strength; `name` is how the metadata lists it."""

    network: Network
    strength: float | Strengths
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.network.name

    @property
    def strength_text(self) -> str:
        """The strength as a tag would write it: `0.8`, or only the fields that differ."""
        if not isinstance(self.strength, Strengths):
            return f"{self.strength:g}"
        return strengths_text(self.strength)


def uniform_strength(strengths: Strengths) -> float | None:
    """The one multiplier `strengths` applies everywhere, or None when parts differ."""
    s = strengths
    values = {s.te, s.unet, s.te1, s.te2, s.in_blocks, s.mid, s.out} - {None}
    if s.blocks or len(values) != 1:
        return None
    value = values.pop()
    return float(value) if isinstance(value, int | float) else None


def strengths_text(strengths: Strengths) -> str:
    """Constant strengths as `0.8`, or `te=0 unet=1 out=0.5` naming what differs from the
    defaults (te1/te2 default to te, in/mid/out to unet)."""
    uniform = uniform_strength(strengths)
    if uniform is not None:
        return f"{uniform:g}"
    s = strengths
    fields = [
        ("te", s.te, None),
        ("unet", s.unet, None),
        ("te1", s.te1, s.te),
        ("te2", s.te2, s.te),
        ("in", s.in_blocks, s.unet),
        ("mid", s.mid, s.unet),
        ("out", s.out, s.unet),
    ]
    parts = [
        f"{name}={value:g}"
        for name, value, default in fields
        if isinstance(value, int | float) and value != default
    ]
    if s.blocks:
        parts.append("lbw=" + ",".join(f"{k}:{v:g}" for k, v in s.blocks.items()))
    return " ".join(parts)


@dataclass(frozen=True)
class ModuleSummary:
    """One written module: kohya name, weight shape, rank kept and relative error."""

    name: str
    shape: tuple[int, ...]
    rank: int
    relative_error: float


@dataclass(frozen=True)
class ExtractionResult:
    """What an extraction wrote, with its sizes and errors."""

    out: Path
    kind: ModelKind
    rule: RankRule
    modules: tuple[ModuleSummary, ...]
    overall_error: float  # ||all residuals|| / ||all deltas||
    file_bytes: int
    dense_bytes: int  # the same deltas stored whole, in the same dtype
    source_bytes: int  # the LoRA files of a combination, or the fine-tuned checkpoint
    warnings: tuple[str, ...]
    seconds: float

    @property
    def worst(self) -> ModuleSummary:
        return max(self.modules, key=lambda m: m.relative_error)

    @property
    def mean_error(self) -> float:
        return sum(m.relative_error for m in self.modules) / len(self.modules)

    @property
    def ranks(self) -> tuple[int, int]:
        """The smallest and largest rank kept."""
        ranks = [m.rank for m in self.modules]
        return min(ranks), max(ranks)


def file_trigger_words(path: Path) -> tuple[str, ...]:
    """A LoRA's trigger words from its sidecars: the user's activation text, else civitai's."""
    user = read_user_metadata(path)
    if user is not None and user.activation_text:
        return user.activation_text
    civitai = read_civitai_info(path)
    return civitai.trained_words if civitai is not None else ()


def load_combination(loras: Sequence[tuple[Path, float]]) -> list[CombinationPart]:
    """LoRA files and strengths (the CLI's `--lora FILE:W`) as a combination."""
    try:
        return [CombinationPart(load_lora_file(path), weight) for path, weight in loras]
    except MergeError as exc:
        raise ExtractionError(str(exc)) from exc


def extract_combination(
    model_path: Path,
    parts: Sequence[CombinationPart],
    out: Path,
    rule: RankRule,
    *,
    device: torch.device = _CPU,
    dtype: torch.dtype = torch.float32,
    trigger_words: TriggerWordSource = file_trigger_words,
    progress: ProgressCallback | None = None,
) -> ExtractionResult:
    """Write to `out` one LoRA approximating the combination `parts` on the checkpoint at
    `model_path`: per module, the SVD of the summed delta truncated by `rule` (on `device`),
    factors in `dtype`. Raises ExtractionError (before writing) for an empty set, a scheduled
    strength, a LoRA of another base or one that matches nothing, or a bad output path;
    CheckpointError / NetworkFileError / FileNotFoundError for unreadable inputs."""
    started = time.perf_counter()
    report = _steps(progress)
    if not parts:
        raise ExtractionError("no LoRA to extract from")
    for part in parts:
        if isinstance(part.strength, Strengths) and part.strength.is_scheduled:
            raise ExtractionError(
                f"{part.label}: a per-step schedule cannot be baked into one LoRA file; "
                "give it a constant strength"
            )
    _check_output(out, [model_path, *(p.network.path for p in parts)])
    networks = [p.network for p in parts]
    checkpoint = checkpoint_from_path(model_path)
    try:
        check_header_bases(networks, checkpoint)
        report(0, 1, f"loading {checkpoint.path.name}")
        model = load_checkpoint(checkpoint, _CPU, torch.float32)
        check_bases(networks, model.kind.arch, checkpoint.path.name)
    except MergeError as exc:
        raise ExtractionError(str(exc)) from exc

    # chunk by chunk, each patched once: spares would only grow to the whole model
    patcher = NetworkPatcher(model.pipe, model.kind.arch, keep_spares=False)
    plan = patcher.plan(networks)  # the dry run: what matches, nothing written
    idle = [r.name for r in plan.networks if not r.matched]
    if idle:
        raise ExtractionError(f"{', '.join(idle)}: no module matches {checkpoint.path.name}")
    chunks = _chunks(patcher.keymap, parts, [r.matched for r in plan.networks])
    total = sum(len(chunk.targets) for chunk in chunks)
    extracted = _Extraction(model, rule, device, dtype, total, report)
    extracted.add_all(_combination_deltas(patcher, chunks))

    return extracted.save(
        out,
        base_model=checkpoint.path.name,
        sources=[_source(part, trigger_words) for part in parts],
        warnings=plan.warnings,
        source_bytes=sum(p.network.path.stat().st_size for p in parts),
        started=started,
    )


def extract_difference(
    base_path: Path,
    tuned_path: Path,
    out: Path,
    rule: RankRule,
    *,
    device: torch.device = _CPU,
    dtype: torch.dtype = torch.float32,
    min_relative_delta: float = MIN_RELATIVE_DELTA,
    progress: ProgressCallback | None = None,
) -> ExtractionResult:
    """Write to `out` one LoRA approximating `tuned_path` minus `base_path` (text encoders and
    UNet, Linear and Conv2d layers; modules whose change is below `min_relative_delta` of the
    weight are left out). Raises ExtractionError for checkpoints of different architectures or
    shapes, or ones that do not differ."""
    started = time.perf_counter()
    report = _steps(progress)
    _check_output(out, [base_path, tuned_path])
    base_file, tuned_file = checkpoint_from_path(base_path), checkpoint_from_path(tuned_path)
    report(0, 1, f"loading {base_file.path.name}")
    base = load_checkpoint(base_file, _CPU, torch.float32)
    report(0, 1, f"loading {tuned_file.path.name}")
    tuned = load_checkpoint(tuned_file, _CPU, torch.float32)
    if tuned.kind.arch is not base.kind.arch or tuned.kind.variant is not base.kind.variant:
        raise ExtractionError(
            f"{tuned_file.path.name} is {tuned.kind.label} but {base_file.path.name} is "
            f"{base.kind.label}: no difference to take"
        )
    _check_same_transformer(base, tuned)
    pairs = _module_pairs(KeyMap.from_pipeline(base.pipe), KeyMap.from_pipeline(tuned.pipe))
    extracted = _Extraction(base, rule, device, dtype, len(pairs), report)
    extracted.add_all(_difference_deltas(pairs, min_relative_delta))
    if not extracted.modules:
        raise ExtractionError(
            f"{tuned_file.path.name} and {base_file.path.name} have the same text encoder and "
            f"{'UNet' if base.kind.arch.has_unet else 'transformer'} weights: nothing to extract"
        )
    return extracted.save(
        out,
        base_model=base_file.path.name,
        tuned_model=tuned_file.path.name,
        source_bytes=_size(tuned_file.path),
        started=started,
    )


# -- the deltas ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """Some target modules and the (sub)networks that change exactly those."""

    targets: frozenset[tuple[Component, str]]
    networks: tuple[tuple[Network, float | Strengths], ...]


def _chunks(
    keymap: KeyMap, parts: Sequence[CombinationPart], matched: Sequence[Iterable[str]]
) -> list[_Chunk]:
    """The set split into chunks of about CHUNK_MODULES target modules; every network's modules
    on one target go into the same chunk, so each target gets its whole sum (a fused FLUX.1
    module ties its row pieces' targets together)."""
    groups: list[tuple[set[tuple[Component, str]], list[tuple[int, str]]] | None] = []
    group_of: dict[tuple[Component, str], int] = {}
    for index, prefixes in enumerate(matched):
        for prefix in prefixes:
            targets = {(p.ref.component, p.ref.path) for p in keymap.pieces(prefix)}
            if not targets:
                continue
            joined: tuple[set[tuple[Component, str]], list[tuple[int, str]]] = (
                set(targets),
                [(index, prefix)],
            )
            for old in sorted({group_of[t] for t in targets if t in group_of}):
                old_targets, old_owners = groups[old] or (set(), [])
                joined[0].update(old_targets)
                joined[1][:0] = old_owners
                groups[old] = None
            groups.append(joined)
            group_of.update(dict.fromkeys(joined[0], len(groups) - 1))
    chunks: list[_Chunk] = []
    targets: set[tuple[Component, str]] = set()
    owners: list[tuple[int, str]] = []
    for group in [*(g for g in groups if g is not None), None]:
        if group is not None:
            targets |= group[0]
            owners += group[1]
        if targets and (group is None or len(targets) >= CHUNK_MODULES):
            wanted: dict[int, list[str]] = {}
            for index, prefix in owners:
                wanted.setdefault(index, []).append(prefix)
            networks = tuple(
                (_subset(parts[index].network, prefixes), parts[index].strength)
                for index, prefixes in sorted(wanted.items())
            )
            chunks.append(_Chunk(frozenset(targets), networks))
            targets, owners = set(), []
    return chunks


def _subset(network: Network, prefixes: Sequence[str]) -> Network:
    return replace(network, modules={p: network.modules[p] for p in prefixes})


def _combination_deltas(patcher: NetworkPatcher, chunks: Sequence[_Chunk]) -> Iterator[ModuleDelta]:
    for chunk in chunks:
        try:
            patcher.apply(list(chunk.networks))
            yield from patcher.deltas()
        finally:
            patcher.restore()


def _transformer_size(model: LoadedModel) -> tuple[int, int, int] | None:
    """A FLUX.1 transformer's double and single block counts and width (None: a UNet)."""
    transformer = getattr(model.pipe, "transformer", None)
    if transformer is None:
        return None
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    return config.num_layers, config.num_single_layers, width


def _check_same_transformer(base: LoadedModel, tuned: LoadedModel) -> None:
    size, other = _transformer_size(base), _transformer_size(tuned)
    if size == other or size is None or other is None:
        return
    assert tuned.path is not None and base.path is not None

    def blocks(s: tuple[int, int, int]) -> str:
        return f"{s[0]} double and {s[1]} single blocks of width {s[2]}"

    raise ExtractionError(
        f"{tuned.path.name} is a FLUX.1 transformer of {blocks(other)}, but {base.path.name} "
        f"has {blocks(size)}: no difference to take"
    )


@dataclass(frozen=True)
class _Pair:
    base: ModuleRef
    tuned: ModuleRef


def _module_pairs(base: KeyMap, tuned: KeyMap) -> list[_Pair]:
    pairs: list[_Pair] = []
    for component in base.components:
        tuned_modules = tuned.modules(component)
        for path, ref in base.modules(component).items():
            weight = getattr(ref.module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                continue  # a norm without affine parameters
            other = tuned_modules.get(path)
            if other is None or other.module.weight.shape != weight.shape:
                raise ExtractionError(
                    f"{component.value} module {path} differs in shape between the checkpoints"
                )
            pairs.append(_Pair(ref, other))
    return pairs


@torch.no_grad()
def _difference_deltas(pairs: Sequence[_Pair], min_relative: float) -> Iterator[ModuleDelta | None]:
    """Each module's change, or None for an unchanged one (so progress still counts it)."""
    for pair in pairs:
        weight = pair.base.module.weight.float()
        delta = pair.tuned.module.weight.float() - weight
        if float(delta.norm()) <= min_relative * float(weight.norm()):
            yield None
            continue
        base_bias = getattr(pair.base.module, "bias", None)
        tuned_bias = getattr(pair.tuned.module, "bias", None)
        bias = None
        if not (base_bias is None or tuned_bias is None or torch.equal(base_bias, tuned_bias)):
            bias = tuned_bias.float() - base_bias.float()
        yield ModuleDelta(pair.base, delta, bias)


# -- compression and writing --------------------------------------------------------------------


class _Extraction:
    """Turns deltas into kohya modules one at a time and counts what cannot be written."""

    def __init__(
        self,
        model: LoadedModel,
        rule: RankRule,
        device: torch.device,
        dtype: torch.dtype,
        total: int,
        progress: _Step,
    ) -> None:
        self.kind = model.kind
        self.rule, self.device, self.dtype = rule, device, dtype
        self.total, self.progress = total, progress
        unet = getattr(model.pipe, "unet", None)
        self.ldm_names: Mapping[str, str] = unet_module_names(unet.config) if unet else {}
        # FLUX.1: kohya names fused BFL weights; their split pieces are joined back first
        transformer = getattr(model.pipe, "transformer", None)
        self.fusion = BflFusion(transformer) if transformer is not None else None
        self.modules: list[ExtractedModule] = []
        self.not_lora: list[str] = []  # norms and embeddings: no LoRA form
        self.bias_changed: list[str] = []

    def add_all(self, deltas: Iterable[ModuleDelta | None]) -> None:
        for done, delta in enumerate(deltas, 1):
            if delta is None:
                self.progress(done, self.total, "unchanged module")
                continue
            name = f"{delta.ref.component.value}.{delta.ref.path}"
            self.progress(done, self.total, name)
            self._add(delta, name)
        if self.fusion is not None:
            for bfl, weight in self.fusion.rest():
                self._add_weight(Component.UNET, bfl, weight, f"unet.{bfl}")
        self.progress(self.total, self.total, "factors computed")

    def _add(self, delta: ModuleDelta, name: str) -> None:
        if delta.bias is not None:
            self.bias_changed.append(name)
        if delta.weight.ndim not in (2, 4) or isinstance(delta.ref.module, torch.nn.Embedding):
            self.not_lora.append(name)
            return
        component, path, weight = delta.ref.component, delta.ref.path, delta.weight
        if self.fusion is not None and component is Component.UNET:
            fused = self.fusion.add(path, weight)
            if fused is None:
                return  # more pieces of this BFL weight to come
            path, weight = fused
        self._add_weight(component, path, weight, name)

    def _add_weight(self, component: Component, path: str, weight: torch.Tensor, name: str) -> None:
        if not bool(weight.any()):
            log.info("%s: the combination's deltas cancel out; left out", name)
            return
        factors = low_rank(weight, self.rule, dtype=self.dtype, device=self.device)
        name = kohya_name(component, path, self.kind.arch, self.ldm_names)
        self.modules.append(ExtractedModule(name, factors))

    def warnings(self) -> list[str]:
        out: list[str] = []
        if self.not_lora:
            out.append(
                f"{len(self.not_lora)} changed norm/embedding module(s) have no LoRA form and "
                f"are left out, e.g. {self.not_lora[0]}"
            )
        if self.bias_changed:
            out.append(
                f"{len(self.bias_changed)} bias change(s) have no LoRA form and are left out, "
                f"e.g. {self.bias_changed[0]}"
            )
        return out

    def save(
        self,
        out: Path,
        *,
        base_model: str,
        source_bytes: int,
        started: float,
        sources: Sequence[SourceLora] = (),
        tuned_model: str | None = None,
        warnings: Sequence[str] = (),
    ) -> ExtractionResult:
        """Write the modules to `out` with their metadata (`base_model`, and the combination's
        `sources` or the difference's `tuned_model`) and sum up what was written."""
        if not self.modules:
            raise ExtractionError("no Linear or Conv2d module changed: nothing to write")
        record = ExtractionRecord(
            arch=self.kind.arch,
            v_prediction=self.kind.prediction is Prediction.V,
            title=out.stem,
            rule=self.rule,
            base_model=base_model,
            modules=self.modules,
            sources=sources,
            tuned_model=tuned_model,
            variant=self.kind.variant,
        )
        write_safetensors(out, lora_state_dict(self.modules), lora_metadata(record))
        element = torch.empty((), dtype=self.dtype).element_size()
        summaries = tuple(
            ModuleSummary(m.name, m.factors.shape, m.factors.rank, m.factors.relative_error)
            for m in self.modules
        )
        return ExtractionResult(
            out=out,
            kind=self.kind,
            rule=self.rule,
            modules=summaries,
            overall_error=overall_error(self.modules),
            file_bytes=_size(out),
            dense_bytes=sum(math.prod(m.factors.shape) for m in self.modules) * element,
            source_bytes=source_bytes,
            warnings=(*warnings, *self.warnings()),
            seconds=time.perf_counter() - started,
        )


def _source(part: CombinationPart, trigger_words: TriggerWordSource) -> SourceLora:
    network = part.network
    words = tuple(trigger_words(network.path)) or split_words(
        network.metadata.get("modelspec.trigger_phrase", "")
    )
    return SourceLora(
        name=part.label,
        strength=part.strength_text,
        file=network.path.name,
        tag_frequency=tag_frequency(network.metadata.get("ss_tag_frequency")),
        trigger_words=words,
    )


def _check_output(out: Path, inputs: Sequence[Path]) -> None:
    if out.suffix.lower() != ".safetensors":
        raise ExtractionError(f"{out}: a LoRA is written as .safetensors; name it so")
    if out.is_dir():
        raise ExtractionError(f"{out}: is a folder")
    if any(same_path(out, path) for path in inputs):
        raise ExtractionError(f"{out}: the output must not be one of the inputs")


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _steps(progress: ProgressCallback | None) -> _Step:
    """The extraction's (done, total, what) steps as the engine's `Progress` (stage EXTRACT)."""

    def step(done: int, total: int, what: str) -> None:
        if progress is not None:
            progress(Progress(done, total, stage=Stage.EXTRACT, what=what))

    return step
