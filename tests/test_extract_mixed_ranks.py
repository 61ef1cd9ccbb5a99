"""Extracted LoRAs whose modules have different ranks are read right by diffusers: the file has
one alpha for every module (diffusers' `alpha_pattern` misses SD1's mid_block names and falls
back to the global alpha), so `load_lora_weights` + `fuse_lora`, our patcher and the combination
itself (plain diffusers on the source files) agree to 1e-5 of each module's delta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_files import write_kohya_layers
from safetensors import safe_open
from test_extract import SOURCE_RANK, diffusers_fused, load, patched, weights

from webui.arch import Arch
from webui.engine.extract import extract_combination, load_combination
from webui.networks.apply.extract import ExtractedModule, RankRule, lora_state_dict, low_rank

# keeps every rank of a sum of rank-4 LoRAs and drops only float noise: modules touched by one
# source get rank 4, modules touched by both rank 8
NEAR_FULL_ENERGY = 1 - 1e-9


def _readable_by_diffusers(component: str, path: str) -> bool:
    # diffusers reads SDXL's add_embedding only in the SGM layout (see test_extract), and its
    # rank_pattern misses SDXL's te2 text_projection: a rank differing from the file's most common
    # one is refused with a size mismatch (a diffusers limit this file layout cannot avoid)
    return "add_embedding" not in path and "text_projection" not in path


@pytest.fixture(scope="module", params=[Arch.SD1, Arch.SDXL], ids=lambda a: a.value)
def combination(request, tiny_checkpoint_factory, tmp_path_factory):
    """A tiny checkpoint and two rank-4 kohya LoRAs, the second on every third module only."""
    arch: Arch = request.param
    folder = tmp_path_factory.mktemp(f"mixed-{arch.value}")
    model = tiny_checkpoint_factory(arch)
    pipe = load(model).pipe
    loras = []
    for seed, (every, weight) in enumerate([(1, 0.7), (3, -0.4)]):
        path = folder / f"source{seed}.safetensors"
        write_kohya_layers(
            path, pipe, arch, include=_readable_by_diffusers, every=every, seed=seed, std=0.1,
            rank=SOURCE_RANK,
        )  # fmt: skip
        loras.append((path, weight))
    return arch, model, loras


def _delta_errors(
    base: dict[str, torch.Tensor], want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
) -> dict[str, float]:
    """‖got − want‖ / ‖want − base‖ for every tensor the combination changes."""
    errors = {}
    for key, target in want.items():
        delta = (target - base[key]).norm()
        if delta > 0:
            errors[key] = float((got[key] - target).norm() / delta)
    return errors


def test_mixed_rank_file_is_exact_in_diffusers_and_our_patcher(combination, tmp_path: Path) -> None:
    _, model, loras = combination
    out = tmp_path / "mixed.safetensors"
    result = extract_combination(
        model, load_combination(loras), out, RankRule(energy=NEAR_FULL_ENERGY)
    )
    assert {m.rank for m in result.modules} == {4, 8}  # mixed ranks, as the test needs

    with safe_open(str(out), framework="pt") as handle:
        alphas = {float(handle.get_tensor(k)) for k in handle.keys() if k.endswith(".alpha")}  # noqa: SIM118
    assert len(alphas) == 1  # one alpha: no reader needs a per-module pattern

    base = weights(load(model).pipe)
    reference = diffusers_fused(model, loras)
    for reader, got in (
        ("diffusers", diffusers_fused(model, [(out, 1.0)])),
        ("patcher", patched(model, [(out, 1.0)])[0]),
    ):
        errors = _delta_errors(base, reference, got)
        assert len(errors) > 100
        worst = max(errors, key=errors.__getitem__)
        assert errors[worst] < 1e-5, f"{reader}: {worst} off by {errors[worst]:.2e}"


@pytest.mark.parametrize("ranks", [(2, 5, 3), (4, 4)])
def test_alpha_folding_keeps_the_product(ranks: tuple[int, ...]) -> None:
    """(alpha/rank) · up @ down is each module's delta, whatever the other modules' ranks."""
    generator = torch.Generator().manual_seed(0)
    modules = []
    for i, rank in enumerate(ranks):
        delta = torch.randn(12, rank, generator=generator) @ torch.randn(
            rank, 10, generator=generator
        )
        modules.append((delta, ExtractedModule(f"m{i}", low_rank(delta, RankRule(rank=rank)))))
    state = lora_state_dict(m for _, m in modules)
    for delta, module in modules:
        up, down = state[f"{module.name}.lora_up.weight"], state[f"{module.name}.lora_down.weight"]
        alpha = float(state[f"{module.name}.alpha"])
        assert alpha == max(ranks)
        rebuilt = (alpha / down.shape[0]) * up @ down
        assert float((rebuilt - delta).norm() / delta.norm()) < 1e-5
