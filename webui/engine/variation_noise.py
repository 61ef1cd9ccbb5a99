"""A1111's variation seeds: the initial noise of an image is its seed's noise blended toward a
second seed's noise (`subseed`) by `subseed_strength`, with A1111's spherical interpolation.

The math follows A1111's `modules/processing.py` (`slerp`, `ImageRNG.first`): each image's noise
is drawn alone, on the CPU, as a (channels, height, width) tensor; the blend normalises along the
height axis (A1111 normalises `dim=1` of that per-image tensor), so every (channel, column) pair
has its own angle; when the angles are nearly zero on average it falls back to A1111's linear
mix (`low * t + high * (1 - t)`, weights as A1111 writes them)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

_NEARLY_PARALLEL = 0.9995  # A1111's threshold on the mean cosine


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's blend of `low` (the seed's noise) toward `high` (the subseed's), for one image's
    (channels, height, width) noise."""
    low_unit = low / torch.linalg.vector_norm(low, dim=1, keepdim=True)
    high_unit = high / torch.linalg.vector_norm(high, dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)
    if cosine.mean() > _NEARLY_PARALLEL:
        return low * strength + high * (1 - strength)
    angle = torch.acos(cosine)
    sine = torch.sin(angle)
    low_weight = (torch.sin((1.0 - strength) * angle) / sine).unsqueeze(1)
    high_weight = (torch.sin(strength * angle) / sine).unsqueeze(1)
    return low_weight * low + high_weight * high


def seed_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """One image's noise for `seed`, drawn on the CPU in float32 (the same on every device)."""
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(seed))


def variation_noise(
    seeds: Sequence[int],
    subseeds: Sequence[int],
    strength: float,
    shape: Sequence[int],
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """The batch's initial noise (batch, *shape): each seed's noise blended toward its subseed's.
    `generators`, when given, are the seeds' own generators (seeded, unused): the seed noise is
    drawn from them so they advance as the pipeline's own draw would have advanced them."""
    images = []
    for i, (seed, subseed) in enumerate(zip(seeds, subseeds, strict=True)):
        if generators is None:
            noise = seed_noise(seed, shape)
        else:
            noise = torch.randn(tuple(shape), generator=generators[i])
        if strength != 0:
            noise = slerp(strength, noise, seed_noise(subseed, shape))
        images.append(noise)
    return torch.stack(images)
