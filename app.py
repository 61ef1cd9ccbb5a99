"""Command line: `python app.py` serves the UI; `python app.py generate ...` renders headless."""

from __future__ import annotations

import os

# Nothing in this app may reach a model hub: configs and tokenizers ship in configs/.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from webui.settings import DeviceChoice, DtypeChoice, Fp8Storage, LoraBackend, Settings

if TYPE_CHECKING:
    import torch
    from fastapi import FastAPI

    from webui.api.auth import Credential
    from webui.engine.generate import Engine, Progress
    from webui.networks.format import ModelCheck, Network

log = logging.getLogger("app")


def _common_options(parser: argparse.ArgumentParser, *, in_subcommand: bool = False) -> None:
    # in a subcommand, unset options must not overwrite the values given before it
    default = argparse.SUPPRESS if in_subcommand else None
    parser.add_argument(
        "--models-dir", type=Path, default=default, help="folder of checkpoints (default: models/)"
    )
    parser.add_argument(
        "--loras-dir", type=Path, default=default, help="folder of LoRA files (default: loras/)"
    )
    parser.add_argument(
        "--embeddings-dir",
        type=Path,
        default=default,
        help="folder of textual-inversion embeddings (default: embeddings/)",
    )
    parser.add_argument(
        "--device", choices=[c.value for c in DeviceChoice], default=default or "auto"
    )
    parser.add_argument(
        "--dtype",
        choices=[c.value for c in DtypeChoice],
        default=default or "auto",
        help="weights precision (auto: fp16 on a GPU, fp32 on the CPU)",
    )
    parser.add_argument(
        "--lowvram",
        action="store_true",
        default=default or False,
        help="keep models on the CPU until each part runs (accelerate offload), and give back"
        " the memory of patched weights as soon as LoRAs are off",
    )
    parser.add_argument(
        "--outputs-dir",
        type=Path,
        default=default,
        help="folder the UI saves images to (default: outputs/)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default,
        help="folder of the LoRA index and hash caches (default: .cache/)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=default or False,
        help="log everything: access log, library warnings and progress bars",
    )
    parser.add_argument(
        "--lora-backend",
        choices=[c.value for c in LoraBackend],
        default=default or "auto",
        help="apply LoRAs natively, through diffusers/PEFT, or per LoRA (auto: native where it "
        "maps every module, diffusers for what it cannot)",
    )
    parser.add_argument(
        "--fp8-storage",
        choices=[c.value for c in Fp8Storage],
        default=default or "auto",
        help="keep a FLUX.1 transformer's fp8 weights fp8 in memory, upcast per layer as it runs "
        "(auto: on a GPU; off on the CPU, where upcasting once at load is faster)",
    )


def _credentials(text: str) -> tuple[Credential, ...]:
    from webui.api.auth import parse_credentials

    try:
        return parse_credentials(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="LoRA WebUI for Stable Diffusion",
        allow_abbrev=False,  # `merge --lora` must not read as a prefix of --lora-backend
    )
    _common_options(parser)
    parser.add_argument(
        "--listen", action="store_true", help="serve on all interfaces, not just 127.0.0.1"
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--settings-file",
        type=Path,
        default=None,
        help="where the Settings tab's options and the last model are saved (default: config.json)",
    )
    parser.add_argument(
        "--auth",
        type=_credentials,
        default=(),
        metavar="USER:PASS[,USER2:PASS2]",
        help="log-in for the UI (and for the API when --api-auth is not given)",
    )
    parser.add_argument(
        "--api-auth",
        type=_credentials,
        default=(),
        metavar="USER:PASS[,USER2:PASS2]",
        help="HTTP basic credentials for /sdapi/v1",
    )
    sub = parser.add_subparsers(dest="command")

    gen = sub.add_parser("generate", help="render images without the UI")
    _common_options(gen, in_subcommand=True)
    gen.add_argument(
        "--model", required=True, help="checkpoint file or diffusers folder, or 'demo'"
    )
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative", default="")
    gen.add_argument("--steps", type=int, help="default: the model's (20; FLUX.1 schnell 4)")
    gen.add_argument(
        "--cfg", type=float, help="CFG scale; default: the model's (7; FLUX.1 1 = no true CFG)"
    )
    gen.add_argument(
        "--distilled-cfg", type=float, default=3.5, help="FLUX.1 dev's distilled CFG scale"
    )
    gen.add_argument("--seed", type=int, default=-1)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--sampler", default="", help="default: the model's (Euler a; FLUX.1 Euler)")
    gen.add_argument("--batch-size", type=int, default=1)
    gen.add_argument("--batch-count", type=int, default=1)
    gen.add_argument("--clip-skip", type=int, default=1)
    gen.add_argument(
        "--out",
        type=Path,
        required=True,
        help="PNG path; batches write FILE-1.png, FILE-2.png, ...",
    )

    inspect = sub.add_parser("inspect-lora", help="show what a LoRA file holds")
    _common_options(inspect, in_subcommand=True)
    inspect.add_argument("file", type=Path, help="LoRA file (.safetensors, .pt, .ckpt, ...)")
    inspect.add_argument(
        "--model", type=Path, help="also check it against this checkpoint (loaded on the CPU)"
    )
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    merge = sub.add_parser("merge", help="bake LoRAs into a checkpoint (on the CPU)")
    _common_options(merge, in_subcommand=True)
    merge.add_argument("--model", type=Path, required=True, help="checkpoint file or folder")
    merge.add_argument(
        "--lora",
        dest="loras",
        action="append",
        required=True,
        metavar="FILE:WEIGHT",
        help="LoRA file and strength (default 1); repeat for several",
    )
    merge.add_argument(
        "--out",
        type=Path,
        required=True,
        help=".safetensors for a single-file input, a new folder for a diffusers one",
    )
    _extract_parser(sub)
    _serve_cluster_parser(sub)
    return parser


def _serve_cluster_parser(sub: argparse._SubParsersAction) -> None:
    cluster = sub.add_parser(
        "serve-cluster",
        help="serve the UI and API over generation replicas on a Ray cluster (needs "
        "requirements-serve.txt)",
        description="see docs/scale-out.md",
    )
    _common_options(cluster, in_subcommand=True)
    cluster.add_argument("--port", type=int, default=argparse.SUPPRESS)
    cluster.add_argument("--listen", action="store_true", default=argparse.SUPPRESS)
    cluster.add_argument(
        "--ray-address",
        default=None,
        help="existing cluster (ray start --head, KubeRay); default: a local Ray on 127.0.0.1",
    )
    cluster.add_argument("--ray-temp-dir", default=None, help="a local Ray's session folder")
    cluster.add_argument("--replicas", type=int, default=2, help="generation replicas")
    cluster.add_argument(
        "--gpus-per-replica",
        type=float,
        default=None,
        help="GPU share per replica (default: 1 when the device is a GPU, else 0)",
    )
    cluster.add_argument(
        "--router", choices=["lora", "default"], default="lora", help="LoRA-aware or Ray's own"
    )
    cluster.add_argument(
        "--attach",
        action="store_true",
        help="the replicas were deployed with `serve deploy`: serve only the front",
    )


def _extract_parser(sub: argparse._SubParsersAction) -> None:
    extract = sub.add_parser(
        "extract",
        help="extract one LoRA from a LoRA combination or from two checkpoints",
        description="SVD on the GPU when present (--device); --dtype is the saved factors' "
        "precision (default fp32)",
    )
    _common_options(extract, in_subcommand=True)
    extract.add_argument("--model", type=Path, required=True, help="base checkpoint")
    source = extract.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--lora",
        dest="loras",
        action="append",
        metavar="FILE:WEIGHT",
        help="LoRA file and strength (default 1) of the combination; repeat for several",
    )
    source.add_argument(
        "--tuned", type=Path, help="fine-tuned checkpoint: extract its difference to --model"
    )
    size = extract.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of every module")
    size.add_argument(
        "--energy",
        type=float,
        help="per module, the smallest rank keeping this fraction of the squared singular values",
    )
    extract.add_argument("--max-rank", type=int, help="cap on the rank chosen by --energy")
    extract.add_argument(
        "--out", type=Path, required=True, help="LoRA file to write (.safetensors)"
    )


def settings_from(args: argparse.Namespace, **overrides: object) -> Settings:
    defaults = Settings()
    return Settings(
        models_dir=(args.models_dir or defaults.models_dir).resolve(),
        loras_dir=(args.loras_dir or defaults.loras_dir).resolve(),
        outputs_dir=(args.outputs_dir or defaults.outputs_dir).resolve(),
        cache_dir=(args.cache_dir or defaults.cache_dir).resolve(),
        settings_file=(getattr(args, "settings_file", None) or defaults.settings_file).resolve(),
        embeddings_dir=(getattr(args, "embeddings_dir", None) or defaults.embeddings_dir).resolve(),
        device=DeviceChoice(args.device),
        dtype=DtypeChoice(args.dtype),
        lowvram=args.lowvram,
        fp8_storage=Fp8Storage(args.fp8_storage),
        lora_backend=LoraBackend(args.lora_backend),
        listen=getattr(args, "listen", False),
        port=getattr(args, "port", 7860),
        **overrides,  # type: ignore[arg-type]
    )


def output_paths(out: Path, count: int) -> list[Path]:
    """FILE.png for one image; FILE-1.png, FILE-2.png, ... for several."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(1, count + 1)]


def run_generate(args: argparse.Namespace) -> int:
    from webui.engine.checkpoints import CheckpointError
    from webui.engine.generate import (
        DEMO_MODEL_NAME,
        Engine,
        GenerationRequest,
        RequestError,
    )
    from webui.engine.infotext import save_png
    from webui.engine.recipes import recipe_for

    quiet_progress_bars(args.verbose)
    engine = Engine(settings_from(args, save_outputs=False))
    try:
        model = (
            engine.load(DEMO_MODEL_NAME)
            if args.model == "demo"
            else engine.load_path(Path(args.model))
        )
        size = model.kind.default_size
        defaults = recipe_for(model.kind).defaults
        request = GenerationRequest(
            prompt=args.prompt,
            negative_prompt=args.negative,
            steps=defaults.steps if args.steps is None else args.steps,
            cfg_scale=defaults.cfg_scale if args.cfg is None else args.cfg,
            distilled_cfg_scale=args.distilled_cfg,
            seed=args.seed,
            width=args.width or size,
            height=args.height or size,
            sampler=args.sampler,
            batch_size=args.batch_size,
            batch_count=args.batch_count,
            clip_skip=args.clip_skip,
        )

        def report(p: Progress) -> None:
            # padded: a shorter line (the steps) overwrites a longer one (the LoRA modules)
            print(f"\r{p.description:<40}", end="", file=sys.stderr, flush=True)

        result = engine.generate(request, on_progress=report)
        print(file=sys.stderr)
        log.info("generated %d image(s) in %.1f s", len(result.images), result.seconds)
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    except (CheckpointError, RequestError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = output_paths(args.out, len(result.images))
    for image, path in zip(result.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image.image, path, image.infotext)
        print(path)
    return 0


def _cpu_dtype(args: argparse.Namespace) -> torch.dtype:
    """--dtype for CPU work: fp32 unless asked otherwise."""
    choice = DtypeChoice(args.dtype)
    return Settings(dtype=DtypeChoice.FP32 if choice is DtypeChoice.AUTO else choice).torch_dtype()


def run_inspect_lora(args: argparse.Namespace) -> int:
    from webui.networks.format import (
        NetworkFileError,
        NotALoraError,
        format_text,
        inspect_network,
        load_network,
        refuse_checkpoint,
    )

    errors: tuple[type[Exception], ...] = (NetworkFileError, NotALoraError, FileNotFoundError)
    if args.model is not None:  # the engine (and diffusers) only when a model is given
        from webui.engine.checkpoints import CheckpointError

        errors += (CheckpointError,)
    try:
        if not args.file.is_file():
            raise FileNotFoundError(f"{args.file}: no such LoRA file")
        refuse_checkpoint(args.file)
        network = load_network(args.file)
        inspection = inspect_network(network)
        if args.model is not None:
            inspection = dataclasses.replace(
                inspection, model_check=_model_check(network, args.model, _cpu_dtype(args))
            )
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(inspection.to_json() if args.json else format_text(inspection))
    return 0


def _model_check(network: Network, model_path: Path, dtype: torch.dtype) -> ModelCheck:
    import torch

    from webui.engine.checkpoints import checkpoint_from_path, load_checkpoint
    from webui.networks.apply import NetworkPatcher, model_check

    model = load_checkpoint(checkpoint_from_path(model_path), torch.device("cpu"), dtype)
    report = NetworkPatcher(model.pipe, model.kind.arch).plan([network])  # writes nothing
    return model_check(report.networks[0], model.name, model.kind.arch)


def parse_lora_arg(value: str) -> tuple[Path, float]:
    """FILE:WEIGHT (weight 1 when absent); the last ':' splits, so Windows drives work."""
    path, sep, weight = value.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass  # a ':' inside the path, no weight
    return Path(value), 1.0


def run_merge(args: argparse.Namespace) -> int:
    from webui.engine.checkpoints import CheckpointError
    from webui.engine.merge import MergeError, merge_checkpoint
    from webui.networks.format import NetworkFileError

    loras = [parse_lora_arg(value) for value in args.loras]
    try:
        for path, _ in loras:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such LoRA file")
        result = merge_checkpoint(
            args.model,
            loras,
            args.out,
            None if args.dtype == DtypeChoice.AUTO else _cpu_dtype(args),  # auto: the input's
            progress=lambda step: print(step.what, file=sys.stderr, flush=True),
        )
    except (MergeError, CheckpointError, NetworkFileError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"merged {len(result.loras)} LoRA(s) into {result.kind.label} "
        f"({result.modules_changed} modules changed, {result.seconds:.1f} s)"
    )
    for lora in result.loras:
        print(f"  {lora.name} ×{lora.weight:g}: {len(lora.report.matched)} modules matched")
        for warning in lora.report.warnings:
            print(f"    warning: {warning}")
    for note in result.notes:
        print(f"  note: {note}")
    print(result.out)
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from webui.networks.apply import RankRule

    try:  # bad arguments are told before the (slow) engine import
        rule = RankRule(rank=args.rank, energy=args.energy, max_rank=args.max_rank)
        device = Settings(device=DeviceChoice(args.device)).torch_device()
    except (ValueError, RuntimeError) as exc:  # RuntimeError: --device cuda without a GPU
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from webui.engine.checkpoints import CheckpointError
    from webui.engine.extract import (
        ExtractionError,
        extract_combination,
        extract_difference,
        load_combination,
    )
    from webui.networks.format import NetworkFileError

    def report(step: Progress) -> None:
        print(f"[{step.step}/{step.total}] {step.what}", file=sys.stderr, flush=True)

    options = {"device": device, "dtype": _cpu_dtype(args), "progress": report}
    try:
        if args.tuned is not None:
            result = extract_difference(args.model, args.tuned, args.out, rule, **options)
        else:
            loras = [parse_lora_arg(value) for value in args.loras]
            for path, _ in loras:
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: no such LoRA file")
            parts = load_combination(loras)
            result = extract_combination(args.model, parts, args.out, rule, **options)
    except (ExtractionError, CheckpointError, NetworkFileError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    low, high = result.ranks
    worst = result.worst
    print(
        f"extracted {len(result.modules)} modules of {result.kind.label} ({result.rule.describe()}, "
        f"ranks {low}-{high}) in {result.seconds:.1f} s\n"
        f"  relative error: overall {result.overall_error:.3g}, mean {result.mean_error:.3g}, "
        f"worst {worst.relative_error:.3g} ({worst.name})\n"
        f"  size: {result.file_bytes / 2**20:.1f} MiB (deltas stored whole: "
        f"{result.dense_bytes / 2**20:.1f} MiB; sources: {result.source_bytes / 2**20:.1f} MiB)"
    )
    for warning in result.warnings:
        print(f"  warning: {warning}")
    print(result.out)
    return 0


def server_app(args: argparse.Namespace) -> tuple[Engine, FastAPI]:
    """What `python app.py` serves: an engine over the saved settings and the app over it (the
    browser tests serve the same in-process)."""
    from webui.engine.generate import Engine
    from webui.server import Access, build_app
    from webui.settings import SettingsFile

    start = settings_from(args)
    saved = SettingsFile(start.settings_file)
    settings = saved.apply(start)  # the Settings tab's options, as last saved
    engine = Engine(settings, saved)
    if not engine.checkpoints():
        log.warning(
            "no checkpoint in %s: offering the demo model (random weights)", settings.models_dir
        )
    access = Access(ui=args.auth, api=args.api_auth)
    if settings.listen and not access.ui:
        log.warning("--listen without --auth: anyone on the network can use the UI")
    if settings.listen and not access.api_credentials:
        log.warning("--listen without --auth/--api-auth: anyone on the network can use the API")
    return engine, build_app(engine, access)


def run_server(args: argparse.Namespace) -> int:
    import threading

    from webui.server import serve

    quiet_progress_bars(args.verbose)
    engine, served = server_app(args)
    # warm the default model while the page loads; errors surface on first use
    threading.Thread(target=load_default_quietly, args=(engine,), daemon=True).start()
    serve(served, engine.settings.host, engine.settings.port, verbose=args.verbose)
    return 0


def run_serve_cluster(args: argparse.Namespace) -> int:
    try:
        from webui.cluster.deployment import ReplicaPlan, RouterChoice
        from webui.cluster.front import ClusterOptions, serve_cluster
    except ImportError as exc:
        print(f"error: {exc}; install Ray with: pip install -r requirements-serve.txt",
              file=sys.stderr)  # fmt: skip
        return 2
    from webui.server import Access

    quiet_progress_bars(args.verbose)
    settings = settings_from(args)
    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if settings.torch_device().type == "cuda" else 0.0
    plan = ReplicaPlan(replicas=args.replicas, gpus=gpus, router=RouterChoice(args.router))
    options = ClusterOptions(
        address=args.ray_address, plan=plan, attach=args.attach, temp_dir=args.ray_temp_dir
    )
    serve_cluster(settings, options, Access(ui=args.auth, api=args.api_auth), args.verbose)
    return 0


def load_default_quietly(engine: Engine) -> None:
    """Load the default model, logging (not raising) a failure: run on a thread at start."""
    try:
        engine.load_default()
    except Exception as exc:  # the UI reports it again when the user generates
        log.warning("could not load the default model: %s", exc)


def setup_logging(verbose: bool) -> None:
    """Quiet by default: our own INFO lines (model loaded, images made) and everyone's
    warnings; `--verbose` shows the libraries' INFO, warnings and progress bars too."""
    import warnings

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        force=True,
    )
    for ours in ("app", "webui"):
        logging.getLogger(ours).setLevel(logging.INFO)
    if verbose:
        return
    # Python warnings (torchvision's, deprecations): seen only with --verbose
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TQDM_DISABLE", "1")  # bars drawn with tqdm's defaults
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def quiet_progress_bars(verbose: bool) -> None:
    """No diffusers/transformers progress bars (loading, downloads) unless `verbose`; imported
    only by the commands that load models, so `inspect-lora` stays quick."""
    if verbose:
        return
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "generate":
        return run_generate(args)
    if args.command == "inspect-lora":
        return run_inspect_lora(args)
    if args.command == "merge":
        return run_merge(args)
    if args.command == "extract":
        return run_extract(args)
    if args.command == "serve-cluster":
        return run_serve_cluster(args)
    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
