"""The model picker labels a v-prediction checkpoint "(v-pred)" while its value stays the name
(what `Engine.load` and the settings file take)."""

from __future__ import annotations

import shutil
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from engine_settings import cpu_settings

from webui.arch import Arch
from webui.engine.generate import Engine
from webui.ui.blocks import picker_values


def _with_markers(source: Path, out: Path) -> None:
    """A copy of a tiny SDXL file with NoobAI's empty `v_pred`/`ztsnr` marker tensors and no
    prediction metadata: only the keys say v-pred."""
    with safetensors.safe_open(str(source), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = dict(handle.metadata() or {})
    metadata.pop("modelspec.prediction_type", None)
    tensors.update({"v_pred": torch.empty(0), "ztsnr": torch.empty(0)})
    safetensors.torch.save_file(tensors, str(out), metadata)


def test_picker_labels_v_pred_and_keeps_names_as_values(
    tiny_checkpoint_factory, tmp_path: Path
) -> None:
    source = tiny_checkpoint_factory(Arch.SDXL)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(source, models / "eps.safetensors")
    _with_markers(source, models / "noobai-vpred.safetensors")
    engine = Engine(cpu_settings(models, tmp_path / "loras", tmp_path))

    choices, value = picker_values(engine)

    assert sorted(choices) == [("eps", "eps"), ("noobai-vpred (v-pred)", "noobai-vpred")]
    assert value in {"eps", "noobai-vpred"}  # a name, never a label
    assert sorted(engine.model_choices()) == ["eps", "noobai-vpred"]


def test_picker_without_checkpoints_offers_the_demo_model(tmp_path: Path) -> None:
    engine = Engine(cpu_settings(tmp_path / "models", tmp_path / "loras", tmp_path))
    choices, value = picker_values(engine)
    assert choices == [(value, value)]
