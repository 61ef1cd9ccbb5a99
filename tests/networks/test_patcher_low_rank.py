"""The patcher's low-rank fast path (one addmm per module for every LoRA/LoCon on it) against
LyCORIS' own merges: several networks on one module, Linear and 3x3 conv (plain and Tucker),
fp32 and fp16 weights, and low-rank networks mixed on one module with LoHa and DoRA (which take
the full-size path).

Each network is a LyCORIS module built around its own copy of the target layer; its state dict
is the file, its `merge_to(m)` the reference. The expected weight is the original plus the sum
of every network's merged change, in fp64.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from lora_files import one_torch_thread, randomise
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule as LycorisLoha
from safetensors.torch import save_file
from torch import Tensor, nn

from webui.arch import Arch
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.networks.apply.patcher import NetworkPatcher
from webui.networks.format.modules import LoraModule
from webui.networks.format.network import load_network

# Target layers of the tiny SD1 UNet, by kind.
TARGETS = {
    "linear": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "conv3x3": "down_blocks.0.resnets.0.conv1",
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@cache
def base_pipeline() -> DiffusionPipeline:
    torch.manual_seed(0)
    return build_pipeline(ModelSpec(Arch.SD1))


def unet_copy(dtype: torch.dtype = torch.float32) -> types.SimpleNamespace:
    """A pipeline-like object with a copy of the tiny UNet only (all these tests patch)."""
    return types.SimpleNamespace(unet=copy.deepcopy(base_pipeline().unet).to(dtype=dtype))


@dataclass(frozen=True)
class Trained:
    """One trained network on one layer: the file's tensors and the weight its trainer merges."""

    tensors: dict[str, Tensor]
    merge: Callable[[float], Tensor]


# LyCORIS modules; LoHa with alpha == rank, because LyCORIS 4.1.3's LoHa merge_to applies
# alpha/rank twice (see test_module_math): at a scale of 1 its merge is the trainer's math.
ALGOS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "lora": lambda layer: LoConModule("x", layer, 1.0, lora_dim=4, alpha=2),
    "lora rank 8": lambda layer: LoConModule("x", layer, 1.0, lora_dim=8, alpha=4),
    "tucker": lambda layer: LoConModule("x", layer, 1.0, lora_dim=4, alpha=2, use_tucker=True),
    "dora": lambda layer: LoConModule("x", layer, 1.0, lora_dim=4, alpha=2, weight_decompose=True),
    "loha": lambda layer: LycorisLoha("x", layer, 1.0, lora_dim=4, alpha=4),
}


def train(algo: str, layer: nn.Module, seed: int) -> Trained:
    """A LyCORIS `algo` module around a copy of `layer` (fp32), randomised."""
    own = copy.deepcopy(layer).float()
    torch.manual_seed(seed)
    module = ALGOS[algo](own)
    randomise(module)
    tensors = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    original = own.weight.detach().clone()

    @torch.no_grad()
    def merge(multiplier: float) -> Tensor:
        own.weight.copy_(original)
        module.merge_to(multiplier)
        return own.weight.detach().clone()

    return Trained(tensors, merge)


def prefix(kind: str) -> str:
    return "lora_unet_" + TARGETS[kind].replace(".", "_")


def write(path: Path, kind: str, trained: Trained) -> Path:
    save_file({f"{prefix(kind)}.{k}": v for k, v in trained.tensors.items()}, str(path))
    return path


def expected(original: Tensor, set_: list[tuple[Trained, float]]) -> Tensor:
    """original + Σ (trainer's merged weight − original), in fp64."""
    total = original.double()
    for trained, multiplier in set_:
        total += trained.merge(multiplier).double() - original.double()
    return total


SETS = {
    "three loras": ("lora", "lora rank 8", "lora"),
    "loras and tucker": ("tucker", "lora", "tucker"),
    "lora, loha, lora": ("lora", "loha", "lora rank 8"),
    "dora and lora": ("dora", "lora", "lora rank 8"),
}
CASES = [
    pytest.param(kind, name, dtype, id=f"{kind}-{name}-{str(dtype).removeprefix('torch.')}")
    for kind in TARGETS
    for name in SETS
    if not (kind == "linear" and "tucker" in name)  # Tucker is a conv factorisation
    for dtype in (torch.float32, torch.float16)
]
MULTIPLIERS = (0.8, 0.6, -0.5)


@pytest.mark.parametrize(("kind", "name", "dtype"), CASES)
def test_several_networks_on_one_module_match_lycoris(
    kind: str, name: str, dtype: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = unet_copy(dtype)
    layer = pipe.unet.get_submodule(TARGETS[kind])
    base = layer.weight.detach().clone()
    trained = [train(algo, layer, seed) for seed, algo in enumerate(SETS[name])]
    networks = [
        load_network(write(tmp_path / f"{i}.safetensors", kind, t)) for i, t in enumerate(trained)
    ]
    fast = [0]
    original_factors = LoraModule.low_rank_factors

    def counting(self: LoraModule, *args: Any, **kwargs: Any) -> Any:
        factors = original_factors(self, *args, **kwargs)
        fast[0] += factors is not None
        return factors

    monkeypatch.setattr(LoraModule, "low_rank_factors", counting)

    patcher = NetworkPatcher(pipe)
    report = patcher.apply(list(zip(networks, MULTIPLIERS, strict=True)))
    assert report.modules_changed == 1
    assert [r.matched for r in report.networks] == [(prefix(kind),)] * 3
    assert fast[0] == sum(algo not in ("loha", "dora") for algo in SETS[name])

    want = expected(base, list(zip(trained, MULTIPLIERS, strict=True)))
    got = layer.weight.detach()
    assert got.dtype == dtype
    if dtype == torch.float32:
        tolerance = 1e-5 * want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=tolerance)
    else:
        # fp32 accumulation written once: the fp16 rounding of the exact sum, give or take the
        # last bit where the fp32 sum sits next to a rounding boundary.
        rounded = want.to(torch.float16)
        ulp = (rounded.float().abs() * 2.0**-10).clamp_min(2.0**-24)
        assert ((got.float() - rounded.float()).abs() <= ulp).all()
        assert (got == rounded).float().mean() > 0.98

    patcher.restore()
    assert torch.equal(layer.weight, base)


def test_switching_one_network_rewrites_the_module_from_its_original(
    tmp_path: Path,
) -> None:
    """A switch recomputes from the original: the result is what a fresh apply gives, bit for
    bit, not the previous weights plus a difference."""
    pipe = unet_copy()
    layer = pipe.unet.get_submodule(TARGETS["conv3x3"])
    base = layer.weight.detach().clone()
    trained = [train("lora", layer, seed) for seed in range(4)]
    a, b, c, d = (
        load_network(write(tmp_path / f"{i}.safetensors", "conv3x3", t))
        for i, t in enumerate(trained)
    )
    patcher = NetworkPatcher(pipe)
    patcher.apply([(a, 0.8), (b, 0.6), (c, 0.5)])
    patcher.apply([(a, 0.8), (b, 0.6), (d, 0.5)])
    switched = layer.weight.detach().clone()

    fresh = unet_copy()
    NetworkPatcher(fresh).apply([(a, 0.8), (b, 0.6), (d, 0.5)])
    assert torch.equal(switched, fresh.unet.get_submodule(TARGETS["conv3x3"]).weight)
    want = expected(base, [(trained[0], 0.8), (trained[1], 0.6), (trained[3], 0.5)])
    tolerance = 1e-5 * want.abs().max().item()
    torch.testing.assert_close(switched.double(), want, rtol=1e-5, atol=tolerance)
