"""Extraction end to end on tiny SD1 and SDXL checkpoints, with plain diffusers as the reference:
the combination is what diffusers gets from the source files (`load_lora_weights` with the
strengths as adapter weights, fused), and the extracted file must load in diffusers and in our
patcher with the same effect. A checkpoint that differs from its base by a known LoRA gives that
LoRA back; the CLI and the Tools tab run the same code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch
from app_in_process import run_app
from diffusers import DiffusionPipeline
from lora_files import BASE_MODEL_VERSION, write_kohya_layers
from pipeline_copies import pipeline_copy
from safetensors import safe_open

from webui.arch import Arch
from webui.engine.checkpoints import LoadedModel, checkpoint_from_path, load_checkpoint
from webui.engine.extract import (
    ExtractionError,
    extract_combination,
    extract_difference,
    load_combination,
    strengths_text,
    uniform_strength,
)
from webui.engine.generate import Progress, Stage
from webui.engine.merge import merge_checkpoint
from webui.layouts.unet import unet_module_names
from webui.networks.apply.extract import EXTRACTION_METADATA_KEY, RankRule, kohya_name
from webui.networks.apply.keys import KeyMap
from webui.networks.apply.patcher import NetworkPatcher
from webui.networks.apply.strengths import Strengths
from webui.networks.format.network import load_network

CPU = torch.device("cpu")
COMPONENTS = ("text_encoder", "text_encoder_2", "unet")
SOURCE_RANK = 4
STRENGTHS = (0.7, -0.4)


@cache
def _loaded(path: Path) -> LoadedModel:
    # keyed by path: no test writes a second checkpoint at a path it loaded
    return load_checkpoint(checkpoint_from_path(path), CPU, torch.float32)


def load(path: Path) -> LoadedModel:
    """The checkpoint at `path` as `load_checkpoint` gives it: a fresh copy of the one loaded
    the first time (tests patch what they get)."""
    loaded = _loaded(path)
    return replace(loaded, pipe=pipeline_copy(loaded.pipe))


def weights(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every text-encoder and UNet tensor, by component and key."""
    out: dict[str, torch.Tensor] = {}
    for name in COMPONENTS:
        model = getattr(pipe, name, None)
        if model is not None:
            out |= {f"{name}.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    return out


def assert_close(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    """Every tensor equal to 1e-5 of its own size (relative Frobenius distance)."""
    assert expected.keys() == actual.keys()
    for key, want in expected.items():
        distance = float((actual[key] - want).norm() / want.norm().clamp_min(1e-12))
        assert distance < 1e-5, f"{key}: {distance:.2e}"


def diffusers_fused(model: Path, loras: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """The weights plain diffusers gives: each file as an adapter, weighted, fused once."""
    return dict(_diffusers_fused(model, tuple(loras)))  # callers only read the tensors


@cache
def _diffusers_fused(model: Path, loras: tuple[tuple[Path, float], ...]) -> dict[str, torch.Tensor]:
    # keyed by paths: no test rewrites a LoRA file or checkpoint at a path it read
    pipe = load(model).pipe
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, [weight for _, weight in loras])
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return weights(pipe)


def patched(model: Path, loras: list[tuple[Path, float]]) -> tuple[dict[str, torch.Tensor], int]:
    """Our patcher's weights for `loras`, and how many modules it matched."""
    loaded = load(model)
    report = NetworkPatcher(loaded.pipe, loaded.kind.arch).apply(
        [(load_network(path), weight) for path, weight in loras]
    )
    assert not report.warnings
    return weights(loaded.pipe), sum(len(r.matched) for r in report.networks)


def _no_add_embedding(component: str, path: str) -> bool:
    # diffusers cannot read kohya names of SDXL's add_embedding in the diffusers layout (the
    # sources'); it reads them in the SGM layout, which is what extraction writes
    return "add_embedding" not in path


@pytest.fixture(scope="module", params=[Arch.SD1, Arch.SDXL], ids=lambda a: a.value)
def combination(
    request: pytest.FixtureRequest, tiny_checkpoint_factory, tmp_path_factory
) -> Iterator[tuple[Arch, Path, list[tuple[Path, float]]]]:
    """A tiny checkpoint and two kohya LoRAs (LoCon: convs too) of rank 4 with strengths."""
    arch: Arch = request.param
    folder = tmp_path_factory.mktemp(f"combination-{arch.value}")
    model = tiny_checkpoint_factory(arch)
    pipe = load(model).pipe
    metadata = {
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_tag_frequency": json.dumps({"10_ink": {"ink wash": 9, "brush": 2}}),
    }
    loras = []
    for seed, (name, every, weight) in enumerate([("ink", 1, 0.7), ("fox", 3, -0.4)]):
        path = folder / f"{name}.safetensors"
        write_kohya_layers(
            path, pipe, arch, include=_no_add_embedding, every=every, seed=seed, std=0.1,
            rank=SOURCE_RANK, metadata=metadata,
        )  # fmt: skip
        loras.append((path, weight))
    (folder / "fox.json").write_text(json.dumps({"activation text": "foxy, red fur"}))
    yield arch, model, loras


def test_full_rank_extraction_reproduces_the_combination_in_diffusers_and_our_patcher(
    combination, tmp_path: Path
) -> None:
    arch, model, loras = combination
    out = tmp_path / "combined.safetensors"

    result = extract_combination(
        model, load_combination(loras), out, RankRule(rank=2 * SOURCE_RANK)
    )

    reference = diffusers_fused(model, loras)
    ours, matched = patched(model, [(out, 1.0)])
    assert matched == len(result.modules) > 100
    assert_close(reference, ours)
    assert_close(reference, diffusers_fused(model, [(out, 1.0)]))
    assert result.overall_error < 1e-5 and result.worst.relative_error < 1e-5
    assert result.file_bytes == out.stat().st_size and not result.warnings

    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
        names = {key.split(".", 1)[0] for key in handle.keys()}  # noqa: SIM118
    assert metadata["ss_base_model_version"] == BASE_MODEL_VERSION[arch]
    assert metadata["modelspec.merged_from"] == "ink.safetensors:0.7, fox.safetensors:-0.4"
    assert metadata["modelspec.trigger_phrase"] == "foxy, red fur"
    tags = json.loads(metadata["ss_tag_frequency"])
    assert tags["trigger words"] == {"foxy": 10, "red fur": 10}
    assert tags["ink"] == {"ink wash": 9, "brush": 2}
    if arch is Arch.SDXL:  # the original SGM layout, as kohya writes SDXL LoRAs
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
        assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in names
    else:
        assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q" in names
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names


def test_low_rank_extraction_reports_the_error_it_makes(combination, tmp_path: Path) -> None:
    _, model, loras = combination
    out = tmp_path / "small.safetensors"

    result = extract_combination(
        model, load_combination(loras), out, RankRule(rank=3), dtype=torch.float16
    )

    loaded = load(model)
    base = weights(loaded.pipe)
    reference = diffusers_fused(model, loras)
    extracted, _ = patched(model, [(out, 1.0)])
    with safe_open(str(out), framework="pt") as handle:
        recorded = json.loads(handle.metadata()[EXTRACTION_METADATA_KEY])["modules"]
    keys = _module_keys(loaded)
    assert len(recorded) == len(result.modules) > 100
    for module in result.modules:
        key = keys[module.name]
        delta = reference[key] - base[key]
        measured = float((extracted[key] - reference[key]).norm() / delta.norm())
        assert recorded[module.name]["relative_error"] == pytest.approx(
            measured, rel=1e-3, abs=1e-6
        )
        assert module.rank == 3
    assert 0.05 < result.overall_error < 1  # rank 3 of a rank-8 sum: a real, bounded error


def _module_keys(model: LoadedModel) -> dict[str, str]:
    """kohya module name -> weight key of `weights()`, through the names our patcher resolves."""
    keymap = KeyMap.from_pipeline(model.pipe)
    ldm = unet_module_names(model.pipe.unet.config)
    return {
        kohya_name(c, path, model.kind.arch, ldm): f"{c.value}.{path}.weight"
        for c in keymap.components
        for path in keymap.modules(c)
    }


def test_two_checkpoints_that_differ_by_a_lora_give_it_back(combination, tmp_path: Path) -> None:
    _, model, loras = combination
    lora = loras[0][0]
    tuned = tmp_path / "tuned.safetensors"
    merge_checkpoint(model, [(lora, 1.0)], tuned)
    out = tmp_path / "difference.safetensors"
    steps: list[Progress] = []

    result = extract_difference(
        model, tuned, out, RankRule(rank=SOURCE_RANK), progress=steps.append
    )

    assert_close(weights(load(tuned).pipe), patched(model, [(out, 1.0)])[0])
    assert_close(diffusers_fused(model, [(lora, 1.0)]), diffusers_fused(model, [(out, 1.0)]))
    assert len(result.modules) == len(load_network(lora).modules)
    assert result.overall_error < 1e-5
    assert steps[-1].step == steps[-1].total and len(steps) > len(result.modules)
    assert {step.stage for step in steps} == {Stage.EXTRACT}
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata[EXTRACTION_METADATA_KEY])["tuned_model"] == "tuned.safetensors"

    with pytest.raises(ExtractionError, match="nothing to extract"):
        extract_difference(model, model, tmp_path / "none.safetensors", RankRule(rank=4))


def test_refusals_name_the_problem(tiny_checkpoint_factory, combination, tmp_path: Path) -> None:
    arch, model, loras = combination
    other = tiny_checkpoint_factory(Arch.SD1 if arch is Arch.SDXL else Arch.SDXL)
    parts = load_combination(loras)
    with pytest.raises(ExtractionError, match=f"is {'SD1' if arch is Arch.SDXL else 'SDXL'}"):
        extract_combination(other, parts, tmp_path / "x.safetensors", RankRule(rank=4))
    with pytest.raises(ExtractionError, match=r"as \.safetensors"):
        extract_combination(model, parts, tmp_path / "x.pt", RankRule(rank=4))
    with pytest.raises(ExtractionError, match="must not be one of the inputs"):
        extract_combination(model, parts, loras[0][0], RankRule(rank=4))
    with pytest.raises(ExtractionError, match=r"(SD1|SDXL) but"):
        extract_difference(model, other, tmp_path / "x.safetensors", RankRule(rank=4))
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("combination", [Arch.SD1], ids=["SD1"], indirect=True)
def test_cli_extracts_a_combination_and_explains_bad_arguments(
    combination, tmp_path: Path, capfd
) -> None:
    """Through `app.py extract` (the CLI wiring is the same for every architecture)."""
    _, model, loras = combination
    out = tmp_path / "cli.safetensors"
    lora_args = [arg for path, w in loras for arg in ("--lora", f"{path}:{w}")]
    commands = [
        ["extract", "--model", str(model), *lora_args, "--energy", "0.9", "--out", str(out)],
        ["extract", "--model", str(model), *lora_args, "--rank", "0", "--out", str(out) + "2"],
    ]
    ok, bad = [run_app(capfd, *argv) for argv in commands]

    assert ok.returncode == 0, ok.stderr
    assert "loading tiny-sd1" in ok.stderr and "factors computed" in ok.stderr
    assert "relative error: overall" in ok.stdout and ok.stdout.strip().splitlines()[-1] == str(out)
    with safe_open(str(out), framework="pt") as handle:
        recorded = json.loads(handle.metadata()[EXTRACTION_METADATA_KEY])
    assert recorded["rule"]["energy"] == 0.9
    # energy 0.9 keeps at least 90% of each delta's energy: error at most sqrt(0.1)
    assert max(m["relative_error"] for m in recorded["modules"].values()) <= 0.1**0.5 + 1e-6
    assert bad.returncode == 2 and bad.stderr.strip() == "error: rank must be at least 1 (got 0)"


# How a `<lora:...>` tag writes these strengths (te1/te2 default to te, in/mid/out to unet).
@pytest.mark.parametrize(
    ("strengths", "uniform", "text"),
    [
        (Strengths.uniform(0.8), 0.8, "0.8"),
        (Strengths(te=1, unet=1, out=1), 1.0, "1"),
        (Strengths(te=0, unet=1), None, "te=0 unet=1"),
        (Strengths(te=1, unet=0.5, te2=1, mid=0.25), None, "te=1 unet=0.5 mid=0.25"),
        (Strengths(te=0.5, unet=0.5, blocks={"IN04": 1.0}), None, "te=0.5 unet=0.5 lbw=IN04:1"),
    ],
)
def test_strengths_are_written_as_a_tag_would(
    strengths: Strengths, uniform: float | None, text: str
) -> None:
    assert uniform_strength(strengths) == uniform
    assert strengths_text(strengths) == text
