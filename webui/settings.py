"""One typed Settings object: where files live, which device and dtype the model uses, how the
server listens. Built from command-line flags in `app.py`; everything else receives it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


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
    outputs_dir: Path = ROOT / "outputs"
    device: DeviceChoice = DeviceChoice.AUTO
    dtype: DtypeChoice = DtypeChoice.AUTO
    lowvram: bool = False
    listen: bool = False
    port: int = 7860
    save_outputs: bool = True
    cache_dir: Path = ROOT / ".cache"
    # trigger words added to the encoded prompt: 0 off, N the first N of each LoRA, -1 all
    auto_trigger_words: int = 0
    lora_backend: LoraBackend = LoraBackend.AUTO
    # fuse diffusers adapters into the weights (faster steps) when no native LoRA is applied
    lora_fuse: bool = False

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
