"""A1111 sampler names -> diffusers schedulers, configured from the loaded model's own scheduler
config so its betas and prediction type (epsilon or v) are kept."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin


class UnknownSamplerError(ValueError):
    """A sampler name that is not in `SAMPLERS`."""


@dataclass(frozen=True)
class Sampler:
    """An A1111 sampler: its display name, the diffusers class and the config changes it needs."""

    name: str
    scheduler: type[SchedulerMixin]
    options: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def create(self, base_config: Mapping[str, Any]) -> SchedulerMixin:
        """A fresh scheduler built from the model's scheduler config plus this sampler's options."""
        return self.scheduler.from_config(dict(base_config), **self.options)


_KARRAS = {"use_karras_sigmas": True}

SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler a", EulerAncestralDiscreteScheduler, aliases=("k_euler_a", "euler_ancestral")),
    Sampler("Euler", EulerDiscreteScheduler, aliases=("k_euler",)),
    Sampler("Heun", HeunDiscreteScheduler, aliases=("k_heun",)),
    Sampler("DPM2", KDPM2DiscreteScheduler, aliases=("k_dpm_2",)),
    Sampler("DPM2 a", KDPM2AncestralDiscreteScheduler, aliases=("k_dpm_2_a",)),
    Sampler("DPM++ 2M", DPMSolverMultistepScheduler, aliases=("k_dpmpp_2m",)),
    Sampler("DPM++ 2M Karras", DPMSolverMultistepScheduler, _KARRAS),
    Sampler(
        "DPM++ 2M SDE",
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++"},
        aliases=("k_dpmpp_2m_sde",),
    ),
    Sampler(
        "DPM++ 2M SDE Karras",
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", **_KARRAS},
    ),
    Sampler("DPM++ SDE", DPMSolverSDEScheduler, aliases=("k_dpmpp_sde",)),
    Sampler("DPM++ SDE Karras", DPMSolverSDEScheduler, _KARRAS),
    Sampler("LMS", LMSDiscreteScheduler, aliases=("k_lms",)),
    Sampler("LMS Karras", LMSDiscreteScheduler, _KARRAS),
    Sampler("DDIM", DDIMScheduler, aliases=("ddim",)),
    Sampler("PLMS", PNDMScheduler, {"skip_prk_steps": True}, aliases=("plms", "PNDM")),
    Sampler("UniPC", UniPCMultistepScheduler, aliases=("unipc",)),
)

DEFAULT_SAMPLER = "Euler a"

_BY_NAME = {
    key.lower(): sampler for sampler in SAMPLERS for key in (sampler.name, *sampler.aliases)
}

# A1111 >= 1.8 writes the schedule separately ("Sampler: DPM++ 2M, Schedule type: Karras").
_SCHEDULE_SUFFIX = {"karras": " Karras", "automatic": "", "": ""}


def sampler_names() -> list[str]:
    """Display names, in the order the UI lists them."""
    return [sampler.name for sampler in SAMPLERS]


def get_sampler(name: str, schedule_type: str = "") -> Sampler:
    """The sampler for an A1111 name (case-insensitive; aliases and a separate Karras schedule
    type accepted). Raises UnknownSamplerError listing the known names."""
    suffix = _SCHEDULE_SUFFIX.get(schedule_type.strip().lower())
    candidates = [name.strip()]
    if suffix:
        candidates.insert(0, name.strip() + suffix)
    for candidate in candidates:
        sampler = _BY_NAME.get(candidate.lower())
        if sampler is not None:
            return sampler
    known = ", ".join(sampler_names())
    raise UnknownSamplerError(f"unknown sampler {name!r}; known samplers: {known}")
