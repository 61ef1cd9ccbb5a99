"""Checkpoints in `models/`: find them, tell their architecture from their keys, load them offline
with the matching `configs/` folder, and write pipelines back as single files.

The only module that reads model files."""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from webui.arch import Arch, FluxVariant, Prediction
from webui.engine.fp8_storage import FP8_DTYPES, fp8_stored, keep_fp8
from webui.engine.model_factory import FLUX_COMPONENTS, config_folder, flux_pipeline
from webui.engine.samplers import ZERO_SNR, build_scheduler, zero_snr_config
from webui.families.flux1 import model as flux1
from webui.layouts import flux as flux_layout
from webui.layouts.single_file import to_single_file
from webui.layouts.text_encoders import with_text_model_prefix
from webui.layouts.vae import vae_module_name, vae_to_ldm
from webui.networks.format import NetworkFileError, write_safetensors
from webui.networks.format import read_header as read_safetensors_header

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Files we write carry their own component configs here, so models whose sizes differ from the
# reference configs (the tiny demo and test models) load through the same path as a user's file.
CONFIGS_METADATA_KEY = "lora_webui.component_configs"

_UNET = "model.diffusion_model."
_SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
_SDXL_TEXT_1 = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
_SDXL_TEXT_2 = "conditioner.embedders.1.model.token_embedding.weight"
_SDXL_REFINER_TEXT = "conditioner.embedders.0.model.token_embedding.weight"
_LORA_MARKERS = ("lora_unet_", "lora_te", "lora_down", "lora_A", "hada_", "lokr_")
# Empty marker tensors SDXL v-prediction fine-tunes carry (NoobAI-XL V-Pred); ComfyUI and Forge
# read them, diffusers' single-file loader does not.
V_PRED_KEY = "v_pred"
ZERO_SNR_KEY = "ztsnr"
# modelspec.prediction_type values seen in the wild (SAI spec "v"/"epsilon", sd-scripts, trainers)
_V_NAMES = frozenset({"v", "v_prediction", "v-prediction", "v_pred", "vpred", "velocity"})
_EPSILON_NAMES = frozenset({"epsilon", "eps", "noise"})
_UNSUPPORTED_NAMES = frozenset({"sample", "x0", "flow", "flow_matching", "edm"})


class CheckpointError(Exception):
    """A model file that cannot be used; the message names the file and what is wrong."""


class CheckpointFormat(StrEnum):
    SAFETENSORS = "safetensors"
    CKPT = "ckpt"
    DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class CheckpointFile:
    """A model found in `models/`: a single file or a diffusers folder."""

    path: Path
    name: str  # path below models/ without extension, as A1111 shows it
    format: CheckpointFormat
    # what the file declares (marker keys, metadata, a .yaml beside it); None: unknown until loaded
    prediction: Prediction | None = field(default=None, compare=False)
    zero_snr: bool = field(default=False, compare=False)

    @property
    def title(self) -> str:
        return self.name

    @property
    def prediction_label(self) -> str:
        """ "v-pred" for a file declared v-prediction (the model picker shows it), else ""."""
        return "v-pred" if self.prediction is Prediction.V else ""

    @property
    def picker_label(self) -> str:
        """The model picker's label: the name, with the prediction label when there is one."""
        return f"{self.name} ({self.prediction_label})" if self.prediction_label else self.name


@dataclass(frozen=True)
class ModelKind:
    """Architecture, prediction type (None when the file does not say) and whether the model was
    trained on a zero-terminal-SNR schedule."""

    arch: Arch
    prediction: Prediction | None
    zero_snr: bool = False
    variant: FluxVariant | None = None  # FLUX.1 only: dev or schnell

    @property
    def label(self) -> str:
        if self.variant is not None:
            return f"{self.arch.value} {self.variant.value}"
        if self.prediction is not Prediction.V:
            return self.arch.value
        return "SD2-v" if self.arch is Arch.SD2 else f"{self.arch.value} v-pred"

    @property
    def default_size(self) -> int:
        """The resolution the architecture was trained at."""
        if self.arch is Arch.FLUX1:
            return flux1.DEFAULT_SIZE
        if self.arch is Arch.SDXL:
            return 1024
        return 768 if self.arch is Arch.SD2 and self.prediction is Prediction.V else 512


@dataclass(frozen=True)
class CheckpointHeader:
    """Tensor shapes and metadata of a single-file checkpoint, read without loading weights."""

    shapes: Mapping[str, tuple[int, ...]]
    metadata: Mapping[str, str]


@dataclass
class LoadedModel:
    """A pipeline in memory and what it was loaded from."""

    pipe: DiffusionPipeline
    kind: ModelKind
    name: str
    path: Path | None  # None for the demo model
    device: torch.device
    dtype: torch.dtype
    # components read from separate files (FLUX.1 parts), by diffusers component name
    parts: Mapping[str, Path] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        """The precision the user is told: the compute dtype, and "fp8 weights" when a FLUX.1
        transformer keeps its fp8 weights (`fp8_storage`)."""
        dtype = str(self.dtype).removeprefix("torch.")
        kept = fp8_stored(getattr(self.pipe, "transformer", None))
        return f"{dtype}, fp8 weights" if kept else dtype


def find_checkpoints(models_dir: Path) -> list[CheckpointFile]:
    """Every single-file checkpoint and diffusers folder below `models_dir`, sorted by name."""
    if not models_dir.is_dir():
        return []
    found: list[CheckpointFile] = []
    diffusers_dirs = sorted(p.parent for p in models_dir.rglob("model_index.json"))
    for folder in diffusers_dirs:
        name = folder.relative_to(models_dir).as_posix()
        found.append(_listed(folder, name, CheckpointFormat.DIFFUSERS))
    parts = [models_dir / folder for folder in flux1.PART_FOLDERS]
    for path in sorted(models_dir.rglob("*")):
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES or not path.is_file():
            continue
        if any(folder in path.parents for folder in parts):
            continue  # text encoders and VAEs downloaded alone are parts, not checkpoints
        if any(folder in path.parents for folder in diffusers_dirs):
            continue  # weights inside a diffusers folder belong to that folder
        name = path.relative_to(models_dir).with_suffix("").as_posix()
        fmt = (
            CheckpointFormat.SAFETENSORS
            if path.suffix.lower() == ".safetensors"
            else CheckpointFormat.CKPT
        )
        found.append(_listed(path, name, fmt))
    return sorted(found, key=lambda c: c.name.lower())


def _listed(path: Path, name: str, fmt: CheckpointFormat) -> CheckpointFile:
    prediction, zero_snr = _declared_in_file(path, fmt)
    return CheckpointFile(path, name, fmt, prediction, zero_snr)


def checkpoint_from_path(path: Path) -> CheckpointFile:
    """A checkpoint given by path (the CLI's --model), checked to be a file or folder we read."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(
                f"{path} is a folder without model_index.json, so not a diffusers model"
            )
        return CheckpointFile(path, path.name, CheckpointFormat.DIFFUSERS)
    suffix = path.suffix.lower()
    if suffix not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{path.name}: checkpoints must be .safetensors or .ckpt files")
    fmt = CheckpointFormat.SAFETENSORS if suffix == ".safetensors" else CheckpointFormat.CKPT
    return CheckpointFile(path, path.stem, fmt)


def read_header(path: Path) -> CheckpointHeader:
    """Shapes and metadata of a `.safetensors` (header only) or `.ckpt` (weights_only load)."""
    try:
        if path.suffix.lower() == ".safetensors":
            header = read_safetensors_header(path)  # the one header reader (offsets checked)
            shapes = {key: info.shape for key, info in header.tensors.items()}
            return CheckpointHeader(shapes, dict(header.metadata))
        state = _load_ckpt(path)
        return CheckpointHeader({k: tuple(v.shape) for k, v in state.items()}, {})
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors and torch raise many types for corrupt files
        raise CheckpointError(f"{path.name}: cannot be read as a checkpoint ({exc})") from exc


def _load_ckpt(path: Path) -> dict[str, torch.Tensor]:
    # weights_only refuses pickled code, so a hostile .ckpt cannot run anything.
    state: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name}: not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def detect_kind(header: CheckpointHeader, source: str = "checkpoint") -> ModelKind:
    """Architecture from the file's keys and shapes; prediction type from metadata when given.
    Raises CheckpointError, naming `source`, for files that are not SD1/SD2/SDXL/FLUX.1
    checkpoints."""
    keys = header.shapes.keys()
    flux = flux_transformer(header)
    if flux is not None:
        return ModelKind(Arch.FLUX1, None, variant=flux.variant)
    if not any(key.startswith(_UNET) for key in keys):
        if any(marker in key for key in keys for marker in _LORA_MARKERS):
            raise CheckpointError(
                f"{source} is a LoRA, not a checkpoint: put it in the loras folder and use it "
                "with a <lora:name:1> tag"
            )
        raise CheckpointError(
            f"{source} is not a Stable Diffusion checkpoint: it has no UNet weights "
            f"({_UNET}*); {len(keys)} tensors found"
        )
    in_channels = header.shapes.get(_UNET + "input_blocks.0.0.weight", (0, 4))[1]
    if in_channels != 4:
        raise CheckpointError(
            f"{source} has a UNet with {in_channels} input channels (an inpainting or "
            "instruct model); only text-to-image checkpoints with 4 channels are supported"
        )
    if _SDXL_TEXT_1 in keys and _SDXL_TEXT_2 in keys:
        arch = Arch.SDXL
    elif _SDXL_REFINER_TEXT in keys:
        raise CheckpointError(f"{source} is an SDXL refiner, which is not supported")
    elif _SD2_TEXT in keys:
        arch = Arch.SD2
    elif _SD1_TEXT in keys or any(k.startswith("cond_stage_model.transformer.") for k in keys):
        arch = Arch.SD1
    else:
        raise CheckpointError(
            f"{source} has a UNet but no text encoder this app knows (SD1 CLIP-L, SD2 OpenCLIP-H, "
            "SDXL CLIP-L + OpenCLIP-bigG)"
        )
    prediction, zero_snr = declared_prediction(keys, header.metadata, source)
    return ModelKind(arch, prediction, zero_snr)


def declared_prediction(
    keys: Collection[str], metadata: Mapping[str, str], source: str = "checkpoint"
) -> tuple[Prediction | None, bool]:
    """What a file says it predicts, and whether it was trained zero-terminal-SNR: the `v_pred`
    and `ztsnr` marker keys (ComfyUI's and Forge's convention) first, then modelspec metadata.
    The prediction is None when neither says. Raises CheckpointError for prediction types we
    cannot sample (x0, flow)."""
    zero_snr = ZERO_SNR_KEY in keys
    from_metadata = _prediction_from_metadata(metadata, source)
    if V_PRED_KEY in keys:
        if from_metadata is Prediction.EPSILON:
            log.warning("%s: has a v_pred key but metadata says epsilon; using v", source)
        return Prediction.V, zero_snr
    return from_metadata, zero_snr


def _prediction_from_metadata(metadata: Mapping[str, str], source: str) -> Prediction | None:
    declared = metadata.get("modelspec.prediction_type", "").strip().lower()
    if declared in _V_NAMES:
        return Prediction.V
    if declared in _EPSILON_NAMES:
        return Prediction.EPSILON
    if declared in _UNSUPPORTED_NAMES:
        raise CheckpointError(
            f"{source} declares modelspec.prediction_type {declared!r}; only epsilon and v "
            "prediction models are supported"
        )
    if declared:
        log.warning("%s: unknown modelspec.prediction_type %r, ignored", source, declared)
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.startswith("stable-diffusion-v2"):
        return (
            Prediction.V
            if "-v" in architecture.removeprefix("stable-diffusion-v2")
            else Prediction.EPSILON
        )
    return None


_PARAMETERIZATION = re.compile(r"^\s*parameterization\s*:\s*[\"']?(\w+)", re.MULTILINE)


def _prediction_from_sidecar(path: Path) -> Prediction | None:
    """A1111's convention: `model.yaml` beside the file, with `parameterization: "v"` (an LDM
    config without it is epsilon); None when there is no such file."""
    for sidecar in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if sidecar.is_file():
            text = sidecar.read_text(encoding="utf-8", errors="replace")
            match = _PARAMETERIZATION.search(text)
            return Prediction.V if match and match.group(1) == "v" else Prediction.EPSILON
    return None


def _declared_in_file(path: Path, fmt: CheckpointFormat) -> tuple[Prediction | None, bool]:
    """For the checkpoint list: a .yaml beside the file, else the safetensors header's markers
    and metadata, else a diffusers folder's scheduler config; (None, False) when unknown or
    unreadable (loading reports the problem)."""
    try:
        if fmt is CheckpointFormat.DIFFUSERS:
            config = json.loads((path / "scheduler" / "scheduler_config.json").read_text("utf-8"))
            return Prediction(config.get("prediction_type", "epsilon")), bool(config.get(ZERO_SNR))
        sidecar = _prediction_from_sidecar(path)
        if fmt is not CheckpointFormat.SAFETENSORS:
            return sidecar, False  # a .ckpt's keys cost a full unpickling: left to loading
        stat = path.stat()
        prediction, zero_snr = _declared_in_header(path, stat.st_size, stat.st_mtime_ns)
        return sidecar or prediction, zero_snr
    except (
        OSError,
        ValueError,
        CheckpointError,
        NetworkFileError,
        safetensors.SafetensorError,
    ) as exc:
        log.debug("%s: prediction not readable for the list (%s)", path.name, exc)
        return None, False


@functools.lru_cache(maxsize=256)
def _declared_in_header(path: Path, size: int, mtime_ns: int) -> tuple[Prediction | None, bool]:
    # keyed by size and mtime too: a file replaced in place is read again
    header = read_safetensors_header(path)
    return declared_prediction(set(header.tensors), header.metadata, path.name)


@torch.no_grad()
def probe_v_prediction(pipe: DiffusionPipeline) -> Prediction:
    """Guess epsilon vs v for an SD2 UNet that nothing declares: at the last timestep an epsilon
    model returns roughly its input (pure noise in, noise out), a v model strongly departs from
    it. The same test A1111 relies on."""
    unet = pipe.unet
    param = next(unet.parameters())
    size = 8
    sample = torch.full(
        (1, unet.config.in_channels, size, size), 0.5, dtype=param.dtype, device=param.device
    )
    context = torch.zeros(
        1, 77, unet.config.cross_attention_dim, dtype=param.dtype, device=param.device
    )
    timestep = torch.tensor([999], device=param.device)
    out = unet(sample, timestep, encoder_hidden_states=context).sample
    return Prediction.V if float((out - sample).mean()) < -1.0 else Prediction.EPSILON


def _component_configs(pipe: DiffusionPipeline) -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {}
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        component = getattr(pipe, name, None)
        if component is None:
            continue
        config = component.config
        configs[name] = (
            json.loads(config.to_json_string())
            if hasattr(config, "to_json_string")
            else dict(config)
        )
    configs["scheduler"] = dict(pipe.scheduler.config)
    return configs


# Embedded configs are a few kB per component; anything far larger is not ours.
MAX_EMBEDDED_CONFIGS_BYTES = 1024 * 1024
_config_root_lock = threading.Lock()
_config_root: Path | None = None


def _private_config_root() -> Path:
    """This process's own folder for config copies: mkdtemp makes it 0700 under an unpredictable
    name, so no other user can plant or swap a config there; removed at exit."""
    global _config_root
    with _config_root_lock:
        if _config_root is None or not _config_root.is_dir():
            _config_root = Path(tempfile.mkdtemp(prefix="lora-webui-configs-"))
            atexit.register(shutil.rmtree, _config_root, ignore_errors=True)
        return _config_root


def component_names(base: Path) -> frozenset[str]:
    """The pipeline's components, as the reference config's `model_index.json` names them
    (entries with a library and class; `[null, null]` ones such as safety_checker are absent)."""
    index = json.loads((base / "model_index.json").read_text(encoding="utf-8"))
    return frozenset(
        name
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and all(isinstance(part, str) for part in value)
    )


def embedded_configs(raw: str, allowed: frozenset[str], source: str) -> dict[str, dict[str, Any]]:
    """Parse a file's `lora_webui.component_configs` metadata, which is untrusted: a JSON object
    of JSON objects, keyed by component names in `allowed` only (a key is a folder name, so
    anything else could point outside the config folder). Raises CheckpointError naming
    `source`."""
    problem = f"{source}: metadata {CONFIGS_METADATA_KEY}"
    if len(raw) > MAX_EMBEDDED_CONFIGS_BYTES:
        raise CheckpointError(
            f"{problem} is {len(raw)} bytes, over the {MAX_EMBEDDED_CONFIGS_BYTES} allowed"
        )
    try:
        configs = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON, huge ints, deep nesting
        raise CheckpointError(f"{problem} is not valid JSON ({exc})") from exc
    if not isinstance(configs, dict) or not all(isinstance(v, dict) for v in configs.values()):
        raise CheckpointError(f"{problem} must be a JSON object of JSON objects")
    unknown = sorted(set(configs) - allowed)
    if unknown:
        raise CheckpointError(
            f"{problem} names unknown components {unknown!r}; expected some of {sorted(allowed)}"
        )
    return configs


def _config_folder_for(kind: ModelKind, metadata: Mapping[str, str], source: str) -> Path:
    """`configs/<arch>`, or for files carrying their own component configs, a copy of it with
    those configs written in (cached by content in this process's private folder)."""
    base = config_folder(kind.arch)
    embedded = metadata.get(CONFIGS_METADATA_KEY)
    if not embedded:
        return base
    configs = embedded_configs(embedded, component_names(base), source)
    digest = hashlib.sha256(embedded.encode()).hexdigest()[:16]
    root = _private_config_root()
    folder = root / f"{base.name}-{digest}"
    if not (folder / "model_index.json").is_file():
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=root))
        shutil.copytree(base, staging, dirs_exist_ok=True)
        for name, config in configs.items():
            file = "scheduler_config.json" if name == "scheduler" else "config.json"
            (staging / name).mkdir(exist_ok=True)
            (staging / name / file).write_text(json.dumps(config, indent=2), encoding="utf-8")
        try:
            staging.rename(folder)
        except OSError:  # another thread won the race; its folder is identical
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _pipeline_class(arch: Arch) -> type[DiffusionPipeline]:
    return StableDiffusionXLPipeline if arch is Arch.SDXL else StableDiffusionPipeline


def _set_prediction(pipe: DiffusionPipeline, kind: ModelKind) -> None:
    prediction = kind.prediction or Prediction.EPSILON
    config = zero_snr_config(pipe.scheduler.config, prediction.value, kind.zero_snr)
    if config != dict(pipe.scheduler.config):
        pipe.scheduler = build_scheduler(type(pipe.scheduler), config)


def _kind_of_pipeline(pipe: DiffusionPipeline) -> ModelKind:
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        guidance = transformer.config.get("guidance_embeds")
        variant = FluxVariant.DEV if guidance else FluxVariant.SCHNELL
        return ModelKind(Arch.FLUX1, None, variant=variant)
    unet_config = pipe.unet.config
    if unet_config.get("addition_embed_type") == "text_time":
        arch = Arch.SDXL
    elif unet_config.get("cross_attention_dim") == 1024 or unet_config.get("use_linear_projection"):
        arch = Arch.SD2
    else:
        arch = Arch.SD1
    scheduler = pipe.scheduler.config
    return ModelKind(
        arch,
        Prediction(scheduler.get("prediction_type", "epsilon")),
        bool(scheduler.get(ZERO_SNR)),
    )


def load_checkpoint(
    checkpoint: CheckpointFile,
    device: torch.device,
    dtype: torch.dtype,
    lowvram: bool = False,
    *,
    fp8_storage: bool = False,
) -> LoadedModel:
    """Load a checkpoint fully offline onto `device` in `dtype`. Raises CheckpointError with the
    file name for anything that is not a usable SD1/SD2/SDXL/FLUX.1 checkpoint. A FLUX.1 file
    without text encoders or VAE takes them from `text_encoders/` and `vae/` beside it or in a
    folder above (the `models/` folder). `fp8_storage`: a FLUX.1 transformer's fp8 Linear
    weights stay fp8 and are upcast to `dtype` per layer as it runs (else upcast at load)."""
    if checkpoint.format is CheckpointFormat.DIFFUSERS:
        pipe = _load_diffusers_folder(checkpoint, dtype)
        kind = _kind_of_pipeline(pipe)
    else:
        header = read_header(checkpoint.path)
        kind = detect_kind(header, checkpoint.path.name)
    # families built component by component (FLUX.1) load through their own table entry
    parts: dict[str, Path] = {}
    if checkpoint.format is not CheckpointFormat.DIFFUSERS and kind.arch in _COMPONENT_LOADERS:
        loader = _COMPONENT_LOADERS[kind.arch]
        pipe = loader(checkpoint.path, header, kind, dtype, parts, fp8_storage)
    elif checkpoint.format is not CheckpointFormat.DIFFUSERS:
        folder = _config_folder_for(kind, header.metadata, checkpoint.path.name)
        extra: dict[str, Any] = {}
        if kind.arch is not Arch.SDXL:
            extra = {
                "safety_checker": None,
                "feature_extractor": None,
                "requires_safety_checker": False,
            }
        try:
            pipe = _pipeline_class(kind.arch).from_single_file(
                str(checkpoint.path),
                config=str(folder),
                local_files_only=True,
                **_dtype_kwargs(dtype),
                **extra,
            )
        except Exception as exc:  # diffusers raises assorted errors for mismatched weights
            raise CheckpointError(
                f"{checkpoint.path.name}: could not be loaded as {kind.label} ({exc})"
            ) from exc
        _check_complete(pipe, checkpoint.path.name)
        # A1111's rule: a .yaml beside the file overrides what the file says
        prediction = _prediction_from_sidecar(checkpoint.path) or kind.prediction
        if prediction is None:
            prediction = probe_v_prediction(pipe) if kind.arch is Arch.SD2 else Prediction.EPSILON
        kind = ModelKind(kind.arch, prediction, kind.zero_snr)
        _set_prediction(pipe, kind)
    place_pipeline(pipe, device, lowvram)
    log.debug("loaded %s (%s) on %s in %s", checkpoint.name, kind.label, device, dtype)
    return LoadedModel(pipe, kind, checkpoint.name, checkpoint.path, device, dtype, parts)


def _check_complete(pipe: DiffusionPipeline, source: str) -> None:
    """from_single_file leaves weights missing from the file on the meta device, silently."""
    missing = [
        f"{name}.{key}"
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        if getattr(pipe, name, None) is not None
        for key, tensor in getattr(pipe, name).state_dict().items()
        if tensor.is_meta
    ]
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} weight(s), e.g. {missing[0]}; the file may be truncated or of another model"
        )


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # float32 is diffusers' default; passing it explicitly only triggers a noisy warning
    return {} if dtype == torch.float32 else {"torch_dtype": dtype}


def _load_diffusers_folder(checkpoint: CheckpointFile, dtype: torch.dtype) -> DiffusionPipeline:
    try:
        return DiffusionPipeline.from_pretrained(
            str(checkpoint.path), local_files_only=True, safety_checker=None, **_dtype_kwargs(dtype)
        )
    except Exception as exc:
        raise CheckpointError(
            f"{checkpoint.name}: could not be loaded as a diffusers folder ({exc})"
        ) from exc


def place_pipeline(pipe: DiffusionPipeline, device: torch.device, lowvram: bool) -> None:
    """Move the pipeline to its device; with `lowvram` on a GPU, keep each component on the CPU
    until it runs (accelerate's model offload)."""
    if lowvram and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)


def pipeline_state_dict(
    pipe: DiffusionPipeline, kind: ModelKind, *, with_parts: bool = True
) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original single-file layout (LDM for SD1/SD2, SGM for SDXL,
    BFL + ComfyUI prefixes for FLUX.1; `with_parts=False`: its transformer only)."""
    if kind.arch is Arch.FLUX1:
        return flux_state_dict(pipe, with_parts=with_parts)
    components = {
        name: getattr(pipe, name).state_dict()
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        if getattr(pipe, name, None) is not None
    }
    return to_single_file(components, _component_configs(pipe), kind.arch)


def read_tensors(path: Path, exclude: set[str] | None = None) -> dict[str, torch.Tensor]:
    """A single-file checkpoint's tensors, except the keys in `exclude` (safetensors are read
    one tensor at a time; `.ckpt` through the weights-only loader)."""
    skip = exclude or set()
    if path.suffix.lower() == ".safetensors":
        with safetensors.safe_open(str(path), framework="pt") as handle:
            keys = [key for key in handle.keys() if key not in skip]  # noqa: SIM118 - not iterable
            return {key: handle.get_tensor(key) for key in keys}
    return {key: value for key, value in _load_ckpt(path).items() if key not in skip}


def save_single_file(
    pipe: DiffusionPipeline,
    kind: ModelKind,
    path: Path,
    *,
    embed_configs: bool = False,
    metadata: Mapping[str, str] | None = None,
    keep_from: Path | None = None,
    with_parts: bool = True,
    dtype: torch.dtype | None = None,
) -> int:
    """Write the pipeline as a single `.safetensors` checkpoint in the original key layout.
    `embed_configs` stores the component configs, for models whose sizes differ from configs/;
    `keep_from` copies the tensors of that source file the conversion does not produce (EMA
    weights, SD2's last text layer); `with_parts=False` writes a FLUX.1 transformer alone;
    `dtype` casts floating tensors (bf16, fp16, float8_e4m3fn). The file appears complete or not
    at all. Returns how many tensors were kept from the source."""
    state = {
        k: _cast(v.detach().to("cpu"), dtype).contiguous()
        for k, v in pipeline_state_dict(pipe, kind, with_parts=with_parts).items()
    }
    # the markers ComfyUI and Forge (and our loader) read; empty tensors, as NoobAI writes them
    if kind.prediction is Prediction.V:
        state.setdefault(V_PRED_KEY, torch.empty(0))
    if kind.zero_snr:
        state.setdefault(ZERO_SNR_KEY, torch.empty(0))
    kept = read_tensors(keep_from, set(state)) if keep_from is not None else {}
    state.update({k: v.contiguous() for k, v in kept.items()})
    meta = dict(metadata or {})
    if kind.arch is not Arch.FLUX1:
        meta["modelspec.prediction_type"] = "v" if kind.prediction is Prediction.V else "epsilon"
    if embed_configs:
        meta[CONFIGS_METADATA_KEY] = json.dumps(_component_configs(pipe))
    write_safetensors(path, state, meta)
    return len(kept)


def save_folder(pipe: DiffusionPipeline, out: Path) -> None:
    """Write the pipeline as a diffusers folder; it appears complete or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        pipe.save_pretrained(str(partial), safe_serialization=True)
        if out.is_dir():
            out.rmdir()  # callers check that it is empty
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


# -- FLUX.1: a transformer file plus parts (CLIP-L, T5-XXL, VAE) in the same file or beside it --


class TransformerLayout(StrEnum):
    BFL = "bfl"  # black-forest-labs' own names, as released and as ComfyUI writes them
    DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class FluxTransformer:
    """Where a file holds a FLUX.1 transformer: its key prefix, layout and variant."""

    prefix: str
    layout: TransformerLayout
    variant: FluxVariant


def flux_transformer(header: CheckpointHeader) -> FluxTransformer | None:
    """The FLUX.1 transformer a file holds, from its keys (None: not a FLUX.1 file).
    [dev] and [schnell] differ by the guidance embedder."""
    keys = header.shapes.keys()
    for prefix in flux1.TRANSFORMER_PREFIXES:
        for marker, layout in (
            (flux1.BFL_MARKER, TransformerLayout.BFL),
            (flux1.DIFFUSERS_MARKER, TransformerLayout.DIFFUSERS),
        ):
            if prefix + marker in keys:
                guided = any(prefix + m in keys for m in flux1.GUIDANCE_MARKERS)
                variant = FluxVariant.DEV if guided else FluxVariant.SCHNELL
                return FluxTransformer(prefix, layout, variant)
    return None


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _read_prefixed(
    path: Path, prefix: str, dtype: torch.dtype, keep: frozenset[torch.dtype] = frozenset()
) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (stripped), upcast to `dtype` (fp8 -> fp32/bf16 is exact),
    except those stored in a dtype of `keep`."""
    with safetensors.safe_open(str(path), framework="pt") as handle:
        keys = [k for k in handle.keys() if k.startswith(prefix)]  # noqa: SIM118 - not iterable
        tensors = {k.removeprefix(prefix): handle.get_tensor(k) for k in keys}
    return {k: t if t.dtype in keep else _cast(t, dtype) for k, t in tensors.items()}


def _materialise(
    empty: torch.nn.Module, state: dict[str, torch.Tensor], what: str
) -> torch.nn.Module:
    """Load `state` into a module built on the meta device; every weight must be there."""
    expected = set(empty.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(
            f"{what} lacks {len(missing)} weight(s), e.g. {missing[0]}; the file may be "
            "truncated or of another model"
        )
    unexpected = sorted(set(state) - expected)
    if unexpected:
        log.debug("%s: ignoring %d unused tensors, e.g. %s", what, len(unexpected), unexpected[0])
    try:
        empty.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{what} does not fit its config ({exc})") from exc
    return empty.eval()


def _clip_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # files say `text_model.encoder...`; transformers >= 5.6 may name them without the wrapper
    wrapped = any(k.startswith("text_model.") for k in model.state_dict())
    return {
        (with_text_model_prefix(k) if wrapped else k.removeprefix("text_model.")): v
        for k, v in state.items()
    }


def _t5_state(state: dict[str, torch.Tensor], _model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # the embedding is tied: files carry `shared.weight`, `encoder.embed_tokens.weight` or both
    state = dict(state)
    key, twin = "shared.weight", "encoder.embed_tokens.weight"
    if twin in state:
        state.setdefault(key, state[twin])
    if key in state:
        state.setdefault(twin, state[key])
    return state


def _vae_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """BFL's `ae` (LDM names) or diffusers names -> the model's names."""
    if any(k.startswith("encoder.down_blocks.") for k in state):
        return state
    up_blocks = len(model.config.up_block_types)
    converted: dict[str, torch.Tensor] = {}
    for key, expected in model.state_dict().items():
        module, _, param = key.rpartition(".")
        name = vae_module_name(module, up_blocks)
        tensor = state.get(f"{name}.{param}") if name else None
        if tensor is not None:
            converted[key] = tensor.reshape(expected.shape)  # LDM's 1x1 conv attention weights
    return converted


_PART_BUILDERS = {
    "text_encoder": (lambda c: CLIPTextModel(CLIPTextConfig(**c)), _clip_state),
    "text_encoder_2": (lambda c: T5EncoderModel(T5Config(**c)), _t5_state),
    "vae": (AutoencoderKL.from_config, _vae_state),
}


def _clean(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


def _file_configs(header: CheckpointHeader, source: str) -> dict[str, dict[str, Any]]:
    raw = header.metadata.get(CONFIGS_METADATA_KEY)
    allowed = frozenset((*FLUX_COMPONENTS, "scheduler"))
    return embedded_configs(raw, allowed, source) if raw else {}


def _parts_folders(path: Path) -> list[Path]:
    """`text_encoders/` and `vae/` in the file's folder and each folder above it."""
    return [
        parent / folder
        for parent in path.resolve().parents
        for folder in sorted(flux1.PART_FOLDERS)
        if (parent / folder).is_dir()
    ]


def _find_part(part: flux1.Part, path: Path) -> tuple[Path, str, CheckpointHeader] | None:
    """The first file (by name) in the parts folders that holds `part`, with the key prefix."""
    for folder in _parts_folders(path):
        for candidate in sorted(folder.rglob("*.safetensors")):
            try:
                header = read_header(candidate)
            except CheckpointError as exc:
                log.warning("skipping %s: %s", candidate, exc)
                continue
            for prefix in (part.prefix, ""):
                if any(prefix + m in header.shapes for m in part.markers):
                    return candidate, prefix, header
    return None


def _load_flux(
    path: Path,
    header: CheckpointHeader,
    kind: ModelKind,
    dtype: torch.dtype,
    parts: dict[str, Path],
    fp8_storage: bool = False,
) -> DiffusionPipeline:
    """A FluxPipeline from a transformer file (BFL or diffusers layout, any prefix) and the
    parts it holds or that lie in `text_encoders/` and `vae/` (recorded in `parts`); with
    `fp8_storage` the transformer's fp8 Linear weights stay fp8 (`fp8_storage.keep_fp8`)."""
    source = path.name
    found = flux_transformer(header)
    assert found is not None and kind.variant is not None
    folder = config_folder(Arch.FLUX1, kind.variant)
    embedded = _file_configs(header, source)
    state = _read_prefixed(path, found.prefix, dtype, FP8_DTYPES if fp8_storage else frozenset())
    if found.prefix == "":  # a bare transformer file: keep only transformer keys
        state = {k: v for k, v in state.items() if not k.startswith(("text_encoders.", "vae."))}
    try:
        if found.layout is TransformerLayout.BFL:
            state = flux_layout.bfl_to_diffusers(state)
        config = json.loads((folder / "transformer" / "config.json").read_text("utf-8"))
        config.update(embedded.get("transformer", {}))
        config.update(flux_layout.transformer_config({k: tuple(v.shape) for k, v in state.items()}))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{source}: not a complete FLUX.1 transformer ({exc})") from exc
    head_dim = config["attention_head_dim"]
    if sum(config["axes_dims_rope"]) != head_dim:
        raise CheckpointError(
            f"{source}: attention heads of width {head_dim} do not match rope axes "
            f"{config['axes_dims_rope']}; the file needs its component configs"
        )
    with init_empty_weights(include_buffers=False):
        transformer = FluxTransformer2DModel.from_config(_clean(config))
    transformer = _materialise(transformer, state, f"{source}: transformer")
    if fp8_storage and keep_fp8(transformer, dtype):
        log.debug("%s: the transformer's fp8 weights stay fp8 (computed in %s)", source, dtype)
    components: dict[str, Any] = {"transformer": transformer}
    missing: list[flux1.Part] = []
    for part in flux1.PARTS:
        if any(part.prefix + m in header.shapes for m in part.markers):
            where: tuple[Path, str, CheckpointHeader] | None = (path, part.prefix, header)
        else:
            where = _find_part(part, path)
        if where is None:
            missing.append(part)
            continue
        part_path, prefix, part_header = where
        if part_path != path:
            parts[part.component] = part_path
        configs = embedded if part_path == path else _file_configs(part_header, part_path.name)
        part_config = json.loads((folder / part.component / "config.json").read_text("utf-8"))
        part_config.update(configs.get(part.component, {}))
        build, rename = _PART_BUILDERS[part.component]
        with init_empty_weights(include_buffers=False):
            empty = build(_clean(part_config))
        tensors = rename(_read_prefixed(part_path, prefix, dtype), empty)
        what = f"{part_path.name}: {part.label}"
        components[part.component] = _materialise(empty, tensors, what)
    if missing:
        needed = "; ".join(f"{p.label} in models/{p.folder}/" for p in missing)
        raise CheckpointError(
            f"{source} is a FLUX.1 {kind.variant.value} transformer without its other parts; "
            f"missing: {needed}"
        )
    return flux_pipeline(folder, **components)  # tensors are in `dtype` (or kept fp8)


_COMPONENT_LOADERS = {Arch.FLUX1: _load_flux}


def flux_state_dict(pipe: DiffusionPipeline, *, with_parts: bool) -> dict[str, torch.Tensor]:
    """A FluxPipeline's weights as ComfyUI writes checkpoints: the transformer in BFL layout under
    `model.diffusion_model.`, and with `with_parts` CLIP-L, T5-XXL and the VAE (LDM names)."""
    state = {
        flux1.TRANSFORMER_PREFIXES[0] + k: v
        for k, v in flux_layout.diffusers_to_bfl(pipe.transformer.state_dict()).items()
    }
    if with_parts:
        for part in flux1.PARTS:
            state.update({part.prefix + k: v for k, v in flux_part_state(pipe, part).items()})
    return state


def flux_part_state(pipe: DiffusionPipeline, part: flux1.Part) -> dict[str, torch.Tensor]:
    """One part's weights as the separate downloads name them (no prefix): HF names for the text
    encoders (`text_model.` CLIP wrapper included), LDM names for the VAE."""
    module = getattr(pipe, part.component)
    weights = module.state_dict()
    if part.component == "vae":
        return vae_to_ldm(weights, module.config)
    if part.component == "text_encoder":
        return {with_text_model_prefix(k): v for k, v in weights.items()}
    # T5's input embedding is tied to `shared`; the downloads keep `shared.weight` only
    return {k: v for k, v in weights.items() if k != "encoder.embed_tokens.weight"}


# safetensors dtype names -> torch dtypes, for the float types model files hold
_STORED_DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def merged_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype a changed tensor stored as `stored` is written in: its own, except fp8, which
    becomes bf16 (a LoRA's delta rounded to fp8 would mostly vanish; bf16 holds fp8 exactly)."""
    return torch.bfloat16 if stored in FP8_DTYPES else stored


def exact_dtype(path: Path, wanted: torch.dtype | None = None) -> torch.dtype:
    """The narrowest dtype that holds every floating tensor of a `.safetensors` file (and
    `wanted`) exactly: fp8 fits bf16 and fp16; bf16 and fp16 together need fp32."""
    kinds = {torch.bfloat16 if d in FP8_DTYPES else d for d in stored_dtypes(path).values()}
    kinds |= {wanted} if wanted is not None else set()
    if len(kinds) == 1 and kinds <= {torch.bfloat16, torch.float16}:
        return kinds.pop()
    return torch.float32


def stored_dtypes(path: Path) -> dict[str, torch.dtype]:
    """Each floating tensor's dtype in a `.safetensors` file, from its header."""
    with safetensors.safe_open(str(path), framework="pt") as handle:
        names = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118
    return {key: _STORED_DTYPES[name] for key, name in names.items() if name in _STORED_DTYPES}


def save_flux_in_layout(
    pipe: DiffusionPipeline,
    source: Path,
    out: Path,
    changed: Collection[str],
    *,
    metadata: Mapping[str, str],
    dtype: torch.dtype | None = None,
) -> int:
    """Write a FLUX.1 pipeline to `out` with exactly the keys of the single file `source` (BFL,
    diffusers or ComfyUI-prefixed transformer, with or without its parts): tensors of the
    components in `changed` come from the pipeline, in `dtype` or else `merged_dtype` of the
    source's; all others are the source's tensors, copied unchanged. Returns how many tensors
    were stored fp8 and are now written wider. Raises CheckpointError (nothing written) when
    the pipeline's tensors do not fit the source's keys."""
    header = read_header(source)
    found = flux_transformer(header)
    if found is None:
        raise CheckpointError(f"{source.name}: not a FLUX.1 checkpoint")
    new: dict[str, torch.Tensor] = {}
    if "transformer" in changed:
        state = pipe.transformer.state_dict()
        if found.layout is TransformerLayout.BFL:
            state = flux_layout.diffusers_to_bfl(state)
        new.update({found.prefix + k: v for k, v in state.items()})
    for part in flux1.PARTS:
        if part.component in changed:
            for key, tensor in flux_part_state(pipe, part).items():
                # CLIP files are seen with and without the `text_model.` wrapper
                bare = part.prefix + key.removeprefix("text_model.")
                new[bare if bare in header.shapes else part.prefix + key] = tensor
    alien = sorted(key for key, v in new.items() if header.shapes.get(key) != tuple(v.shape))
    if alien:
        raise CheckpointError(
            f"{source.name}: the merged model does not fit its layout ({len(alien)} tensor(s) "
            f"missing or of another shape, e.g. {alien[0]})"
        )
    stored = stored_dtypes(source)
    widened = 0
    state: dict[str, torch.Tensor] = {}
    with safetensors.safe_open(str(source), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - not iterable
            if key not in new:
                state[key] = handle.get_tensor(key)
                continue
            was = stored.get(key, new[key].dtype)
            target = dtype or merged_dtype(was)
            widened += was in FP8_DTYPES and target not in FP8_DTYPES
            state[key] = new[key].detach().to("cpu", target).contiguous()
    write_safetensors(out, state, metadata)
    return widened
