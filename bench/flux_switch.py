"""Benchmark: a LoRA switch on a FLUX.1 transformer, native patcher versus diffusers/PEFT.

Builds `FluxTransformer2DModel` at full depth (19 double + 38 single blocks, the 304 modules a
kohya FLUX.1 LoRA touches, 494 diffusers modules once the fused `qkv` / `linear1` are split)
and a chosen width: narrow (64 or 128) to measure what every module costs on the host whatever
its size, which a GPU pays too, or 3072 (the real model, on a GPU). Writes four rank-32 kohya
files (A, B, C, D) and times, median of --repeats: reading, applying {A, B, C}, switching C for
D, restoring; then the same work through `load_lora_weights` / `set_adapters` / `fuse_lora` /
`unfuse_lora` on the same model. With --steps, transformer steps per second (it/s) at
--resolution, base, with our patched weights, diffusers fused and unfused.

    python -m bench.flux_switch --out bench/results/flux_switch_cpu.json
    python -m bench.flux_switch --device cuda --width 3072 --steps 8 --out bench/results/flux_switch_cuda.json
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file

from bench.lora_apply import Timings, environment, measure, peak_rss_gb, write_result
from webui.arch import Arch, FluxVariant
from webui.engine.model_factory import (
    ModelSize,
    ModelSpec,
    component_configs,
    config_folder,
    flux_pipeline,
)
from webui.layouts.flux import LoraTarget, lora_targets
from webui.networks.apply import NetworkPatcher
from webui.networks.format import Network, read_network

log = logging.getLogger("bench.flux_switch")

STRENGTHS = (0.8, 0.6, 0.5)
FULL_DEV = ModelSpec(Arch.FLUX1, size=ModelSize.FULL, variant=FluxVariant.DEV)
FULL_WIDTH = 3072
TEXT_TOKENS = 512  # T5's sequence in FLUX.1 [dev]
# the modules sd-scripts' networks/lora_flux.py trains in each block (its default, no te)
_KOHYA_MODULE = (
    r"^double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02]|mod\.lin)$",
    r"^single_blocks\.\d+\.(linear1|linear2|modulation\.lin)$",
)


# -- the model ------------------------------------------------------------------------------------


def transformer_config(width: int, blocks: tuple[int, int] | None = None) -> dict[str, Any]:
    """FLUX.1 [dev]'s transformer config from `configs/` with `width` channels (and `blocks`
    double + single blocks, for smoke runs; default the model's 19 + 38). Narrow widths use
    32-channel heads (rope axes 8+12+12), the full one BFL's 128 (16+56+56)."""
    config = dict(component_configs(FULL_DEV)["transformer"])
    if blocks is not None:
        config |= {"num_layers": blocks[0], "num_single_layers": blocks[1]}
    if width != FULL_WIDTH:
        head = 32
        if width % head:
            raise SystemExit(f"--width must be a multiple of {head} (or {FULL_WIDTH})")
        config |= {
            "attention_head_dim": head,
            "num_attention_heads": width // head,
            "axes_dims_rope": [8, 12, 12],
            "joint_attention_dim": width,
            "pooled_projection_dim": width,
        }
    return config


def build_pipe(
    width: int, blocks: tuple[int, int], device: torch.device, dtype: torch.dtype
) -> FluxPipeline:
    """A FluxPipeline holding only the random transformer (what LoRAs here change)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            transformer = FluxTransformer2DModel.from_config(transformer_config(width, blocks))
    finally:
        torch.set_default_dtype(previous)
    transformer.eval().requires_grad_(False)
    folder = config_folder(Arch.FLUX1, FluxVariant.DEV)
    return flux_pipeline(
        folder, transformer=transformer, vae=None, text_encoder=None, text_encoder_2=None
    )


def kohya_targets(transformer: torch.nn.Module) -> list[LoraTarget]:
    patterns = [re.compile(p) for p in _KOHYA_MODULE]
    return [t for t in lora_targets(transformer) if any(p.match(t.bfl) for p in patterns)]


# -- the files ------------------------------------------------------------------------------------


def _in_features(transformer: torch.nn.Module, target: LoraTarget) -> int:
    return transformer.get_submodule(target.parts[0][0]).weight.shape[1]


def write_files(
    transformer: torch.nn.Module, targets: list[LoraTarget], rank: int, folder: Path, peft: bool
) -> tuple[list[Path], list[Path]]:
    """Four kohya FLUX.1 files (fp16 factors, alpha rank/2, as sd-scripts saves them) and what
    diffusers loads for each: the kohya file itself at full width; at narrow widths, where its
    kohya converter fails (it splits `linear1` at 3072 rows), the same LoRA in PEFT names, made
    as that converter makes it (alpha/rank folded into `lora_A`, `lora_B` split by rows)."""
    kohya_paths, diffusers_paths = [], []
    for seed, name in enumerate("ABCD"):
        generator = torch.Generator().manual_seed(seed)
        kohya: dict[str, torch.Tensor] = {}
        twin: dict[str, torch.Tensor] = {}
        alpha = float(rank // 2)
        for target in targets:
            in_features = _in_features(transformer, target)
            down = (torch.randn(rank, in_features, generator=generator) / in_features**0.5).half()
            up = (torch.randn(target.rows, rank, generator=generator) * 0.02).half()
            key = "lora_unet_" + target.bfl.replace(".", "_")
            kohya[f"{key}.lora_down.weight"] = down
            kohya[f"{key}.lora_up.weight"] = up
            kohya[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
            for path, rows in target.parts:
                part = up if rows is None else torch.cat([up[a:b] for a, b in rows])
                twin[f"transformer.{path}.lora_A.weight"] = down.float() * (alpha / rank)
                twin[f"transformer.{path}.lora_B.weight"] = part.float()
        meta = {
            "ss_network_module": "networks.lora_flux",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(rank // 2),
            "ss_base_model_version": "flux1",
        }
        kohya_path = folder / f"flux_{name}.safetensors"
        save_file(kohya, str(kohya_path), metadata=meta)
        kohya_paths.append(kohya_path)
        if peft:
            twin_path = folder / f"flux_{name}_peft.safetensors"
            save_file(twin, str(twin_path), metadata={"modelspec.architecture": "flux-1-dev/lora"})
            diffusers_paths.append(twin_path)
        else:
            diffusers_paths.append(kohya_path)
    return kohya_paths, diffusers_paths


# -- weights for the checks ---------------------------------------------------------------------


def sample_paths(targets: list[LoraTarget], count: int = 12) -> list[str]:
    """Diffusers weight paths spread over the model's targets (all parts of each)."""
    step = max(1, len(targets) // count)
    return [f"{path}.weight" for t in targets[::step] for path, _ in t.parts]


def weights(transformer: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(transformer.named_parameters())
    # a PEFT-wrapped layer names its weight `base_layer.weight`
    return {
        n: params.get(n, params.get(n.replace(".weight", ".base_layer.weight"))).detach().clone()
        for n in names
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# -- the two sides --------------------------------------------------------------------------------


def bench_native(
    pipe: FluxPipeline, files: list[Path], repeats: int, device: torch.device, samples: list[str]
) -> dict[str, Any]:
    """Read 3, apply {A,B,C} from the base, switch to {A,B,D}, restore; the first repeat
    (new memory: the patcher keeps its patched tensors as spares afterwards) kept apart."""
    timings = Timings("native")
    before = weights(pipe.transformer, samples)
    patcher = NetworkPatcher(pipe, Arch.FLUX1)
    networks: list[Network] = []
    first: dict[str, float] = {}
    patched: dict[str, torch.Tensor] = {}
    modules = 0
    for repeat in range(repeats + 1):
        loads = []
        networks = []
        for path in files:
            sample, network = measure(device, partial(read_network, path))
            loads.append(sample)
            networks.append(network)
        a, b, c, d = networks
        set_abc = [(a, STRENGTHS[0]), (b, STRENGTHS[1]), (c, STRENGTHS[2])]
        set_abd = [(a, STRENGTHS[0]), (b, STRENGTHS[1]), (d, STRENGTHS[2])]
        apply, report = measure(device, partial(patcher.apply, set_abc))
        if repeat == 0:
            if report.warnings:
                log.warning("native apply warnings: %s", report.warnings[:5])
            modules = report.modules_changed
            patched = weights(pipe.transformer, samples)
        switch = measure(device, partial(patcher.apply, set_abd))[0]
        restore = measure(device, patcher.restore)[0]
        if repeat == 0:  # new memory: a process's first apply
            first = {"apply_3": apply.wall, "switch_1_of_3": switch.wall, "restore": restore.wall}
            continue
        timings.add("load_3", loads[0] + loads[1] + loads[2])
        timings.add("apply_3", apply)
        timings.add("switch_1_of_3", switch)
        timings.add("restore", restore)
    restored = weights(pipe.transformer, samples)
    return {
        **timings.summary(),
        "first_repeat_seconds": first,
        "file_modules": len(networks[0].modules),
        "model_modules_written": modules,
        "restore_bit_exact": all(torch.equal(before[k], restored[k]) for k in before),
        "_patched": patched,
    }


def bench_diffusers(
    pipe: FluxPipeline, files: list[Path], repeats: int, device: torch.device, samples: list[str]
) -> dict[str, Any]:
    """load_lora_weights x3, set_adapters + fuse_lora, switch (unfuse, load D, set_adapters,
    fuse), unfuse_lora, unload_lora_weights; the first repeat kept apart as for ours."""
    timings = Timings("diffusers")
    names = ["A", "B", "C", "D"]
    before = weights(pipe.transformer, samples)
    fused: dict[str, torch.Tensor] = {}
    first: dict[str, float] = {}
    layers = 0
    for repeat in range(repeats + 1):
        loads = [
            measure(device, lambda n=n, p=p: pipe.load_lora_weights(str(p), adapter_name=n))[0]
            for n, p in zip(names[:3], files[:3], strict=True)
        ]
        if repeat == 0:
            layers = sum(1 for m in pipe.transformer.modules() if hasattr(m, "lora_A"))

        def fuse(adapters: list[str]) -> None:
            pipe.set_adapters(adapters, adapter_weights=list(STRENGTHS))
            # lora_scale=1.0: the strengths come from set_adapters; other scales compound
            pipe.fuse_lora(components=["transformer"], adapter_names=adapters, lora_scale=1.0)

        apply = measure(device, partial(fuse, names[:3]))[0]
        if repeat == 0:
            fused = weights(pipe.transformer, samples)

        def switch() -> None:
            pipe.unfuse_lora(components=["transformer"])
            pipe.load_lora_weights(str(files[3]), adapter_name="D")
            fuse(["A", "B", "D"])

        switched = measure(device, switch)[0]
        unfuse = measure(device, partial(pipe.unfuse_lora, components=["transformer"]))[0]
        unload = measure(device, pipe.unload_lora_weights)[0]
        if repeat == 0:
            first = {"fuse_3": apply.wall, "switch_1_of_3": switched.wall, "unfuse": unfuse.wall}
            continue
        timings.add("load_3", loads[0] + loads[1] + loads[2])
        timings.add("set_adapters_and_fuse_3", apply)
        timings.add("load_and_fuse_3", loads[0] + loads[1] + loads[2] + apply)
        timings.add("switch_1_of_3", switched)
        timings.add("unfuse", unfuse)
        timings.add("unload", unload)
    after = weights(pipe.transformer, samples)
    return {
        **timings.summary(),
        "first_repeat_seconds": first,
        "lora_layers_injected": layers,
        "weights_after_unload_max_abs_diff": max_difference(before, after),
        "_fused": fused,
    }


# -- it/s -----------------------------------------------------------------------------------------


def step_inputs(
    transformer: FluxTransformer2DModel, resolution: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """One FLUX.1 [dev] step's inputs at `resolution` (2x2 patches of 8x latents: (r/16)^2
    image tokens), batch 1, T5's 512 tokens, distilled guidance 3.5."""
    config = transformer.config
    side = resolution // 16
    generator = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    inputs = {
        "hidden_states": torch.randn(1, side * side, config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(
            1, TEXT_TOKENS, config.joint_attention_dim, generator=generator
        ),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": image_ids.float(),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "guidance": torch.tensor([3.5]) if config.guidance_embeds else None,
    }
    ids = ("img_ids", "txt_ids")  # positions stay fp32
    return {
        k: None if v is None else v.to(device=device, dtype=torch.float32 if k in ids else dtype)
        for k, v in inputs.items()
    }


def steps_per_second(
    transformer: torch.nn.Module, inputs: dict[str, Any], steps: int, device: torch.device
) -> float:
    @torch.inference_mode()
    def run() -> None:
        for _ in range(steps):
            transformer(**inputs, return_dict=False)

    measure(device, lambda: transformer(**inputs, return_dict=False))  # warm-up
    return steps / measure(device, run)[0].wall


def bench_steps(
    pipe: FluxPipeline, files: list[Path], diffusers_files: list[Path], args: argparse.Namespace
) -> dict[str, float]:
    device, transformer = torch.device(args.device), pipe.transformer
    inputs = step_inputs(transformer, args.resolution, device, getattr(torch, args.dtype))
    out = {"base": steps_per_second(transformer, inputs, args.steps, device)}
    patcher = NetworkPatcher(pipe, Arch.FLUX1)
    patcher.apply([(read_network(p), s) for p, s in zip(files, STRENGTHS, strict=False)])
    out["native_3_applied"] = steps_per_second(transformer, inputs, args.steps, device)
    patcher.restore()
    patcher.release_memory()
    for name, path in zip("ABC", diffusers_files, strict=False):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(list("ABC"), adapter_weights=list(STRENGTHS))
    out["diffusers_3_unfused"] = steps_per_second(transformer, inputs, args.steps, device)
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    out["diffusers_3_fused"] = steps_per_second(transformer, inputs, args.steps, device)
    pipe.unfuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    return out


# -- the run --------------------------------------------------------------------------------------


_ROWS = (
    ("read 3 files / load_lora_weights x3", "load_3", "load_3"),
    ("apply 3 / set_adapters + fuse_lora", "apply_3", "set_adapters_and_fuse_3"),
    ("switch 1 of 3", "switch_1_of_3", "switch_1_of_3"),
    ("restore / unfuse_lora", "restore", "unfuse"),
    ("unload_lora_weights", None, "unload"),
)


def markdown_table(result: dict[str, Any]) -> str:
    ours, theirs = result["native"], result["diffusers"]

    def cell(side: dict[str, Any], name: str | None) -> str:
        return f"{side['seconds'][name] * 1000:.1f}" if name else "-"

    lines = ["| operation | native (ms) | diffusers (ms) |", "|---|---:|---:|"]
    lines += [f"| {label} | {cell(ours, a)} | {cell(theirs, b)} |" for label, a, b in _ROWS]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--width", type=int, default=64, help=f"64, 128, ... or {FULL_WIDTH}")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=0, help="transformer steps for it/s (0: none)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument(
        "--blocks",
        type=lambda text: tuple(int(n) for n in text.split(",")),
        default=(19, 38),
        help="double,single blocks (fewer: a smoke run of the full-width path on a CPU)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.rank > args.width:
        parser.error("--rank must be at most --width")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    diffusers.utils.logging.set_verbosity_error()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    started = time.perf_counter()
    pipe = build_pipe(args.width, args.blocks, device, dtype)
    build_seconds = time.perf_counter() - started
    targets = kohya_targets(pipe.transformer)
    samples = sample_paths(targets)
    with tempfile.TemporaryDirectory(prefix="flux_switch_") as work:
        files, diffusers_files = write_files(
            pipe.transformer, targets, args.rank, Path(work), peft=args.width != FULL_WIDTH
        )
        native = bench_native(pipe, files, args.repeats, device, samples)
        reference = bench_diffusers(pipe, diffusers_files, args.repeats, device, samples)
        steps = bench_steps(pipe, files, diffusers_files, args) if args.steps else None
        file_mb = files[0].stat().st_size / 2**20
    result = {
        "environment": environment("bench.flux_switch"),
        "settings": {
            "device": args.device,
            "dtype": args.dtype,
            "width": args.width,
            "depth": f"{args.blocks[0]} double + {args.blocks[1]} single blocks",
            "rank": args.rank,
            "repeats": args.repeats,
            "threads": args.threads,
            "strengths": STRENGTHS,
            "diffusers_input": "kohya files" if args.width == FULL_WIDTH else "PEFT twins",
        },
        "model": {
            "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
            "build_seconds": build_seconds,
        },
        "lora": {"kohya_modules_per_file": len(targets), "file_mb": file_mb},
        "native": {k: v for k, v in native.items() if not k.startswith("_")},
        "diffusers": {k: v for k, v in reference.items() if not k.startswith("_")},
        "native_vs_diffusers_fused_max_abs_diff": max_difference(
            native["_patched"], reference["_fused"]
        ),
        "ratios": {
            "diffusers_fuse_3_over_native_apply_3": reference["seconds"]["set_adapters_and_fuse_3"]
            / native["seconds"]["apply_3"],
            "diffusers_switch_over_native_switch": reference["seconds"]["switch_1_of_3"]
            / native["seconds"]["switch_1_of_3"],
            "native_switch_per_module_us": native["seconds"]["switch_1_of_3"]
            / max(native["model_modules_written"], 1)
            * 1e6,
        },
        "steps_per_second": steps,
        "peak_rss_gb": peak_rss_gb(),
        "seconds_total": time.perf_counter() - started,
    }
    write_result(result, args.out)
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
