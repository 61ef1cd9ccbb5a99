"""The Tools tab: extract one LoRA from a combination (a list or the last generation's set),
extract a LoRA from two checkpoints, and bake LoRAs into a checkpoint. Each form shows a progress
bar while it works and a summary (file written, sizes, errors) when done.

Handlers are plain functions of the engine and the form's values, so they are tested without a
browser; `build_tools_tab` only lays the forms out and wires them."""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import torch

from webui.engine.checkpoints import CheckpointFile, CheckpointFormat
from webui.engine.extract import (
    CombinationPart,
    ExtractionError,
    ExtractionResult,
    extract_combination,
    extract_difference,
    strengths_text,
    uniform_strength,
)
from webui.engine.generate import Engine, Progress, ProgressCallback
from webui.engine.jobs import JobInterrupted, JobQueue
from webui.engine.merge import MergeError, MergeResult, merge_checkpoint
from webui.engine.network_set import ChosenNetwork, choose_networks
from webui.networks.apply import RankRule
from webui.networks.format import NetworkFileError
from webui.prompt import parse_prompt
from webui.ui.messages import user_message, warnings_html

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
TOOLS_CSS = """
.lw-tool-result th { text-align: left; padding-right: 12px; font-weight: 600; white-space: nowrap; }
.lw-tool-result td { word-break: break-all; }
"""
_SAFE_NAME = re.compile(r"^[\w][\w .+-]*$")
_EXPECTED = (ExtractionError, MergeError, NetworkFileError, ValueError, JobInterrupted)
T = TypeVar("T")


class Source(StrEnum):
    LIST = "LoRA list"
    LAST = "Last generation"


class RankMode(StrEnum):
    FIXED = "Fixed rank"
    ENERGY = "Energy threshold"


class ToolError(ValueError):
    """A form value that cannot be used; the message names the field."""


@dataclass(frozen=True)
class RankChoice:
    """The rank controls of a form."""

    mode: str
    rank: float
    energy: float
    max_rank: float

    def rule(self) -> RankRule:
        if self.mode == RankMode.FIXED:
            return RankRule(rank=int(self.rank))
        return RankRule(energy=float(self.energy), max_rank=int(self.max_rank) or None)


# -- form values -> engine arguments ----------------------------------------------------------


def lora_list_prompt(text: str) -> str:
    """The LoRA list as prompt tags: `<lora:...>` tags stay, other lines and comma-separated
    items (`name:strength`, `name`) become `<lora:name:strength>`."""
    tags: list[str] = []
    for line in text.splitlines():
        if "<" in line:
            tags.append(line)
            continue
        tags += [f"<lora:{item.strip()}>" for item in line.split(",") if item.strip()]
    return " ".join(tags)


def chosen_networks(engine: Engine, text: str) -> list[ChosenNetwork]:
    """The LoRA list resolved through the catalog; ToolError when it is empty or a name or tag
    is wrong (the message says which)."""
    prompt = parse_prompt(lora_list_prompt(text))
    problems = list(prompt.errors)
    chosen = choose_networks(prompt.tags, engine.catalog, problems)
    wanted = {tag.name.lower() for tag in prompt.tags}
    missing = [p for p in problems if "appears more than once" not in p]
    if missing or len({c.name.lower() for c in chosen}) < len(wanted):
        raise ToolError("LoRAs: " + "; ".join(missing or ["some names were not found"]))
    if not chosen:
        raise ToolError("LoRAs: the list is empty; write one name:strength per line")
    return chosen


def checkpoint_named(engine: Engine, name: str | None, field: str) -> CheckpointFile:
    for checkpoint in engine.checkpoints():
        if checkpoint.name == name:
            return checkpoint
    raise ToolError(f"{field}: choose a checkpoint from {engine.settings.models_dir}")


def output_path(folder: Path, name: str, suffix: str) -> Path:
    """`folder/name+suffix` for a plain file name that is not taken; ToolError otherwise."""
    stem = name.strip().removesuffix(suffix)
    if not _SAFE_NAME.match(stem) or stem in (".", ".."):
        raise ToolError(f"Output name {name!r}: use letters, digits, spaces, '.', '+', '-', '_'")
    path = folder / f"{stem}{suffix}"
    if path.exists():
        raise ToolError(f"Output name: {path} exists already; choose another name")
    return path


# -- summaries --------------------------------------------------------------------------------


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def extraction_html(result: ExtractionResult) -> str:
    """What was written: file, sizes, ranks, errors (overall, mean, worst module)."""
    low, high = result.ranks
    worst = result.worst
    rows = [
        ("File", str(result.out)),
        ("Model", f"{result.kind.label}, {len(result.modules)} modules, {result.rule.describe()}"),
        ("Ranks", f"{low}" if low == high else f"{low}–{high}"),
        (
            "Size",
            f"{_mib(result.file_bytes)} (deltas stored whole: {_mib(result.dense_bytes)}; "
            f"sources: {_mib(result.source_bytes)})",
        ),
        (
            "Relative error",
            f"overall {result.overall_error:.3g}, mean {result.mean_error:.3g}, "
            f"worst {worst.relative_error:.3g} ({worst.name})",
        ),
        ("Time", f"{result.seconds:.1f} s"),
    ]
    return _table(rows) + warnings_html(list(result.warnings))


def merge_html(result: MergeResult) -> str:
    loras = ", ".join(f"{lora.name} ×{lora.weight:g}" for lora in result.loras)
    size = result.out.stat().st_size if result.out.is_file() else 0  # a folder: no one size
    rows = [
        ("Written", str(result.out)),
        ("Model", f"{result.kind.label} ({result.layout.value})"),
        ("LoRAs", loras),
        ("Modules changed", str(result.modules_changed)),
    ]
    if size:
        rows.append(("Size", _mib(size)))
    rows.append(("Time", f"{result.seconds:.1f} s"))
    return _table(rows) + warnings_html(result.warnings)


def _table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='lw-tool-result'>{body}</table>"


def last_generation_html(engine: Engine) -> str:
    networks = engine.last_networks
    if not networks:
        return "<i>The last generation used no LoRA (or nothing was generated yet).</i>"
    parts = ", ".join(html.escape(f"{c.name} ×{strengths_text(c.strengths)}") for c in networks)
    return f"Last generation: {parts}"


# -- handlers ---------------------------------------------------------------------------------

ProgressFn = Callable[..., Any]


def _in_turn(
    engine: Engine, name: str, progress: ProgressFn, work: Callable[[ProgressCallback], T]
) -> T:
    """Run `work` as job `name` in the engine's queue (after the generations before it), its
    `Progress` shown both on the form's bar and by `/sdapi/v1/progress`."""

    def job(record: ProgressCallback) -> T:
        def report(step: Progress) -> None:
            record(step)
            progress((step.step, step.total), desc=step.description, unit=step.unit)

        return work(report)

    return JobQueue.for_engine(engine).run(name, job)


def _error_html(exc: BaseException) -> str:
    if isinstance(exc, _EXPECTED):
        return warnings_html([str(exc)])
    return warnings_html([user_message(exc)])


def _extraction_html(
    engine: Engine,
    prepare: Callable[[], Callable[..., ExtractionResult]],
    rank: RankChoice,
    precision: str,
    out_name: str,
    progress: ProgressFn,
) -> str:
    """Check the form with `prepare()`, which returns the extraction with its inputs bound, and
    run it into `loras/` with the form's output name, rank rule, precision and progress bar, on
    the settings' device: the result table, or one error line."""
    try:
        extract = prepare()
        out = output_path(engine.settings.loras_dir, out_name, ".safetensors")
        result = _in_turn(
            engine,
            "extract",
            progress,
            lambda report: extract(
                out,
                rank.rule(),
                device=engine.settings.torch_device(),
                dtype=PRECISIONS[precision],
                progress=report,
            ),
        )
    except Exception as exc:  # one line in the form; unexpected ones are logged in full
        return _error_html(exc)
    engine.catalog.refresh()  # the new file shows up in the Networks tab
    return extraction_html(result)


def run_combination(
    engine: Engine,
    source: str,
    lora_text: str,
    model_name: str | None,
    rank: RankChoice,
    precision: str,
    out_name: str,
    progress: ProgressFn,
) -> str:
    """Extract the combination (the list, or the last generation's set) into `loras/`."""

    def prepare() -> Callable[..., ExtractionResult]:
        if source == Source.LAST:
            chosen = list(engine.last_networks)
            if not chosen:
                raise ToolError("The last generation used no LoRA: generate with some first")
        else:
            chosen = chosen_networks(engine, lora_text)
        parts = [CombinationPart(c.network, c.strengths, c.name) for c in chosen]
        checkpoint = checkpoint_named(engine, model_name, "Checkpoint")
        return partial(
            extract_combination, checkpoint.path, parts, trigger_words=engine.trigger_words_of
        )

    return _extraction_html(engine, prepare, rank, precision, out_name, progress)


def run_difference(
    engine: Engine,
    base_name: str | None,
    tuned_name: str | None,
    rank: RankChoice,
    precision: str,
    out_name: str,
    progress: ProgressFn,
) -> str:
    """Extract fine-tuned minus base into `loras/`."""

    def prepare() -> Callable[..., ExtractionResult]:
        base = checkpoint_named(engine, base_name, "Base checkpoint")
        tuned = checkpoint_named(engine, tuned_name, "Fine-tuned checkpoint")
        if base.path == tuned.path:
            raise ToolError("Fine-tuned checkpoint: choose another checkpoint than the base")
        return partial(extract_difference, base.path, tuned.path)

    return _extraction_html(engine, prepare, rank, precision, out_name, progress)


def run_bake(
    engine: Engine,
    model_name: str | None,
    lora_text: str,
    precision: str,
    out_name: str,
    progress: ProgressFn,
) -> str:
    """Bake the listed LoRAs into a new checkpoint in `models/` (the merge command)."""
    try:
        checkpoint = checkpoint_named(engine, model_name, "Checkpoint")
        chosen = chosen_networks(engine, lora_text)
        loras = [(c.network.path, _single_strength(c)) for c in chosen]
        folder_output = checkpoint.format is CheckpointFormat.DIFFUSERS
        out = output_path(
            engine.settings.models_dir, out_name, "" if folder_output else ".safetensors"
        )
        result = _in_turn(
            engine,
            "bake",
            progress,
            lambda report: merge_checkpoint(
                checkpoint.path, loras, out, PRECISIONS[precision], progress=report
            ),
        )
    except Exception as exc:  # one line in the form; unexpected ones are logged in full
        return _error_html(exc)
    return merge_html(result)


def _single_strength(chosen: ChosenNetwork) -> float:
    strength = uniform_strength(chosen.strengths)
    if strength is not None:
        return strength
    raise ToolError(f"{chosen.name}: baking takes one strength per LoRA (name:strength)")


# -- layout -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RankControls:
    mode: gr.Radio
    rank: gr.Slider
    energy: gr.Slider
    max_rank: gr.Number

    @property
    def inputs(self) -> list[Any]:
        return [self.mode, self.rank, self.energy, self.max_rank]


def _rank_controls(prefix: str) -> _RankControls:
    mode = gr.Radio(
        [m.value for m in RankMode],
        value=RankMode.FIXED.value,
        label="Rank",
        elem_id=f"{prefix}-mode",
    )
    with gr.Row():
        rank = gr.Slider(1, 256, value=32, step=1, label="Rank", elem_id=f"{prefix}-rank")
        energy = gr.Slider(
            0.5,
            1.0,
            value=0.95,
            step=0.005,
            label="Energy kept (fraction of squared singular values)",
            visible=False,
            elem_id=f"{prefix}-energy",
        )
        max_rank = gr.Number(
            value=0, precision=0, label="Max rank (0: none)", visible=False, elem_id=f"{prefix}-max"
        )
    mode.change(
        lambda m: (
            gr.update(visible=m == RankMode.FIXED),
            gr.update(visible=m == RankMode.ENERGY),
            gr.update(visible=m == RankMode.ENERGY),
        ),
        inputs=mode,
        outputs=[rank, energy, max_rank],
        queue=False,
    )
    return _RankControls(mode, rank, energy, max_rank)


def _rank_form(values: Sequence[Any]) -> tuple[RankChoice, str, str]:
    """The values of `_RankControls.inputs`, precision and output name, as the handlers take
    them."""
    mode, rank, energy, max_rank, precision, out_name = values
    return RankChoice(mode, rank, energy, max_rank), precision, out_name


def _checkpoint_names(engine: Engine) -> list[str]:
    return [c.name for c in engine.checkpoints()]


def _current_checkpoint(engine: Engine, names: Sequence[str]) -> str | None:
    """The loaded model (the one that will load, before any has): a new file in `models/`
    never becomes the default."""
    model = engine.model
    name = model.name if model is not None else engine.default_model()
    if name in names:
        return name
    return names[0] if names else None


def checkpoint_values(
    engine: Engine, chosen: Sequence[str | None] | None = None
) -> tuple[Any, ...]:
    """Updates of the forms' checkpoint lists (combination, base, fine-tuned, bake) from
    `models/` as it is now: a choice still listed is kept; the others (and every list of a
    new page, `chosen=None`) take the loaded model; the fine-tuned list none."""
    names = _checkpoint_names(engine)
    current = _current_checkpoint(engine, names)
    defaults = (current, current, None, current)
    kept = chosen or defaults
    return tuple(
        gr.update(choices=names, value=value if value in names else default)
        for value, default in zip(kept, defaults, strict=True)
    )


def build_tools_tab(engine: Engine, tab: gr.Tab | None = None) -> list[gr.Dropdown]:
    """Lay out the three forms inside the current Blocks context and wire them; the checkpoint
    lists, in `checkpoint_values`' order, for the page to refresh."""
    names = _checkpoint_names(engine)  # one walk of models/
    current = _current_checkpoint(engine, names)
    intro = (
        "Extracted LoRAs are written to the LoRA folder, baked checkpoints to the models folder."
    )
    if not names:  # the demo model has no file to extract from
        intro += (
            f"\n\n⚠ No checkpoint in `{engine.settings.models_dir}`: these tools read checkpoint"
            " files. Put a Stable Diffusion checkpoint there and restart."
        )
    gr.Markdown(intro)
    with gr.Accordion("Extract a LoRA from a combination", open=True):
        with gr.Row():
            combo_model = gr.Dropdown(
                names, value=current, label="Checkpoint", elem_id="extract-model"
            )
            combo_source = gr.Radio(
                [s.value for s in Source], value=Source.LIST.value, label="LoRAs from"
            )
        combo_list = gr.Textbox(
            label="LoRAs (one name:strength per line, or <lora:…> tags)",
            lines=3,
            placeholder="style_ink:0.8\ncharacter:0.6",
            elem_id="extract-loras",
        )
        combo_last = gr.HTML(last_generation_html(engine), visible=False)
        combo_rank = _rank_controls("extract")
        with gr.Row():
            combo_precision = gr.Dropdown(list(PRECISIONS), value="fp32", label="Save precision")
            combo_out = gr.Textbox(value="combined", label="Output name (in the LoRA folder)")
        combo_go = gr.Button("Extract", variant="primary", elem_id="extract-go")
        combo_result = gr.HTML(elem_id="extract-result")
    with gr.Accordion("Extract a LoRA from two checkpoints", open=False):
        with gr.Row():
            diff_base = gr.Dropdown(names, value=current, label="Base checkpoint")
            diff_tuned = gr.Dropdown(names, value=None, label="Fine-tuned checkpoint")
        diff_rank = _rank_controls("difference")
        with gr.Row():
            diff_precision = gr.Dropdown(list(PRECISIONS), value="fp32", label="Save precision")
            diff_out = gr.Textbox(value="difference", label="Output name (in the LoRA folder)")
        diff_go = gr.Button("Extract", variant="primary", elem_id="difference-go")
        diff_result = gr.HTML(elem_id="difference-result")
    with gr.Accordion("Bake LoRAs into a checkpoint", open=False):
        bake_model = gr.Dropdown(names, value=current, label="Checkpoint")
        bake_list = gr.Textbox(
            label="LoRAs (one name:strength per line, or <lora:…> tags)", lines=3
        )
        with gr.Row():
            bake_precision = gr.Dropdown(list(PRECISIONS), value="fp16", label="Save precision")
            bake_out = gr.Textbox(value="merged", label="Output name (in the models folder)")
        bake_go = gr.Button("Bake", variant="primary", elem_id="bake-go")
        bake_result = gr.HTML(elem_id="bake-result")

    def on_combination(
        source: str,
        text: str,
        model: str | None,
        *values: Any,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects it
    ) -> str:
        choice, precision, out_name = _rank_form(values)
        return run_combination(engine, source, text, model, choice, precision, out_name, progress)

    def on_difference(
        base: str | None,
        tuned: str | None,
        *values: Any,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects it
    ) -> str:
        choice, precision, out_name = _rank_form(values)
        return run_difference(engine, base, tuned, choice, precision, out_name, progress)

    def on_bake(
        model: str | None,
        text: str,
        precision: str,
        out_name: str,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - gradio injects it
    ) -> str:
        return run_bake(engine, model, text, precision, out_name, progress)

    combo_go.click(
        on_combination,
        inputs=[
            combo_source,
            combo_list,
            combo_model,
            *combo_rank.inputs,
            combo_precision,
            combo_out,
        ],
        outputs=combo_result,
        concurrency_id="gpu",
    )
    diff_go.click(
        on_difference,
        inputs=[diff_base, diff_tuned, *diff_rank.inputs, diff_precision, diff_out],
        outputs=diff_result,
        concurrency_id="gpu",
    )
    bake_go.click(
        on_bake,
        inputs=[bake_model, bake_list, bake_precision, bake_out],
        outputs=bake_result,
        concurrency_id="gpu",
    )
    combo_source.change(
        lambda s: (
            gr.update(visible=s == Source.LIST),
            gr.update(visible=s == Source.LAST, value=last_generation_html(engine)),
        ),
        inputs=combo_source,
        outputs=[combo_list, combo_last],
        queue=False,
    )
    checkpoints = [combo_model, diff_base, diff_tuned, bake_model]
    if tab is not None:

        def on_select(*chosen: str | None) -> tuple[Any, ...]:
            return (*checkpoint_values(engine, chosen), last_generation_html(engine))

        tab.select(on_select, inputs=checkpoints, outputs=[*checkpoints, combo_last], queue=False)
    return checkpoints
