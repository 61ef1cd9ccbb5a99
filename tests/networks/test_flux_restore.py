"""Issue 18: restore on FLUX.1 models is bit-exact, fp8 included. Tiny FLUX.1 [dev] checkpoints
are written as real bf16 and float8_e4m3fn files and loaded back through the user's path (fp8
upcast to the compute dtype: fp32 on the CPU, bf16 on a GPU), then LoRAs in kohya's FLUX.1
names (fused `qkv` / `linear1` included) are applied, switched, and made to fail part-way.

The references are the files' own values: every weight is compared byte for byte with the
model as loaded, and with the original weights rounded to the file's dtype (so fp8 models get
back exactly their fp8 values). The applied fp8 weights are checked against base + delta
computed by hand in the compute dtype: the delta is never rounded to fp8."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_files import one_torch_thread
from safetensors.torch import save_file
from torch import Tensor

from webui.arch import Arch, FluxVariant
from webui.engine.checkpoints import (
    ModelKind,
    checkpoint_from_path,
    load_checkpoint,
    save_single_file,
)
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.networks.apply.apply_errors import NetworkApplyError
from webui.networks.apply.patcher import NetworkPatcher
from webui.networks.format.modules import LoraModule
from webui.networks.format.network import Network, read_network

CPU = torch.device("cpu")
FP8 = torch.float8_e4m3fn
FP32_EPS = torch.finfo(torch.float32).eps
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")
KIND = ModelKind(Arch.FLUX1, None, variant=FluxVariant.DEV)


@dataclass(frozen=True)
class Case:
    """A checkpoint file's dtype and the dtype the model computes in once loaded."""

    file: torch.dtype
    compute: torch.dtype

    @property
    def id(self) -> str:
        return (
            f"{str(self.file).removeprefix('torch.')}-as-{str(self.compute).removeprefix('torch.')}"
        )


CASES = [
    Case(torch.bfloat16, torch.bfloat16),
    Case(FP8, torch.float32),  # the CPU's rule for fp8 files
    Case(FP8, torch.bfloat16),  # a GPU's
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@cache
def original() -> Any:
    return build_pipeline(ModelSpec(Arch.FLUX1, variant=FluxVariant.DEV), seed=3)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Case], Any]:
    """The tiny model written in the case's file dtype and loaded back (cached per case)."""
    folder = tmp_path_factory.mktemp("flux-restore")
    models: dict[Case, Any] = {}

    def of(case: Case) -> Any:
        if case not in models:
            path = folder / f"flux-{case.id}.safetensors"
            if not path.exists():
                save_single_file(original(), KIND, path, embed_configs=True, dtype=case.file)
            models[case] = load_checkpoint(checkpoint_from_path(path), CPU, case.compute).pipe
        return models[case]

    return of


def raw(tensor: Tensor) -> Tensor:
    """A tensor's bytes: equal bytes are bit-exact equality whatever the dtype (-0.0, NaN)."""
    return tensor.detach().contiguous().view(torch.uint8)


def snapshot(pipe: Any) -> dict[str, Tensor]:
    return {
        f"{name}.{key}": tensor.detach().clone()
        for name in COMPONENTS
        for key, tensor in getattr(pipe, name).state_dict().items()
    }


def differing(pipe: Any, expected: dict[str, Tensor]) -> list[str]:
    """Keys whose bytes or dtype differ from `expected`."""
    now = snapshot(pipe)
    assert now.keys() == expected.keys()
    return sorted(
        k
        for k, t in now.items()
        if t.dtype != expected[k].dtype or not torch.equal(raw(t), raw(expected[k]))
    )


def file_values(case: Case) -> dict[str, Tensor]:
    """What the file holds, as the model should hold it: the original weights rounded to the
    file's dtype, then upcast (exact) to the compute dtype. Independent of the patcher."""
    return {
        key: tensor.to(case.file).to(case.compute) for key, tensor in snapshot(original()).items()
    }


# -- LoRA files in kohya's FLUX.1 names -----------------------------------------------------------


def _hidden(transformer: Any) -> int:
    return transformer.config.num_attention_heads * transformer.config.attention_head_dim


def bfl_modules(transformer: Any) -> dict[str, tuple[int, int]]:
    """BFL module names of the tiny transformer (sd-scripts' FLUX.1 targets) and the fused
    weight's shape, from BFL's layout: qkv = 3 x hidden rows, linear1 = 3 x hidden + MLP."""
    hidden = _hidden(transformer)
    mlp = transformer.single_transformer_blocks[0].proj_mlp.out_features
    modules: dict[str, tuple[int, int]] = {}
    for i, block in enumerate(transformer.transformer_blocks):
        for stream, ff, mod in (("img", block.ff, block.norm1), ("txt", block.ff_context, None)):
            modules[f"double_blocks.{i}.{stream}_attn.qkv"] = (3 * hidden, hidden)
            modules[f"double_blocks.{i}.{stream}_attn.proj"] = (hidden, hidden)
            modules[f"double_blocks.{i}.{stream}_mlp.0"] = tuple(ff.net[0].proj.weight.shape)
            modules[f"double_blocks.{i}.{stream}_mlp.2"] = tuple(ff.net[2].weight.shape)
            norm = mod if mod is not None else block.norm1_context
            modules[f"double_blocks.{i}.{stream}_mod.lin"] = tuple(norm.linear.weight.shape)
    for i, block in enumerate(transformer.single_transformer_blocks):
        modules[f"single_blocks.{i}.linear1"] = (3 * hidden + mlp, hidden)
        modules[f"single_blocks.{i}.linear2"] = tuple(block.proj_out.weight.shape)
        modules[f"single_blocks.{i}.modulation.lin"] = tuple(block.norm.linear.weight.shape)
    return modules


def factors(seed: int, shape: tuple[int, int], rank: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(shape[0], rank, generator=g) * 0.1
    down = torch.randn(rank, shape[1], generator=g) * 0.1
    return up, down


def write_kohya(
    path: Path,
    modules: dict[str, tuple[int, int]],
    *,
    seed: int,
    rank: int = 4,
    alpha: float = 2.0,
    clip: bool = False,
) -> Path:
    tensors: dict[str, Tensor] = {}
    for i, (bfl, shape) in enumerate(modules.items()):
        key = "lora_unet_" + bfl.replace(".", "_")
        up, down = factors(seed * 1000 + i, shape, rank)
        tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"] = up, down
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    if clip:  # a CLIP-L module too, so the text encoders are part of what must come back
        width = original().text_encoder.config.hidden_size
        key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
        up, down = factors(seed * 1000 + 999, (width, width), rank)
        tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"] = up, down
    save_file(tensors, str(path), metadata={"ss_base_model_version": "flux1"})
    return path


@pytest.fixture(scope="module")
def networks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Network]:
    """A: every module, and CLIP-L; B: double blocks; C: single blocks (rank 2); D: every module,
    other values (C's replacement in a switch)."""
    folder = tmp_path_factory.mktemp("flux-restore-loras")
    every = bfl_modules(original().transformer)
    double = {k: v for k, v in every.items() if k.startswith("double")}
    single = {k: v for k, v in every.items() if k.startswith("single")}
    paths = {
        "a": write_kohya(folder / "a.safetensors", every, seed=1, clip=True),
        "b": write_kohya(folder / "b.safetensors", double, seed=2, alpha=8.0),
        "c": write_kohya(folder / "c.safetensors", single, seed=3, rank=2),
        "d": write_kohya(folder / "d.safetensors", every, seed=4),
    }
    return {name: read_network(path) for name, path in paths.items()}


def fresh(loaded: Callable[[Case], Any], case: Case) -> Any:
    return copy.deepcopy(loaded(case))


# -- restore --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_restore_after_apply_and_after_switch_is_bit_exact(
    loaded: Callable[[Case], Any], networks: dict[str, Network], case: Case
) -> None:
    pipe = fresh(loaded, case)
    base = snapshot(pipe)
    assert not differing(pipe, file_values(case))  # the model holds exactly the file's values
    a, b, c, d = (networks[n] for n in "abcd")
    patcher = NetworkPatcher(pipe, Arch.FLUX1)

    report = patcher.apply([(a, 0.8), (b, 0.6), (c, 0.5)])
    assert not report.warnings, report.warnings
    changed = differing(pipe, base)
    # every split target of the fused qkv / linear1, and CLIP-L, were written
    for key in (
        "transformer.transformer_blocks.1.attn.add_v_proj.weight",
        "transformer.single_transformer_blocks.0.proj_mlp.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight",
    ):
        short = key.replace("text_model.", "") if key not in base else key
        assert short in changed, short
    patcher.restore()
    assert differing(pipe, base) == []

    patcher.apply([(a, 0.8), (b, 0.6), (c, 0.5)])
    patcher.apply([(a, 0.8), (b, 0.6), (d, 0.5)])  # switch: C out, D in
    patcher.apply([(a, 0.4), (d, 1.0)])  # and again, B out, strengths changed
    patcher.restore()
    assert differing(pipe, base) == []
    assert differing(pipe, file_values(case)) == []


@dataclass
class Failing:
    """Makes the n-th LoRA delta computed raise, counting the modules written before it."""

    at: int
    calls: int = 0
    written_before: int | None = None
    written: int = 0

    def progress(self, done: int, total: int) -> None:
        self.written = done


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], Failing]:
    def arm(at: int) -> Failing:
        plan = Failing(at)
        factors_of = LoraModule.low_rank_factors

        def low_rank_factors(self: LoraModule, *args: Any, **kwargs: Any) -> Any:
            plan.calls += 1
            if plan.calls == plan.at:
                plan.written_before = plan.written
                raise RuntimeError("delta failed")
            return factors_of(self, *args, **kwargs)

        monkeypatch.setattr(LoraModule, "low_rank_factors", low_rank_factors)
        return plan

    return arm


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_delta_failing_part_way_leaves_the_previous_weights_bit_exact(
    loaded: Callable[[Case], Any],
    networks: dict[str, Network],
    failing: Callable[[int], Failing],
    case: Case,
) -> None:
    pipe = fresh(loaded, case)
    base = snapshot(pipe)
    a, b, c, d = (networks[n] for n in "abcd")
    patcher = NetworkPatcher(pipe, Arch.FLUX1)

    # from the base: the failure comes after modules were written, and all of them come back
    plan = failing(40)
    with pytest.raises(NetworkApplyError, match="delta failed"):
        patcher.apply([(a, 0.8), (b, 0.6), (c, 0.5)], on_progress=plan.progress)
    assert plan.written_before, "the failure should come after some modules were written"
    assert differing(pipe, base) == []
    assert patcher.current_set == ()

    # during a switch: the previous set's weights come back exactly
    plan.at, plan.calls = 10**9, 0  # disarmed
    patcher.apply([(a, 0.8), (b, 0.6), (c, 0.5)])
    applied = snapshot(pipe)
    plan.at, plan.calls, plan.written = 30, 0, 0
    with pytest.raises(NetworkApplyError, match="delta failed"):
        patcher.apply([(a, 0.8), (b, 0.6), (d, 0.5)], on_progress=plan.progress)
    assert plan.written_before
    assert differing(pipe, applied) == []
    assert [n.name for n, _ in patcher.current_set] == ["a", "b", "c"]
    patcher.restore()
    assert differing(pipe, base) == []
    assert differing(pipe, file_values(case)) == []


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError], ids=lambda e: e.__name__)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_an_interrupt_from_the_progress_callback_rolls_back_bit_exact(
    loaded: Callable[[Case], Any],
    networks: dict[str, Network],
    case: Case,
    interrupt: type[BaseException],
) -> None:
    """The engine interrupts an apply by raising from its `on_progress` callback."""
    pipe = fresh(loaded, case)
    base = snapshot(pipe)
    a, b, c, d = (networks[n] for n in "abcd")
    patcher = NetworkPatcher(pipe, Arch.FLUX1)

    def stop_at(n: int) -> Callable[[int, int], None]:
        def progress(done: int, total: int) -> None:
            if done == n:
                raise interrupt("interrupted")

        return progress

    with pytest.raises(interrupt):
        patcher.apply([(a, 0.8), (b, 0.6)], on_progress=stop_at(30))
    assert differing(pipe, base) == []

    patcher.apply([(a, 0.8), (b, 0.6), (c, 0.5)])
    applied = snapshot(pipe)
    with pytest.raises(interrupt):
        patcher.apply([(a, 0.8), (b, 0.6), (d, 0.5)], on_progress=stop_at(25))
    assert differing(pipe, applied) == []
    patcher.restore()
    assert differing(pipe, base) == []


# -- fp8: the delta is added in the compute dtype, never rounded to fp8 -------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c.file == FP8], ids=lambda c: c.id)
def test_lora_on_fp8_model_is_base_plus_delta_in_the_compute_dtype(
    loaded: Callable[[Case], Any], tmp_path: Path, case: Case
) -> None:
    pipe = fresh(loaded, case)
    transformer = pipe.transformer
    hidden = _hidden(transformer)
    rank, alpha, multiplier = 4, 2.0, 0.7
    shapes = bfl_modules(transformer)
    chosen = ("double_blocks.0.img_attn.qkv", "double_blocks.1.img_mlp.0")
    path = write_kohya(tmp_path / "f.safetensors", {k: shapes[k] for k in chosen}, seed=7)
    # the file's own factors, as written (write_kohya's seeds)
    qkv_up, qkv_down = factors(7000, shapes[chosen[0]], rank)
    mlp_up, mlp_down = factors(7001, shapes[chosen[1]], rank)
    scale = multiplier * alpha / rank
    qkv_delta = scale * (qkv_up @ qkv_down)  # fp32, by hand, on BFL's fused rows [q; k; v]
    deltas = {
        "transformer_blocks.0.attn.to_q.weight": qkv_delta[:hidden],
        "transformer_blocks.0.attn.to_k.weight": qkv_delta[hidden : 2 * hidden],
        "transformer_blocks.0.attn.to_v.weight": qkv_delta[2 * hidden :],
        "transformer_blocks.1.ff.net.0.proj.weight": scale * (mlp_up @ mlp_down),
    }
    base = {k: v.to(FP8).to(torch.float32) for k, v in original().transformer.state_dict().items()}

    patcher = NetworkPatcher(pipe, Arch.FLUX1)
    patcher.apply([(read_network(path), multiplier)])
    after = transformer.state_dict()
    for key, delta in deltas.items():
        got = after[key]
        assert got.dtype == case.compute, key
        want = (base[key] + delta).to(case.compute).float()
        # one rounding to the compute dtype, plus the fp32 product's summation order
        step = torch.finfo(case.compute).eps * want.abs() + 4 * FP32_EPS * want.abs().max()
        assert ((got.float() - want).abs() <= step).all(), key
        # an fp8 rounding of the patched weight (or of the delta) is ~16x a bf16 step: it would
        # not pass the check above; and the patched values are mostly not fp8 values at all
        assert (got.float().to(FP8).float() != got.float()).float().mean() > 0.5, key
    patcher.restore()
    assert differing(pipe, file_values(case)) == []
