"""SDXL v-prediction and zero-terminal-SNR checkpoints (NoobAI-XL V-Pred style): told from the
`v_pred`/`ztsnr` marker keys, modelspec metadata or an A1111 `.yaml` beside the file, sampled
with zero-SNR betas by every sampler, listed as "v-pred" and recorded in the infotext."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from engine_settings import cpu_settings

from webui.arch import Arch, Prediction
from webui.engine.checkpoints import (
    CheckpointError,
    checkpoint_from_path,
    find_checkpoints,
    load_checkpoint,
)
from webui.engine.generate import Engine, GenerationRequest
from webui.engine.infotext import parse_infotext
from webui.engine.samplers import SAMPLERS

CPU = torch.device("cpu")


def reference_zero_snr_cumprod(config) -> torch.Tensor:
    """ᾱ_t of Lin et al. 2023 (Algorithm 1), written from the paper in float64: sqrt(ᾱ) shifted
    so its last value is 0 and scaled so its first is unchanged."""
    n = config["num_train_timesteps"]
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n).double() ** 2
    root = torch.cumprod(1 - betas, 0).sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    return root**2


def _zero_or_floor(last: float) -> bool:
    """ᾱ_T is 0, or diffusers' floor 2^-24 where a sigma schedule needs a finite first sigma."""
    return last == 0.0 or last == pytest.approx(2.0**-24, rel=1e-4)


def rewrite(
    source: Path, out: Path, add: tuple[str, ...] = (), meta: dict[str, str | None] | None = None
) -> Path:
    """A copy of a tiny checkpoint with marker keys added and metadata changed (None drops)."""
    with safetensors.safe_open(str(source), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = dict(handle.metadata() or {})
    tensors.update({key: torch.empty(0) for key in add})
    for key, value in (meta or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    safetensors.torch.save_file(tensors, str(out), metadata)
    return out


@pytest.fixture(scope="module")
def noob_like(tiny_checkpoint_factory, tmp_path_factory) -> Path:
    """The tiny epsilon SDXL file (its embedded scheduler config says epsilon) plus the two empty
    marker tensors, without prediction metadata: only the keys say v-pred and zero SNR."""
    source = tiny_checkpoint_factory(Arch.SDXL)
    out = tmp_path_factory.mktemp("vpred") / "noob-vpred.safetensors"
    return rewrite(source, out, ("v_pred", "ztsnr"), {"modelspec.prediction_type": None})


@pytest.fixture(scope="module")
def noob_scheduler_config(noob_like: Path) -> dict:
    return dict(
        load_checkpoint(checkpoint_from_path(noob_like), CPU, torch.float32).pipe.scheduler.config
    )


def test_marker_keys_load_as_v_prediction_with_zero_snr_betas(noob_like: Path) -> None:
    loaded = load_checkpoint(checkpoint_from_path(noob_like), CPU, torch.float32)
    assert loaded.kind.prediction is Prediction.V
    assert loaded.kind.zero_snr
    assert loaded.kind.label == "SDXL v-pred"
    config = loaded.pipe.scheduler.config
    assert config.prediction_type == "v_prediction"
    assert config.rescale_betas_zero_snr
    assert config.timestep_spacing == "trailing"
    expected = reference_zero_snr_cumprod(config)
    actual = loaded.pipe.scheduler.alphas_cumprod.double()
    assert torch.allclose(actual[:-1], expected[:-1], rtol=1e-5, atol=1e-7)
    assert _zero_or_floor(float(actual[-1]))


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.name)
def test_every_sampler_keeps_zero_snr(noob_scheduler_config, sampler) -> None:
    scheduler = sampler.create(noob_scheduler_config)
    # built twice: a scheduler made from the previous one's config is still zero-SNR
    scheduler = sampler.create(scheduler.config)
    assert scheduler.config.prediction_type == "v_prediction"
    expected = reference_zero_snr_cumprod(scheduler.config)
    actual = scheduler.alphas_cumprod.double()
    assert torch.allclose(actual[:-1], expected[:-1], rtol=1e-5, atol=1e-7)
    assert _zero_or_floor(float(actual[-1]))
    scheduler.set_timesteps(4)
    assert (
        round(float(scheduler.timesteps[0])) == 999
    )  # trailing spacing starts at the last timestep


def _engine(tmp_path: Path, checkpoint: Path) -> Engine:
    models = tmp_path / "models"
    models.mkdir(parents=True)
    shutil.copy(checkpoint, models / checkpoint.name)
    engine = Engine(cpu_settings(models, tmp_path / "loras", tmp_path))
    engine.load(checkpoint.stem)
    return engine


def test_image_differs_from_epsilon_and_infotext_says_so(
    noob_like: Path, tiny_checkpoint_factory, tmp_path: Path
) -> None:
    request = GenerationRequest("a cat", seed=5, width=64, height=64, steps=3)
    vpred = _engine(tmp_path / "v", noob_like).generate(request)
    eps = _engine(tmp_path / "e", tiny_checkpoint_factory(Arch.SDXL)).generate(request)
    v_pixels, e_pixels = (np.asarray(r.images[0].image, dtype=float) for r in (vpred, eps))
    assert np.isfinite(v_pixels).all()
    assert np.abs(v_pixels - e_pixels).mean() > 1.0
    params = parse_infotext(vpred.images[0].infotext.format()).params
    assert params["Noise Schedule"] == "Zero Terminal SNR"
    assert params["Prediction"] == "v-prediction"
    eps_params = parse_infotext(eps.images[0].infotext.format()).params
    assert "Noise Schedule" not in eps_params and "Prediction" not in eps_params


def test_checkpoint_list_marks_v_pred(noob_like: Path, tiny_checkpoint_factory, tmp_path) -> None:
    shutil.copy(noob_like, tmp_path / noob_like.name)
    shutil.copy(tiny_checkpoint_factory(Arch.SDXL), tmp_path / "eps.safetensors")
    listed = {c.name: c for c in find_checkpoints(tmp_path)}
    assert listed["noob-vpred"].prediction_label == "v-pred"
    assert listed["noob-vpred"].zero_snr
    assert listed["eps"].prediction_label == ""


@pytest.mark.parametrize("declared", ["v", "v_prediction", "velocity"])
def test_modelspec_prediction_type_is_honoured(
    tiny_checkpoint_factory, tmp_path: Path, declared: str
) -> None:
    path = rewrite(
        tiny_checkpoint_factory(Arch.SDXL),
        tmp_path / "meta-v.safetensors",
        meta={"modelspec.prediction_type": declared},
    )
    loaded = load_checkpoint(checkpoint_from_path(path), CPU, torch.float32)
    assert (loaded.kind.prediction, loaded.kind.zero_snr) == (Prediction.V, False)
    assert loaded.pipe.scheduler.config.prediction_type == "v_prediction"


def test_a1111_yaml_beside_the_file(tiny_checkpoint_factory, tmp_path: Path) -> None:
    path = tmp_path / "yaml-v.safetensors"
    shutil.copy(tiny_checkpoint_factory(Arch.SDXL), path)
    path.with_suffix(".yaml").write_text(
        'model:\n  params:\n    parameterization: "v"\n', encoding="utf-8"
    )
    loaded = load_checkpoint(checkpoint_from_path(path), CPU, torch.float32)
    assert loaded.kind.prediction is Prediction.V
    assert loaded.pipe.scheduler.config.prediction_type == "v_prediction"
    assert find_checkpoints(tmp_path)[0].prediction_label == "v-pred"


def test_unsupported_prediction_type_is_named(tiny_checkpoint_factory, tmp_path: Path) -> None:
    path = rewrite(
        tiny_checkpoint_factory(Arch.SDXL),
        tmp_path / "x0.safetensors",
        meta={"modelspec.prediction_type": "x0"},
    )
    with pytest.raises(CheckpointError, match=r"x0\.safetensors.*'x0'"):
        load_checkpoint(checkpoint_from_path(path), CPU, torch.float32)
