"""Bake LoRAs into a checkpoint: load it on the CPU, apply the networks with the patcher, and write
the result in the layout of the input (a single `.safetensors` in the original LDM/SGM layout, a
FLUX.1 file with the very keys of the input, or a diffusers folder)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import torch

from webui.arch import Arch, Prediction
from webui.engine.checkpoints import (
    CheckpointFile,
    CheckpointFormat,
    CheckpointHeader,
    LoadedModel,
    ModelKind,
    checkpoint_from_path,
    detect_kind,
    exact_dtype,
    flux_transformer,
    load_checkpoint,
    read_header,
    save_flux_in_layout,
    save_folder,
    save_single_file,
)
from webui.engine.generate import Progress, ProgressCallback, Stage
from webui.families.flux1 import model as flux1
from webui.networks.apply import NetworkPatcher, NetworkReport, PatchReport
from webui.networks.format import (
    Network,
    NotALoraError,
    fits,
    load_network,
    modelspec_architecture,
    refuse_checkpoint,
)

log = logging.getLogger(__name__)

MERGE_METADATA_KEY = "lora_webui.merge"
# Source metadata that describes the source's bytes, wrong for the merged file.
_STALE_METADATA = ("modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash")


class MergeError(Exception):
    """A merge refused before anything is written; the message says why."""


class OutputLayout(StrEnum):
    SINGLE_FILE = "single-file"
    DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class MergedLora:
    """One LoRA of a merge: its file, strength and what the patcher did with it."""

    path: Path
    weight: float
    report: NetworkReport

    @property
    def name(self) -> str:
        return self.report.name


@dataclass(frozen=True)
class MergeResult:
    """What `merge_checkpoint` wrote."""

    out: Path
    layout: OutputLayout
    kind: ModelKind
    loras: tuple[MergedLora, ...]
    modules_changed: int
    kept_tensors: int  # original tensors copied as they were (not produced by the conversion)
    seconds: float
    notes: tuple[str, ...] = ()  # what the output differs in beyond the LoRAs (FLUX.1 fp8)

    @property
    def warnings(self) -> list[str]:
        return [*(w for lora in self.loras for w in lora.report.warnings), *self.notes]


def same_path(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name the same file or folder (through links, too)."""
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _check_output(checkpoint: CheckpointFile, out: Path) -> OutputLayout:
    if same_path(checkpoint.path, out):
        raise MergeError(f"{out}: the output must not be the input checkpoint")
    if checkpoint.format is CheckpointFormat.DIFFUSERS:
        if out.is_file():
            raise MergeError(
                f"{out}: a diffusers folder is written for a folder input; this is a file"
            )
        if out.is_dir() and any(out.iterdir()):
            raise MergeError(f"{out}: folder exists and is not empty")
        if checkpoint.path.resolve() in out.resolve().parents:
            raise MergeError(f"{out}: the output must not be inside the input folder")
        return OutputLayout.DIFFUSERS
    if out.suffix.lower() != ".safetensors":
        raise MergeError(f"{out}: a single-file checkpoint is written as .safetensors; name it so")
    if out.is_dir():
        raise MergeError(f"{out}: is a folder")
    return OutputLayout.SINGLE_FILE


def check_bases(networks: Sequence[Network], arch: Arch, model: str) -> None:
    """Raise MergeError naming every network made for another base than `arch`, or for a family
    this app does not run (a FLUX/SD3 file's CLIP part would otherwise be baked in)."""
    wrong = [n for n in networks if not fits(n.base, arch)]
    if wrong:
        details = "; ".join(
            n.base.refusal(n.name)
            or f"{n.name} is for {n.base.arch.value if n.base.arch else '?'} ({n.base.detail})"
            for n in wrong
        )
        raise MergeError(f"{model} is {arch.value}, but {details}")


def check_header_bases(
    networks: Sequence[Network], checkpoint: CheckpointFile
) -> CheckpointHeader | None:
    """Refuse (MergeError) networks of another base than a single-file checkpoint's, from its
    header, before the (slow) load; returns the header, or None for a diffusers folder (whose
    base is known only once loaded)."""
    if checkpoint.format is CheckpointFormat.DIFFUSERS:
        return None
    header = read_header(checkpoint.path)
    check_bases(networks, detect_kind(header, checkpoint.path.name).arch, checkpoint.path.name)
    return header


def load_lora_file(path: Path) -> Network:
    """Load a LoRA given by path; MergeError for a checkpoint or a file with no LoRA module."""
    try:
        refuse_checkpoint(path)  # from the header: a checkpoint is never loaded as a LoRA
    except NotALoraError as exc:
        raise MergeError(str(exc)) from exc
    network = load_network(path)
    if not network.modules:
        raise MergeError(f"{path}: holds no LoRA modules, not a LoRA file")
    return network


def merge_checkpoint(
    model_path: Path,
    loras: Sequence[tuple[Path, float]],
    out: Path,
    dtype: torch.dtype | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> MergeResult:
    """Write `model_path` with `loras` (file, strength) baked in to `out`, in the input's layout.

    Single files (.safetensors or .ckpt) give one `.safetensors` in the original key layout that
    keeps every source tensor the conversion does not produce and the source's metadata, plus
    modelspec merge metadata; diffusers folders give a diffusers folder. A FLUX.1 file keeps its
    keys (BFL, diffusers or ComfyUI names; transformer-only or all-in-one): the components the
    LoRAs change are written in `dtype`, by default in their stored one (fp8 as bf16, said in
    `notes`), the rest copied unchanged. SD checkpoints are written in `dtype` (default fp32).
    Raises MergeError (before writing anything) for an output equal to the input, LoRAs of
    another base, or LoRAs that change nothing; CheckpointError / NetworkFileError /
    FileNotFoundError for unreadable inputs.
    """
    say = _stages(progress)
    started = time.perf_counter()
    if not loras:
        raise MergeError("no LoRA to merge")
    checkpoint = checkpoint_from_path(model_path)
    layout = _check_output(checkpoint, out)
    networks = [load_lora_file(path) for path, _ in loras]
    header = check_header_bases(networks, checkpoint)
    source_metadata = dict(header.metadata) if header is not None else {}
    flux_file = header is not None and flux_transformer(header) is not None
    if flux_file and checkpoint.format is not CheckpointFormat.SAFETENSORS:
        raise MergeError(f"{checkpoint.path.name}: FLUX.1 checkpoints are read as .safetensors")
    # FLUX.1: loaded in a dtype that holds the stored weights exactly (bf16 for a bf16/fp8 file)
    load_dtype = exact_dtype(checkpoint.path, dtype) if flux_file else dtype or torch.float32

    say(f"loading {checkpoint.path.name} on the CPU in {str(load_dtype).removeprefix('torch.')}")
    model = load_checkpoint(checkpoint, torch.device("cpu"), load_dtype)
    check_bases(networks, model.kind.arch, checkpoint.path.name)

    say(f"applying {len(networks)} LoRA(s)")
    patcher = NetworkPatcher(model.pipe, model.kind.arch)
    report = patcher.apply([(n, w) for n, (_, w) in zip(networks, loras, strict=True)])
    idle = [r.name for r in report.networks if not r.matched]
    if idle:
        raise MergeError(
            f"{', '.join(idle)}: no module matches {checkpoint.path.name}; nothing to merge"
        )
    merged = tuple(
        MergedLora(path, weight, network_report)
        for (path, weight), network_report in zip(loras, report.networks, strict=True)
    )

    say(f"saving {out}")
    kept = 0
    notes: tuple[str, ...] = ()
    if layout is OutputLayout.SINGLE_FILE:
        written = dtype or load_dtype
        metadata = _merge_metadata(source_metadata, checkpoint, model.kind, merged, out, written)
        if flux_file:
            notes = _save_flux(model, patcher, report, checkpoint, out, metadata, dtype)
        else:
            kept = save_single_file(
                model.pipe, model.kind, out, metadata=metadata, keep_from=checkpoint.path
            )
    else:
        save_folder(model.pipe, out)
    return MergeResult(
        out=out,
        layout=layout,
        kind=model.kind,
        loras=merged,
        modules_changed=report.modules_changed,
        kept_tensors=kept,
        seconds=time.perf_counter() - started,
        notes=notes,
    )


_PART_NAMES = {part.component: part.label.split(" (")[0] for part in flux1.PARTS}


def _save_flux(
    model: LoadedModel,
    patcher: NetworkPatcher,
    report: PatchReport,
    checkpoint: CheckpointFile,
    out: Path,
    metadata: Mapping[str, str],
    dtype: torch.dtype | None,
) -> tuple[str, ...]:
    """Write a FLUX.1 merge with the input's keys; the notes say what the file could not take
    (text-encoder changes when its encoders are separate files) and what was widened (fp8)."""
    changed = {
        pieces[0].ref.component.value
        for network in report.networks
        for prefix in network.matched
        if (pieces := patcher.keymap.pieces(prefix))
    }
    changed = {"transformer" if c == "unet" else c for c in changed}
    notes: list[str] = []
    for component, path in model.parts.items():
        if component in changed:
            changed.discard(component)
            notes.append(
                f"the LoRAs' {_PART_NAMES[component]} changes are left out: "
                f"{checkpoint.path.name} does not hold it (it is read from {path.name})"
            )
    widened = save_flux_in_layout(
        model.pipe, checkpoint.path, out, changed, metadata=metadata, dtype=dtype
    )
    if widened:
        notes.append(
            f"{widened} fp8 weight(s) written as bf16: rounding the merged weights to fp8 "
            "would lose most of the LoRAs' change"
        )
    return tuple(notes)


_STAGES = ("loading", "applying", "saving")


def _stages(progress: ProgressCallback | None) -> Callable[[str], None]:
    """Each phase message (starting with one of `_STAGES`) as the engine's `Progress`."""

    def say(message: str) -> None:
        if progress is not None:
            done = next(i for i, stage in enumerate(_STAGES) if message.startswith(stage))
            progress(Progress(done, len(_STAGES), stage=Stage.BAKE, what=message))

    return say


def _merge_metadata(
    source: Mapping[str, str],
    checkpoint: CheckpointFile,
    kind: ModelKind,
    loras: Sequence[MergedLora],
    out: Path,
    dtype: torch.dtype,
) -> dict[str, str]:
    """The source's metadata (component configs included), with modelspec merge fields."""
    meta = {k: v for k, v in source.items() if k not in _STALE_METADATA}
    v_prediction = kind.prediction is Prediction.V
    meta.setdefault("modelspec.sai_model_spec", "1.0.0")
    if kind.variant is not None:  # FLUX.1: no epsilon/v prediction
        meta.setdefault("modelspec.architecture", flux1.MODELSPEC_ARCHITECTURES[kind.variant])
    else:
        meta.setdefault("modelspec.architecture", modelspec_architecture(kind.arch, v_prediction))
        meta["modelspec.prediction_type"] = "v" if v_prediction else "epsilon"
    meta["modelspec.title"] = out.stem
    meta["modelspec.date"] = datetime.now(UTC).date().isoformat()
    meta["modelspec.merged_from"] = ", ".join(
        [checkpoint.path.name, *(f"{lora.path.name}:{lora.weight:g}" for lora in loras)]
    )
    meta[MERGE_METADATA_KEY] = json.dumps(
        {
            "base": checkpoint.path.name,
            "dtype": str(dtype).removeprefix("torch."),
            "loras": [
                {
                    "file": lora.path.name,
                    "weight": lora.weight,
                    "matched": len(lora.report.matched),
                }
                for lora in loras
            ],
        }
    )
    return meta
