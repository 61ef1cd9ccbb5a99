"""A1111's variation seeds: the initial noise is A1111's slerp of the seed's noise toward the
subseed's (reference written here from the math, per (channel, column) of each image), strength 0
is the plain seed's noise, the image changes, the infotext round-trips, the seed comes back."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_settings import cpu_settings

from webui.arch import Arch
from webui.engine.generate import Engine, GenerationRequest, RequestError
from webui.engine.infotext import parse_infotext

SMALL = {"width": 64, "height": 64, "steps": 2}


def reference_blend(t: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A1111's slerp on one image's (C, H, W) noise, from its math: vectors along H, one angle
    per (channel, column); the mean cosine above 0.9995 gives A1111's linear mix instead."""
    channels, _, width = low.shape
    cosines = np.empty((channels, width))
    for c in range(channels):
        for x in range(width):
            a, b = low[c, :, x], high[c, :, x]
            cosines[c, x] = float(a @ b) / (math.sqrt(a @ a) * math.sqrt(b @ b))
    if cosines.mean() > 0.9995:
        return low * t + high * (1 - t)
    out = np.empty_like(low)
    for c in range(channels):
        for x in range(width):
            omega = math.acos(cosines[c, x])
            out[c, :, x] = (
                math.sin((1 - t) * omega) * low[c, :, x] + math.sin(t * omega) * high[c, :, x]
            ) / math.sin(omega)
    return out


def cpu_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)).numpy()


@pytest.fixture
def engine(tmp_path: Path, tiny_checkpoint_factory) -> Engine:
    checkpoint = tiny_checkpoint_factory(Arch.SD1)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(checkpoint, models / checkpoint.name)
    engine = Engine(cpu_settings(models, tmp_path / "loras", tmp_path, save_outputs=False))
    engine.load(checkpoint.stem)
    return engine


def capture_initial_latents(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list:
    """Record the initial latents the pipeline starts from (after its own sigma scaling)."""
    pipe = engine.model.pipe
    seen: list[torch.Tensor] = []
    original = pipe.prepare_latents

    def recording(*args, **kwargs):
        latents = original(*args, **kwargs)
        seen.append(latents.clone() / pipe.scheduler.init_noise_sigma)
        return latents

    monkeypatch.setattr(pipe, "prepare_latents", recording)
    return seen


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_initial_noise_is_a1111_blend(engine: Engine, monkeypatch, strength: float) -> None:
    seen = capture_initial_latents(engine, monkeypatch)
    request = GenerationRequest(
        "a cat", seed=11, subseed=500, subseed_strength=strength, batch_size=2, **SMALL
    )
    result = engine.generate(request)
    shape = (4, 8, 8)
    # A1111: with a variation strength every image keeps the seed, the subseed counts up
    assert [img.seed for img in result.images] == [11, 11]
    expected = np.stack(
        [reference_blend(strength, cpu_noise(11, shape), cpu_noise(500 + i, shape)) for i in (0, 1)]
    )
    np.testing.assert_allclose(seen[0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_strength_zero_is_the_plain_seed(engine: Engine, monkeypatch) -> None:
    seen = capture_initial_latents(engine, monkeypatch)
    plain = engine.generate(GenerationRequest("a cat", seed=11, **SMALL))
    zero = engine.generate(
        GenerationRequest("a cat", seed=11, subseed=500, subseed_strength=0.0, **SMALL)
    )
    # the recorded noise was scaled by the sampler's sigma and back: equal to float rounding
    torch.testing.assert_close(seen[0], torch.from_numpy(cpu_noise(11, (1, 4, 8, 8))))
    assert torch.equal(seen[0], seen[1])
    assert np.array_equal(np.asarray(plain.images[0].image), np.asarray(zero.images[0].image))
    assert "Variation seed" not in zero.images[0].infotext.params  # A1111 omits it at 0


def test_variation_changes_the_image_and_round_trips(engine: Engine) -> None:
    plain = engine.generate(GenerationRequest("a cat", seed=11, **SMALL))
    varied = engine.generate(
        GenerationRequest("a cat", seed=11, subseed=500, subseed_strength=0.4, **SMALL)
    )
    assert not np.array_equal(np.asarray(plain.images[0].image), np.asarray(varied.images[0].image))
    generated = varied.images[0]
    assert generated.seed == 11  # "reuse the last seed" reads it here
    params = parse_infotext(generated.infotext.format()).params
    assert params["Seed"] == "11"
    assert params["Variation seed"] == "500"
    assert params["Variation seed strength"] == "0.4"


def test_random_subseed_is_recorded(engine: Engine) -> None:
    result = engine.generate(
        GenerationRequest("a cat", seed=1, subseed=-1, subseed_strength=0.5, **SMALL)
    )
    subseed = int(result.images[0].infotext.params["Variation seed"])
    again = engine.generate(
        GenerationRequest("a cat", seed=1, subseed=subseed, subseed_strength=0.5, **SMALL)
    )
    assert np.array_equal(np.asarray(result.images[0].image), np.asarray(again.images[0].image))


@pytest.mark.parametrize(
    ("field", "value"), [("subseed_strength", 1.5), ("subseed_strength", -0.1), ("subseed", -2)]
)
def test_bad_variation_fields_are_named(field: str, value: float) -> None:
    with pytest.raises(RequestError, match=field):
        GenerationRequest("a cat", **{field: value}).validate()
