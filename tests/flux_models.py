"""Tiny FLUX.1 dev and schnell checkpoints written into a models/ folder as users lay them out:
dev all-in-one (ComfyUI layout), schnell transformer-only with its parts in text_encoders/ and
vae/ (the separate downloads' names: clip_l, t5xxl_fp16, ae)."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from functools import cache
from pathlib import Path

from webui.arch import Arch, FluxVariant
from webui.engine.checkpoints import ModelKind, flux_part_state, save_single_file
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.families.flux1 import model as flux1
from webui.networks.format import write_safetensors

PART_NAMES = {"text_encoder": "clip_l", "text_encoder_2": "t5xxl_fp16", "vae": "ae"}


def write_flux_models(models: Path) -> dict[FluxVariant, str]:
    """The two models in `models`; returns the Engine's name of each. Copies of files built once
    per process (the same seed gives the same bytes): building them took ~2 s each time."""
    shutil.copytree(_built(), models, dirs_exist_ok=True)
    return {v: f"flux1-{v.value}" for v in FluxVariant}


@cache
def _built() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="flux-models-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    _write(folder)
    return folder


def _write(models: Path) -> None:
    for variant in FluxVariant:
        pipe = build_pipeline(ModelSpec(Arch.FLUX1, variant=variant), seed=3)
        kind = ModelKind(Arch.FLUX1, None, variant=variant)
        alone = variant is FluxVariant.SCHNELL
        path = models / f"flux1-{variant.value}.safetensors"
        save_single_file(pipe, kind, path, embed_configs=True, with_parts=not alone)
        if alone:
            for part in flux1.PARTS:
                config = getattr(pipe, part.component).config
                raw = config.to_json_string() if hasattr(config, "to_json_string") else None
                raw = raw or json.dumps(dict(config))
                meta = {"lora_webui.component_configs": f'{{"{part.component}": {raw}}}'}
                target = models / part.folder / f"{PART_NAMES[part.component]}.safetensors"
                write_safetensors(target, flux_part_state(pipe, part), meta)
