"""Settings for test engines: the CPU, given model and LoRA folders, outputs and caches kept
under a scratch folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from webui.settings import DeviceChoice, Settings


def cpu_settings(models: Path, loras: Path, scratch: Path, **overrides: Any) -> Settings:
    """Settings on the CPU for these folders; outputs and cache under `scratch`."""
    return Settings(
        models_dir=models,
        loras_dir=loras,
        outputs_dir=scratch / "out",
        cache_dir=scratch / "cache",
        device=DeviceChoice.CPU,
        **overrides,
    )
