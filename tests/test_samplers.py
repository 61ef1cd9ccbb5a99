"""A1111 sampler names map to the right diffusers schedulers, keeping the model's config."""

from __future__ import annotations

import pytest
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from webui.engine.samplers import UnknownSamplerError, get_sampler

BASE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
}

REQUIRED = [
    ("Euler", EulerDiscreteScheduler, False),
    ("Euler a", EulerAncestralDiscreteScheduler, False),
    ("Heun", HeunDiscreteScheduler, False),
    ("DPM2", KDPM2DiscreteScheduler, False),
    ("DPM++ 2M", DPMSolverMultistepScheduler, False),
    ("DPM++ 2M Karras", DPMSolverMultistepScheduler, True),
    ("DPM++ SDE Karras", DPMSolverSDEScheduler, True),
    ("DDIM", DDIMScheduler, False),
    ("UniPC", UniPCMultistepScheduler, False),
    ("LMS", LMSDiscreteScheduler, False),
]


@pytest.mark.parametrize(("name", "cls", "karras"), REQUIRED)
def test_required_samplers(name: str, cls: type, karras: bool) -> None:
    scheduler = get_sampler(name).create(BASE)
    assert type(scheduler) is cls
    assert scheduler.config.prediction_type == "v_prediction"  # the model's config is kept
    assert bool(scheduler.config.get("use_karras_sigmas", False)) is karras
    scheduler.set_timesteps(4)  # usable as configured (LMS needs scipy, DPM++ SDE torchsde)


def test_separate_schedule_type_as_newer_a1111_writes_it() -> None:
    assert get_sampler("DPM++ 2M", schedule_type="Karras").name == "DPM++ 2M Karras"
    assert get_sampler("euler A").name == "Euler a"


def test_unknown_sampler_names_it() -> None:
    with pytest.raises(UnknownSamplerError, match="'Nope'"):
        get_sampler("Nope")
