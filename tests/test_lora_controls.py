"""Per-step schedules, per-encoder and per-block strengths, end to end through generation."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_settings import cpu_settings
from lora_files import write_kohya_lora

from webui.arch import Arch
from webui.engine.generate import Engine, GenerationRequest
from webui.networks.apply.patcher import NetworkPatcher

STEPS = 6


def make_engine(tmp_path: Path, checkpoint: Path, arch: Arch) -> Engine:
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    loras.mkdir()
    shutil.copy(checkpoint, models / "tiny.safetensors")
    write_kohya_lora(loras / "style.safetensors", arch)
    engine = Engine(cpu_settings(models, loras, tmp_path))
    engine.load("tiny")
    return engine


def render(engine: Engine, prompt: str) -> np.ndarray:
    result = engine.generate(GenerationRequest(prompt, width=64, height=64, steps=STEPS, seed=4))
    assert result.warnings == []
    return np.asarray(result.images[0].image)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture
def sd1(tmp_path, tiny_checkpoint_factory) -> Engine:
    return make_engine(tmp_path, tiny_checkpoint_factory(Arch.SD1), Arch.SD1)


def test_unet_schedule_follows_the_interpolation_step_by_step(sd1: Engine, monkeypatch) -> None:
    unet = sd1.model.pipe.unet
    target = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    base = target.detach().clone()
    render(sd1, "a cat <lora:style:te=0:unet=1>")
    full_delta = target.detach() - base  # the delta at strength 1
    seen: list[tuple[int, float]] = []
    original_set_step = NetworkPatcher.set_step

    def recording(self, step: int, total: int):
        report = original_set_step(self, step, total)
        fraction = float(
            ((target.detach() - base) * full_delta).sum() / (full_delta * full_delta).sum()
        )
        seen.append((step, fraction))
        return report

    monkeypatch.setattr(NetworkPatcher, "set_step", recording)
    scheduled = render(sd1, f"a cat <lora:style:te=0:unet=0@0,1@{STEPS}>")
    # step k of 6 sits at k/6 on the line from 0@0 to 1@6 (hand-computed); step 1 is set per batch
    expected = {1: 1 / 6, 2: 2 / 6, 3: 3 / 6, 4: 4 / 6, 5: 5 / 6, 6: 1.0}
    assert {step for step, _ in seen} == set(expected)
    for step, fraction in seen:
        assert fraction == pytest.approx(expected[step], abs=1e-5), step
    constant_0 = render(sd1, "a cat <lora:style:te=0:unet=0>")
    constant_1 = render(sd1, "a cat <lora:style:te=0:unet=1>")
    assert not np.array_equal(scheduled, constant_0)
    assert not np.array_equal(scheduled, constant_1)


def test_text_encoder_schedule_reencodes_the_prompt(sd1: Engine) -> None:
    constant = render(sd1, "a cat <lora:style:te=0.2:unet=0>")
    scheduled = render(sd1, f"a cat <lora:style:te=0.2@1,1@{STEPS}:unet=0>")
    assert not np.array_equal(constant, scheduled)  # later steps saw the new embedding


def test_in_mid_out_touch_only_the_named_blocks(sd1: Engine) -> None:
    unet = sd1.model.pipe.unet
    before = state(unet)
    render(sd1, "a cat <lora:style:te=0:in=0:mid=0:out=1>")
    after = unet.state_dict()
    changed = {key.split(".")[0] for key in before if not torch.equal(before[key], after[key])}
    assert changed == {"up_blocks"}


def test_te1_and_te2_apply_to_their_own_encoder(tmp_path, tiny_checkpoint_factory) -> None:
    engine = make_engine(tmp_path, tiny_checkpoint_factory(Arch.SDXL), Arch.SDXL)
    pipe = engine.model.pipe
    before_1, before_2, before_unet = (
        state(pipe.text_encoder),
        state(pipe.text_encoder_2),
        state(pipe.unet),
    )
    render(engine, "a cat <lora:style:te1=0:te2=1:unet=0>")
    assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in before_1.items())
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before_unet.items())
    render(engine, "a cat <lora:style:te1=1:te2=0:unet=0>")
    assert any(not torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in before_1.items())
    assert all(torch.equal(v, pipe.text_encoder_2.state_dict()[k]) for k, v in before_2.items())
