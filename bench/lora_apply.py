"""Benchmark: applying LoRAs with our native patcher versus diffusers/PEFT, on full-size
random-weight SD1.5 and SDXL models built from `configs/`.

Measures (median of --repeats): reading a file into a Network, applying 1 and 3 networks,
switching one network of three, re-applying the same set, restoring, and one UNet forward
(batch 2, as with CFG) with the set applied versus the base; then the same work through
`load_lora_weights` / `set_adapters` / `fuse_lora` / `unfuse_lora` / `unload_lora_weights`.

    python -m bench.lora_apply --arch both --device cpu --out bench/results/cpu.json
    python -m bench.lora_apply --quick            # tiny models, seconds: a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import diffusers
import torch
import transformers
from diffusers import (
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import save_file

from webui.arch import Arch
from webui.engine.model_factory import ModelSize, ModelSpec
from webui.engine.model_factory import build_pipeline as build_random_pipeline
from webui.layouts.unet import unet_module_names
from webui.networks.apply import Component, KeyMap, NetworkPatcher
from webui.networks.format import Network, read_network

log = logging.getLogger("bench.lora_apply")

T = TypeVar("T")

# Strengths of the set {A, B, C} (and D, which replaces C when switching).
STRENGTHS = (0.8, 0.6, 0.5)
# How many weights to keep copies of, to check restore is bit-exact and we match diffusers.
SAMPLE_MODULES = 6


class BenchArch(StrEnum):
    SD15 = "sd15"
    SDXL = "sdxl"

    @property
    def arch(self) -> Arch:
        return Arch.SD1 if self is BenchArch.SD15 else Arch.SDXL


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark run for one architecture."""

    arch: BenchArch
    device: torch.device
    dtype: torch.dtype
    rank: int
    repeats: int
    latent: int
    size: ModelSize
    unet_only: bool = False  # no text encoders built, no text-encoder modules in the files
    # native: base/patched UNet step pairs per repeat; diffusers: each step the fastest of this many
    step_calls: int = 2


@dataclass
class UnetOnly:
    """What the patcher and `lora_targets` need of a pipeline: its UNet."""

    unet: Any


@dataclass(frozen=True)
class LoraTarget:
    """One module a synthetic LoRA file changes: its kohya prefix and the weight shape."""

    prefix: str
    shape: tuple[int, ...]


# -- models ---------------------------------------------------------------------------------------


def build_pipeline(settings: BenchSettings) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """UNet and text encoder(s) of the full architecture with random weights; no VAE (a UNet
    step and the LoRA work never touch it, and it would only cost memory). With `unet_only`,
    no text encoders either."""
    pipe = build_random_pipeline(
        ModelSpec(settings.arch.arch, size=settings.size),
        with_vae=False,
        with_text_encoders=not settings.unet_only,
        dtype=settings.dtype,
    )
    for name in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            model.to(device=settings.device, dtype=settings.dtype).eval().requires_grad_(False)
    return pipe


def parameter_count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


# -- synthetic LoRA files -------------------------------------------------------------------------

_UNET_TARGET = re.compile(
    r"(\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"  # attention projections
    r"|\.ff\.net\.(0\.proj|2)"  # feed-forward linears
    r"|attentions\.\d+\.(proj_in|proj_out)"  # spatial transformer in/out
    r"|resnets\.\d+\.(conv1|conv2|conv_shortcut))$"  # resnet convs
)
_TEXT_TARGET = re.compile(r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def lora_targets(pipe: Any, arch: BenchArch) -> list[LoraTarget]:
    """Kohya prefixes (and weight shapes) for every attention projection, feed-forward linear,
    transformer proj_in/out and resnet conv of the UNet, and every text-encoder attention
    projection and MLP linear (of the encoders the pipeline has). SDXL files use the LDM
    layout names kohya writes for SDXL."""
    keymap = KeyMap.from_pipeline(pipe)
    ldm = unet_module_names(pipe.unet.config) if arch is BenchArch.SDXL else {}
    targets = [
        LoraTarget("lora_unet_" + ldm.get(path, path).replace(".", "_"), _shape(ref.module))
        for path, ref in keymap.modules(Component.UNET).items()
        if _UNET_TARGET.search(path)
    ]
    encoders = [(Component.TEXT_ENCODER, "lora_te1_" if arch is BenchArch.SDXL else "lora_te_")]
    if arch is BenchArch.SDXL:
        encoders.append((Component.TEXT_ENCODER_2, "lora_te2_"))
    for component, kohya in encoders:
        for path, ref in keymap.modules(component).items():
            if _TEXT_TARGET.search(path):
                name = "text_model." + path.removeprefix("text_model.")
                targets.append(LoraTarget(kohya + name.replace(".", "_"), _shape(ref.module)))
    return targets


def _shape(module: torch.nn.Module) -> tuple[int, ...]:
    return tuple(module.weight.shape)


def write_lora(path: Path, targets: list[LoraTarget], rank: int, seed: int, arch: BenchArch) -> int:
    """Write a kohya-format LoRA (fp16 tensors, like kohya saves) with random values; returns
    the number of parameters."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for target in targets:
        out_features, in_features, *kernel = target.shape
        fan_in = in_features * (kernel[0] * kernel[1] if kernel else 1)
        down = torch.randn(rank, in_features, *kernel, generator=generator) / fan_in**0.5
        up = torch.randn(out_features, rank, *([1, 1] if kernel else []), generator=generator)
        tensors[f"{target.prefix}.lora_down.weight"] = down.half()
        tensors[f"{target.prefix}.lora_up.weight"] = (up * 0.02).half()
        tensors[f"{target.prefix}.alpha"] = torch.tensor(float(rank // 2), dtype=torch.float16)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank // 2),
        "ss_base_model_version": "sdxl_base_v1-0" if arch is BenchArch.SDXL else "sd_v1",
    }
    save_file(tensors, str(path), metadata=metadata)
    return sum(t.numel() for t in tensors.values())


# -- timing ---------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Sample:
    """One measurement: wall seconds, and CPU seconds of this process (user + system, all
    threads). On a shared machine the CPU time is far less disturbed by other jobs than the wall
    time (but counts both threads: about 2x the wall time of a fully parallel section)."""

    wall: float
    cpu: float

    def __add__(self, other: Sample) -> Sample:
        return Sample(self.wall + other.wall, self.cpu + other.cpu)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(device: torch.device, fn: Callable[[], T]) -> tuple[Sample, T]:
    """The time `fn` took (the device synchronized on both sides) and what it returned."""
    synchronize(device)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    value = fn()
    synchronize(device)
    return Sample(time.perf_counter() - started, _cpu_seconds() - cpu_started), value


def timed(device: torch.device, fn: Callable[[], object], calls: int = 1) -> Sample:
    """The time `fn` took, the device synchronized on both sides; with `calls` > 1, the
    fastest of that many calls (for the UNet step, whose noise is larger than 2 %)."""
    return min((measure(device, fn)[0] for _ in range(calls)), key=lambda sample: sample.wall)


class Timings:
    """Samples per named measurement; reported as medians (and minimums: on a shared machine
    the minimum is the least disturbed sample), in wall and CPU seconds."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.samples: dict[str, list[Sample]] = {}

    def add(self, name: str, sample: Sample) -> Sample:
        self.samples.setdefault(name, []).append(sample)
        log.info("%s %s: %.3fs (cpu %.3fs)", self.label, name, sample.wall, sample.cpu)
        return sample

    def minimums(self) -> dict[str, float]:
        return {name: min(s.wall for s in values) for name, values in self.samples.items()}

    def medians(self) -> dict[str, float]:
        return {
            name: statistics.median(s.wall for s in values) for name, values in self.samples.items()
        }

    def cpu_medians(self) -> dict[str, float]:
        return {
            name: statistics.median(s.cpu for s in values) for name, values in self.samples.items()
        }

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": self.medians(),
            "min_seconds": self.minimums(),
            "cpu_seconds": self.cpu_medians(),
            "samples": {name: [s.wall for s in values] for name, values in self.samples.items()},
        }


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def unet_inputs(pipe: Any, settings: BenchSettings) -> dict[str, Any]:
    """Random inputs for one CFG UNet call: batch 2, square latent of `settings.latent`."""
    config = pipe.unet.config
    generator = torch.Generator().manual_seed(1)
    kwargs: dict[str, Any] = {
        "sample": torch.randn(
            2, config.in_channels, settings.latent, settings.latent, generator=generator
        ),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(
            2, 77, config.cross_attention_dim, generator=generator
        ),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=generator),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2),
        }
    return _to(kwargs, settings)


def _to(value: Any, settings: BenchSettings) -> Any:
    if isinstance(value, dict):
        return {k: _to(v, settings) for k, v in value.items()}
    if value.is_floating_point() and value.dim() > 0:
        return value.to(device=settings.device, dtype=settings.dtype)
    return value.to(settings.device)


def unet_step(pipe: Any, inputs: dict[str, Any]) -> Callable[[], object]:
    @torch.inference_mode()
    def step() -> object:
        return pipe.unet(**inputs, return_dict=False)[0]

    return step


def unet_parameters(unet: torch.nn.Module, *, copy: bool) -> dict[str, torch.Tensor]:
    """The UNet's parameters by name: the live tensors, or copies of them."""
    return {
        name: tensor.detach().clone() if copy else tensor.detach()
        for name, tensor in unet.named_parameters()
    }


def use_parameters(unet: torch.nn.Module, parameters: dict[str, torch.Tensor]) -> None:
    """Point each UNet parameter at the tensor of the same name (no copy)."""
    for name, parameter in unet.named_parameters():
        parameter.data = parameters[name]


def paired_steps(
    device: torch.device,
    pipe: Any,
    inputs: dict[str, Any],
    base: dict[str, torch.Tensor],
    pairs: int,
) -> list[tuple[Sample, Sample]]:
    """(base, patched) UNet step times, interleaved: each pair runs both weight sets back to back
    (order alternating, ABBA), switching by pointing the parameters at the other tensors, so the
    two sides see the same allocator, cache and machine state. Timing base and patched steps
    minutes apart, around applies that allocate and free gigabytes, measured the allocator
    (glibc returns freed blocks to the system or not depending on their history), not the
    weights. The patched weights are in place again on return."""
    patched = unet_parameters(pipe.unet, copy=False)
    step = unet_step(pipe, inputs)

    def step_with(parameters: dict[str, torch.Tensor]) -> Sample:
        use_parameters(pipe.unet, parameters)
        return measure(device, step)[0]

    samples: list[tuple[Sample, Sample]] = []
    try:
        step_with(patched)  # warm-up: the first step after an apply is slower, whatever the weights
        for pair in range(pairs):
            if pair % 2 == 0:
                base_sample = step_with(base)
                patched_sample = step_with(patched)
            else:
                patched_sample = step_with(patched)
                base_sample = step_with(base)
            samples.append((base_sample, patched_sample))
    finally:
        use_parameters(pipe.unet, patched)
    return samples


# -- weight samples (correctness checks that cost little memory) ---------------------------------


def sample_weights(pipe: Any) -> dict[str, torch.Tensor]:
    """Copies of a few UNet/text-encoder weights the LoRAs change, spread over the model."""
    keymap = KeyMap.from_pipeline(pipe)
    chosen: dict[str, torch.Tensor] = {}
    for component in keymap.components:
        paths = [
            p for p in keymap.modules(component) if _UNET_TARGET.search(p) or _TEXT_TARGET.search(p)
        ]
        step = max(1, len(paths) // (SAMPLE_MODULES // len(keymap.components) or 1))
        for path in paths[::step][: SAMPLE_MODULES // len(keymap.components) or 1]:
            module = keymap.modules(component)[path].module
            chosen[f"{component.value}:{path}"] = module.weight.detach().clone()
    return chosen


def current_weights(pipe: Any, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        component, path = name.split(":", 1)
        out[name] = getattr(pipe, component).get_submodule(path).weight.detach().clone()
    return out


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# -- the two engines ------------------------------------------------------------------------------


def bench_native(
    pipe: Any, settings: BenchSettings, files: list[Path], inputs: dict[str, Any]
) -> dict[str, Any]:
    """Our patcher: load, apply 1, apply 3, re-apply, switch one, restore, step times."""
    device = settings.device
    timings = Timings(f"{settings.arch} native")
    before = sample_weights(pipe)
    base_parameters = unet_parameters(pipe.unet, copy=True)
    step_ratios: list[Sample] = []  # patched / base per pair, wall and CPU
    patcher = NetworkPatcher(pipe, settings.arch.arch)
    networks: list[Network] = []
    patched: dict[str, torch.Tensor] = {}
    report_modules = spare_bytes = 0
    for repeat in range(settings.repeats):
        networks = []
        loads: list[Sample] = []
        for path in files:
            sample, network = measure(device, partial(read_network, path))
            loads.append(timings.add("load_one", sample))
            networks.append(network)
        load_3 = timings.add("load_3", loads[0] + loads[1] + loads[2])
        a, b, c, d = networks
        set_abc = [(a, STRENGTHS[0]), (b, STRENGTHS[1]), (c, STRENGTHS[2])]
        set_abd = [(a, STRENGTHS[0]), (b, STRENGTHS[1]), (d, STRENGTHS[2])]

        timings.add("apply_1", timed(device, partial(patcher.apply, [(a, STRENGTHS[0])])))
        timings.add("restore_1", timed(device, patcher.restore))

        sample, report = measure(device, partial(patcher.apply, set_abc))
        timings.add("load_and_apply_3", load_3 + timings.add("apply_3", sample))
        report_modules = report.modules_changed
        if repeat == 0:
            if report.warnings:
                log.warning("native apply warnings: %s", report.warnings[:5])
            patched = current_weights(pipe, list(before))
        for base_sample, patched_sample in paired_steps(
            device, pipe, inputs, base_parameters, settings.step_calls
        ):
            timings.add("step_base", base_sample)
            timings.add("step_patched", patched_sample)
            step_ratios.append(
                Sample(patched_sample.wall / base_sample.wall, patched_sample.cpu / base_sample.cpu)
            )
        timings.add("reapply_same_3", timed(device, partial(patcher.apply, set_abc)))
        timings.add("switch_1_of_3", timed(device, partial(patcher.apply, set_abd)))
        timings.add("restore_3", timed(device, patcher.restore))
        spare_bytes = patcher.spare_bytes
        # the same apply without spares: every patched tensor is new memory
        patcher.release_memory()
        sample = timed(device, partial(patcher.apply, set_abc))
        timings.add(
            "load_and_apply_3_fresh_memory", load_3 + timings.add("apply_3_fresh_memory", sample)
        )
        patcher.restore()
        patcher.release_memory()
    restored = current_weights(pipe, list(before))
    del base_parameters
    return {
        **timings.summary(),
        "step_patched_over_base_per_pair": [r.wall for r in step_ratios],
        "step_patched_over_base": statistics.median(r.wall for r in step_ratios),
        "step_patched_over_base_cpu": statistics.median(r.cpu for r in step_ratios),
        "modules_changed_by_3": report_modules,
        "spare_gb_after_restore": spare_bytes / 1e9,
        "lora_modules_per_file": len(networks[0].modules),
        "restore_bit_exact": all(torch.equal(before[k], restored[k]) for k in before),
        "_patched_sample": patched,
    }


def bench_diffusers(
    pipe: Any, settings: BenchSettings, files: list[Path], inputs: dict[str, Any]
) -> dict[str, Any]:
    """diffusers + PEFT: load_lora_weights x3, set_adapters, unfused step, fuse, fused step,
    switch one adapter (unfuse, load D, set_adapters, fuse), unfuse, unload."""
    device = settings.device
    timings = Timings(f"{settings.arch} diffusers")
    step = unet_step(pipe, inputs)
    names = ["A", "B", "C", "D"]
    sample_names = list(sample_weights(pipe))
    before = current_weights(pipe, sample_names)
    fused: dict[str, torch.Tensor] = {}
    adapters = 0
    for repeat in range(settings.repeats):
        loads: list[Sample] = []
        for name, path in zip(names[:3], files[:3], strict=True):
            # A path, not a state dict: diffusers may keep views of a dict it is given.
            sample = timed(
                device, lambda n=name, p=path: pipe.load_lora_weights(str(p), adapter_name=n)
            )
            loads.append(timings.add("load_one", sample))
        load_3 = timings.add("load_3", loads[0] + loads[1] + loads[2])
        if repeat == 0:
            adapters = sum(1 for m in pipe.unet.modules() if hasattr(m, "lora_A")) + sum(
                1
                for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
                if encoder is not None
                for m in encoder.modules()
                if hasattr(m, "lora_A")
            )
        set_adapters = timings.add(
            "set_adapters_3",
            timed(device, lambda: pipe.set_adapters(names[:3], adapter_weights=list(STRENGTHS))),
        )
        timings.add("step_unfused", timed(device, step, settings.step_calls))
        # lora_scale=1.0: the strengths come from set_adapters; other scales compound (TRAPS.md).
        fuse = timings.add(
            "fuse_3", timed(device, lambda: pipe.fuse_lora(adapter_names=names[:3], lora_scale=1.0))
        )
        timings.add("load_and_fuse_3", load_3 + set_adapters + fuse)
        if repeat == 0:
            fused = current_weights(pipe, sample_names)
        timings.add("step_fused", timed(device, step, settings.step_calls))

        def switch() -> None:
            pipe.unfuse_lora()
            pipe.load_lora_weights(str(files[3]), adapter_name="D")
            pipe.set_adapters(["A", "B", "D"], adapter_weights=list(STRENGTHS))
            pipe.fuse_lora(adapter_names=["A", "B", "D"], lora_scale=1.0)

        timings.add("switch_1_of_3", timed(device, switch))
        timings.add("unfuse_3", timed(device, pipe.unfuse_lora))
        timings.add("unload", timed(device, pipe.unload_lora_weights))
        gc.collect()
    after = current_weights(pipe, sample_names)
    return {
        **timings.summary(),
        "lora_layers_injected": adapters,
        "weights_back_after_unload_max_abs_diff": max_difference(before, after),
        "_fused_sample": fused,
    }


# -- one architecture -----------------------------------------------------------------------------


def run_arch(settings: BenchSettings, workdir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    pipe = build_pipeline(settings)
    build_seconds = time.perf_counter() - started
    log.info("%s built in %.1fs, peak RSS %.1f GB", settings.arch, build_seconds, peak_rss_gb())
    targets = lora_targets(pipe, settings.arch)
    files = [workdir / f"{settings.arch}_{name}.safetensors" for name in "ABCD"]
    lora_params = [
        write_lora(path, targets, settings.rank, seed, settings.arch)
        for seed, path in enumerate(files)
    ]
    inputs = unet_inputs(pipe, settings)
    timed(settings.device, unet_step(pipe, inputs))  # warm-up: allocator, kernels, threads

    native = bench_native(pipe, settings, files, inputs)
    log.info("%s native done, peak RSS %.1f GB", settings.arch, peak_rss_gb())
    reference = bench_diffusers(pipe, settings, files, inputs)
    log.info("%s diffusers done, peak RSS %.1f GB", settings.arch, peak_rss_gb())

    ratios = compute_ratios(native["seconds"], reference["seconds"])
    cpu_ratios = compute_ratios(native["cpu_seconds"], reference["cpu_seconds"])
    # the step target compares interleaved pairs (median of the per-pair ratios), not medians
    # taken apart
    ratios["native_step_patched_over_base"] = native["step_patched_over_base"]
    cpu_ratios["native_step_patched_over_base"] = native["step_patched_over_base_cpu"]
    result = {
        "settings": {
            "arch": settings.arch.value,
            "device": str(settings.device),
            "dtype": str(settings.dtype).removeprefix("torch."),
            "rank": settings.rank,
            "repeats": settings.repeats,
            "latent": f"{settings.latent}x{settings.latent}",
            "batch": 2,
            "size": settings.size.value,
            "unet_only": settings.unet_only,
            "step_calls": settings.step_calls,
        },
        "model": {
            "unet_params": parameter_count(pipe.unet),
            "text_encoder_params": parameter_count(pipe.text_encoder),
            "text_encoder_2_params": parameter_count(getattr(pipe, "text_encoder_2", None)),
            "vae": "not built (unused by these measurements)",
            "build_seconds": build_seconds,
        },
        "lora": {
            "modules_per_file": len(targets),
            "params_per_file": lora_params[0],
            "file_mb": files[0].stat().st_size / 2**20,
        },
        "native": {k: v for k, v in native.items() if not k.startswith("_")},
        "diffusers": {k: v for k, v in reference.items() if not k.startswith("_")},
        "native_vs_diffusers_fused_max_abs_diff": max_difference(
            native["_patched_sample"], reference["_fused_sample"]
        ),
        "ratios": ratios,
        "cpu_time_ratios": cpu_ratios,
        "targets": targets_met(settings, ratios),
        "targets_by_cpu_time": targets_met(settings, cpu_ratios),
        "peak_rss_gb": peak_rss_gb(),
    }
    del pipe, native, reference
    gc.collect()
    return result


def compute_ratios(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, float]:
    """The issue's ratios (and a few more) from two sides' medians."""
    return {
        "diffusers_load_fuse_3_over_native_load_apply_3": theirs["load_and_fuse_3"]
        / ours["load_and_apply_3"],
        "diffusers_load_fuse_3_over_native_apply_3": theirs["load_and_fuse_3"] / ours["apply_3"],
        "diffusers_load_fuse_3_over_native_load_apply_3_fresh_memory": theirs["load_and_fuse_3"]
        / ours["load_and_apply_3_fresh_memory"],
        "diffusers_fuse_3_over_native_apply_3": theirs["fuse_3"] / ours["apply_3"],
        "native_switch_over_apply_3": ours["switch_1_of_3"] / ours["apply_3"],
        "native_switch_over_load_and_apply_3": ours["switch_1_of_3"] / ours["load_and_apply_3"],
        "diffusers_switch_over_native_switch": theirs["switch_1_of_3"] / ours["switch_1_of_3"],
        "native_step_patched_over_base": ours["step_patched"] / ours["step_base"],
        "diffusers_step_unfused_over_base": theirs["step_unfused"] / ours["step_base"],
        "diffusers_step_fused_over_base": theirs["step_fused"] / ours["step_base"],
    }


def targets_met(settings: BenchSettings, ratios: dict[str, float]) -> dict[str, Any]:
    """The issue's targets; the 3x one is stated for SDXL on CPU, reported for every run."""
    return {
        "apply_3_at_least_3x_faster_than_diffusers_load_fuse": {
            "value": ratios["diffusers_load_fuse_3_over_native_load_apply_3"],
            "target": ">= 3.0",
            "met": ratios["diffusers_load_fuse_3_over_native_load_apply_3"] >= 3.0,
            "binding": settings.arch is BenchArch.SDXL and settings.device.type == "cpu",
        },
        "switch_at_most_40pct_of_apply_3": {
            "value": ratios["native_switch_over_apply_3"],
            "target": "<= 0.40",
            "met": ratios["native_switch_over_apply_3"] <= 0.40,
        },
        "patched_step_within_2pct_of_base": {
            "value": ratios["native_step_patched_over_base"],
            "target": "0.98 .. 1.02",
            "met": abs(ratios["native_step_patched_over_base"] - 1) <= 0.02,
        },
    }


# -- output ---------------------------------------------------------------------------------------

_ROWS = (
    ("load 1 file -> Network / load_lora_weights", "load_one", "load_one"),
    ("load 3 files", "load_3", "load_3"),
    ("apply 1 (the process's first: new memory)", "apply_1", None),
    ("apply 3 (into spares) / set_adapters + fuse_lora", "apply_3", "fuse_3"),
    ("load 3 + apply 3 / load 3 + set_adapters + fuse", "load_and_apply_3", "load_and_fuse_3"),
    ("apply 3 into new memory (spares released)", "apply_3_fresh_memory", None),
    ("load 3 + apply 3 into new memory", "load_and_apply_3_fresh_memory", "load_and_fuse_3"),
    ("switch 1 of 3", "switch_1_of_3", "switch_1_of_3"),
    ("re-apply same 3", "reapply_same_3", None),
    ("restore / unfuse_lora", "restore_3", "unfuse_3"),
    ("unload_lora_weights", None, "unload"),
    ("UNet step, base", "step_base", None),
    ("UNet step, 3 applied / fused", "step_patched", "step_fused"),
    ("UNet step, 3 unfused adapters", None, "step_unfused"),
)


def markdown_table(result: dict[str, Any]) -> str:
    ours, theirs = result["native"], result["diffusers"]
    s = result["settings"]
    lines = [
        f"{s['arch']} ({s['device']}, {s['dtype']}, rank {s['rank']}, median of {s['repeats']}, "
        f"UNet step at batch 2, {s['latent']} latent, {s['step_calls']} base/patched pairs per "
        "repeat (diffusers: fastest of as many calls)"
        + (", UNet-only files, no text encoders)" if s["unet_only"] else ")"),
        "",
        "| operation | native (s) | diffusers (s) | native CPU (s) | diffusers CPU (s) |",
        "|---|---:|---:|---:|---:|",
    ]

    def cell(side: dict[str, Any], column: str, name: str | None) -> str:
        return f"{side[column][name]:.3f}" if name else "-"

    for label, mine, other in _ROWS:
        cells = [
            cell(ours, "seconds", mine),
            cell(theirs, "seconds", other),
            cell(ours, "cpu_seconds", mine),
            cell(theirs, "cpu_seconds", other),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, target in result["targets"].items():
        by_cpu = result["targets_by_cpu_time"][name]
        verdict = "MET" if target["met"] else "NOT MET"
        lines.append(
            f"- {name}: {target['value']:.3f} (target {target['target']}): {verdict}"
            f" (by CPU time: {by_cpu['value']:.3f}, {'MET' if by_cpu['met'] else 'NOT MET'})"
        )
    return "\n".join(lines)


def write_result(result: dict[str, Any], out: Path | None) -> None:
    """Print a benchmark's result (without its environment) and write all of it to `out`."""
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=2))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def environment(module: str = "bench.lora_apply") -> dict[str, Any]:
    """The machine, the versions, and the command that ran `module`."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", module, *sys.argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
    }


def resolve_dtype(name: str, device: torch.device, arch: BenchArch) -> torch.dtype:
    """auto: fp16 on GPU; fp32 on CPU, except SDXL in bf16 (fp32 weights plus the patcher's
    copies of the originals would need ~25 GB)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if arch is BenchArch.SDXL else torch.float32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["sd15", "sdxl", "both"], default="both")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto"
    )
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--latent", type=int, default=None, help="latent side; default 64/128 on GPU, 32 on CPU"
    )
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke run")
    parser.add_argument(
        "--step-calls",
        type=int,
        default=2,
        help="UNet step: base/patched pairs per repeat (diffusers: fastest of N calls)",
    )
    parser.add_argument(
        "--unet-only",
        action="store_true",
        help="build no text encoders and write UNet-only files (to fit SDXL in ~16 GB on CPU)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # PEFT's per-adapter "missing keys" and transformers' load reports for text-encoder adapters
    # are noise here (the weights do load: the fused weights match ours).
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    args = parse_args(argv)
    device = torch.device(args.device)
    arches = [BenchArch.SD15, BenchArch.SDXL] if args.arch == "both" else [BenchArch(args.arch)]
    results: dict[str, Any] = {"environment": environment(), "results": {}}
    with tempfile.TemporaryDirectory(prefix="lora_bench_") as tmp:
        for arch in arches:
            if args.latent is not None:
                latent = args.latent
            elif args.quick:
                latent = 8
            elif device.type == "cuda":
                latent = 128 if arch is BenchArch.SDXL else 64
            else:
                latent = 32
            settings = BenchSettings(
                arch=arch,
                device=device,
                dtype=resolve_dtype(args.dtype, device, arch),
                rank=4 if args.quick else args.rank,
                repeats=min(args.repeats, 2) if args.quick else args.repeats,
                latent=latent,
                size=ModelSize.TINY if args.quick else ModelSize.FULL,
                unet_only=args.unet_only,
                step_calls=args.step_calls,
            )
            log.info("running %s", asdict(settings))
            result = run_arch(settings, Path(tmp))
            results["results"][arch.value] = result
            result["load_average_at_end"] = os.getloadavg()
            print(markdown_table(result), flush=True)
            if args.out is not None:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
            for path in Path(tmp).iterdir():
                path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
