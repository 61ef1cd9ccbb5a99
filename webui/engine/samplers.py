"""A1111 sampler names -> diffusers schedulers, configured from the loaded model's own scheduler
config so its betas, prediction type (epsilon or v) and zero-terminal-SNR schedule are kept."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
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


# diffusers' flag for a zero-terminal-SNR schedule; not every scheduler class takes it
ZERO_SNR = "rescale_betas_zero_snr"
# Where ᾱ_T = 0 would make the first sigma infinite: diffusers' Euler/DPM++/UniPC clamp to this
ZERO_SNR_FLOOR = 2.0**-24


def zero_snr_config(
    config: Mapping[str, Any], prediction_type: str, zero_snr: bool
) -> dict[str, Any]:
    """A model's scheduler config with its prediction type, and for zero-terminal-SNR models the
    rescaled betas with trailing timesteps (as A1111 1.10 and Forge sample them)."""
    changed: dict[str, Any] = {"prediction_type": prediction_type}
    if zero_snr:
        changed.update({ZERO_SNR: True, "timestep_spacing": "trailing"})
    out = _with(config, changed)
    if not zero_snr:
        out.pop(ZERO_SNR, None)
    return out


def _with(config: Mapping[str, Any], changed: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with `changed` set. diffusers' from_config drops every key that the config's
    `_use_default_values` lists (it was left at its default once), ours included: unlist them."""
    out = {**config, **changed}
    defaults = out.get("_use_default_values")
    if defaults:
        out["_use_default_values"] = [key for key in defaults if key not in changed]
    return out


def _base_betas(config: Mapping[str, Any]) -> torch.Tensor:
    steps = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    if schedule == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float64)
    raise ValueError(f"zero-terminal-SNR rescale of beta_schedule {schedule!r} is not supported")


def zero_snr_betas(config: Mapping[str, Any]) -> list[float]:
    """The config's betas rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1), with the
    final ᾱ set to `ZERO_SNR_FLOOR` instead of 0, for schedulers without diffusers' flag."""
    root = torch.cumprod(1 - _base_betas(config), 0).sqrt()
    first, last = root[0].item(), root[-1].item()
    root = (root - last) * (first / (first - last))
    cumprod = root**2
    cumprod[-1] = ZERO_SNR_FLOOR
    alphas = torch.cat([cumprod[:1], cumprod[1:] / cumprod[:-1]])
    return (1 - alphas).tolist()


def build_scheduler(
    cls: type[SchedulerMixin], config: Mapping[str, Any], **options: Any
) -> SchedulerMixin:
    """`cls` from a model's scheduler config. The one place that knows which classes take the
    zero-SNR flag: the others get the rescaled betas as `trained_betas`, and every result keeps
    the flag in its config so the next scheduler built from it is zero-SNR too."""
    if not config.get(ZERO_SNR):
        return cls.from_config(dict(config), **options)
    # trained_betas on a zero-SNR config are always ours: a flag-taking class must not rescale twice
    clean = {key: value for key, value in config.items() if key != "trained_betas"}
    if ZERO_SNR in inspect.signature(cls.__init__).parameters:
        scheduler = cls.from_config(clean, **options)
    else:
        clean.pop(ZERO_SNR)
        scheduler = cls.from_config(
            _with(clean, {"trained_betas": zero_snr_betas(clean)}), **options
        )
        scheduler.register_to_config(**{ZERO_SNR: True})
    return scheduler


@dataclass(frozen=True)
class Sampler:
    """An A1111 sampler: its display name, the diffusers class and the config changes it needs."""

    name: str
    scheduler: type[SchedulerMixin]
    options: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    def create(self, base_config: Mapping[str, Any]) -> SchedulerMixin:
        """A fresh scheduler built from the model's scheduler config plus this sampler's options."""
        return build_scheduler(self.scheduler, base_config, **self.options)


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

# Rectified-flow models (FLUX.1): Euler on the flow; the shift (static, or dynamic with `mu` from
# the image size) comes from the model's own scheduler config and the pipeline.
FLOW_MATCH_EULER = Sampler("Euler", FlowMatchEulerDiscreteScheduler)

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
