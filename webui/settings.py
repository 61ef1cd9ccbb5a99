"""One typed Settings object: where files live, which device and dtype the model uses, how the
server listens. Built from command-line flags in `app.py`; everything else receives it.

The server-wide options a user changes in the Settings tab (and the last model loaded) are kept in
a JSON settings file, A1111's `config.json`: `SettingsFile` reads and writes it."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger(__name__)


class DeviceChoice(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class DtypeChoice(StrEnum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class LoraBackend(StrEnum):
    """Which code applies LoRAs: our native patcher, the diffusers/PEFT fallback, or per LoRA
    (native where it can apply every module, the fallback for what it cannot)."""

    AUTO = "auto"
    NATIVE = "native"
    DIFFUSERS = "diffusers"


class Fp8Storage(StrEnum):
    """Whether a FLUX.1 transformer's fp8 weights stay fp8 in memory, upcast per layer as it
    runs (about half the memory of bf16), or are upcast once at load. auto: on for CUDA, where
    memory is the limit; off on the CPU, where upcasting once at load is faster."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"

    def keeps_fp8(self, device: torch.device) -> bool:
        """Whether fp8 weights stay fp8 on `device`."""
        if self is Fp8Storage.AUTO:
            return device.type == "cuda"
        return self is Fp8Storage.ON


_DTYPES = {
    DtypeChoice.FP32: torch.float32,
    DtypeChoice.FP16: torch.float16,
    DtypeChoice.BF16: torch.bfloat16,
}


@dataclass(frozen=True)
class RequestLimits:
    """The most a request may ask of the server; bigger ones are refused with a message that
    names the limit (413 for a body, 422 for a field), before anything is parsed or decoded."""

    max_body_bytes: int = 64 * 1024 * 1024  # a base64 PNG for PNG Info is the largest body
    max_prompt_chars: int = 20_000  # each of prompt and negative prompt; CLIP reads ~300 words
    max_image_pixels: int = 8192 * 8192  # PNG Info: width x height, read before decoding


LIMITS = RequestLimits()


@dataclass(frozen=True)
class Settings:
    """Paths, device and server options. Paths are absolute once resolved."""

    models_dir: Path = ROOT / "models"
    loras_dir: Path = ROOT / "loras"
    embeddings_dir: Path = ROOT / "embeddings"  # textual-inversion files, named in prompts
    outputs_dir: Path = ROOT / "outputs"
    settings_file: Path = ROOT / "config.json"
    device: DeviceChoice = DeviceChoice.AUTO
    dtype: DtypeChoice = DtypeChoice.AUTO
    lowvram: bool = False
    fp8_storage: Fp8Storage = Fp8Storage.AUTO
    listen: bool = False
    port: int = 7860
    save_outputs: bool = True
    cache_dir: Path = ROOT / ".cache"
    # trigger words added to the encoded prompt: 0 off, N the first N of each LoRA, -1 all
    auto_trigger_words: int = 0
    lora_backend: LoraBackend = LoraBackend.AUTO
    # fuse diffusers adapters into the weights (faster steps) when no native LoRA is applied
    lora_fuse: bool = False
    live_preview_every: int = 10  # a cheap preview every N sampling steps (0: off); A1111's 10

    @property
    def host(self) -> str:
        """127.0.0.1 unless the user asked to listen on every interface."""
        return "0.0.0.0" if self.listen else "127.0.0.1"

    def torch_device(self) -> torch.device:
        """The device models run on: CUDA when present (or asked for), else CPU."""
        if self.device is DeviceChoice.CPU:
            return torch.device("cpu")
        if self.device is DeviceChoice.CUDA and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but no CUDA GPU is available")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def torch_dtype(self) -> torch.dtype:
        """fp16 on a GPU unless told otherwise; fp32 on the CPU, where half precision is slow."""
        if self.dtype is not DtypeChoice.AUTO:
            return _DTYPES[self.dtype]
        return torch.float16 if self.torch_device().type == "cuda" else torch.float32


# The Settings fields a user may change while the app runs (the Settings tab); they are saved.
SAVED_OPTIONS = ("auto_trigger_words", "save_outputs", "lora_fuse", "live_preview_every")
LAST_MODEL_KEY = "sd_model_checkpoint"  # A1111's name for the model loaded at start-up


@dataclass(frozen=True)
class SavedState:
    """What the settings file holds: option values by Settings field name, and the last model."""

    options: dict[str, Any]
    last_model: str | None = None


class SettingsFile:
    """The JSON settings file. Unknown keys (a newer version's, or a user's) are kept on save;
    a missing or unreadable file gives the defaults (unreadable: with one warning)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("settings file %s unreadable (%s): using the defaults", self.path, exc)
            return {}
        if not isinstance(data, dict):
            log.warning("settings file %s holds no JSON object: using the defaults", self.path)
            return {}
        return data

    def load(self) -> SavedState:
        data = self._read()
        model = data.get(LAST_MODEL_KEY)
        return SavedState(
            {k: data[k] for k in SAVED_OPTIONS if k in data},
            model if isinstance(model, str) and model else None,
        )

    def apply(self, settings: Settings) -> Settings:
        """`settings` with the saved options; values of the wrong type are ignored, with a warning."""
        options = {}
        types = {f.name: type(getattr(settings, f.name)) for f in fields(settings)}
        for name, value in self.load().options.items():
            if type(value) is types[name]:
                options[name] = value
            else:
                log.warning(
                    "settings file %s: %s=%r ignored (not a %s)",
                    self.path,
                    name,
                    value,
                    types[name].__name__,
                )
        return replace(settings, **options)

    def save(self, settings: Settings | None = None, last_model: str | None = None) -> None:
        """Write the options of `settings` and/or the last model, keeping every other key."""
        data = self._read()
        if settings is not None:
            data.update({name: getattr(settings, name) for name in SAVED_OPTIONS})
        if last_model is not None:
            data[LAST_MODEL_KEY] = last_model
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # written beside and renamed: a crash mid-write never leaves half a file
        with tempfile.NamedTemporaryFile(
            "w", dir=self.path.parent, suffix=".tmp", delete=False, encoding="utf-8"
        ) as out:
            json.dump(data, out, indent=2, sort_keys=True)
        os.replace(out.name, self.path)
