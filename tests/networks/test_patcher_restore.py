"""The patcher's bookkeeping: exact restore, incremental switching, rollback on errors and
interrupts, per-component strengths, incompatible bases, fp16 models.

The networks are plain kohya LoRAs written by hand (`lora_files.write_kohya_layers`); the math
of every variant is checked against the trainers in test_patcher_reference.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from lora_files import BASE_MODEL_VERSION, one_torch_thread, write_kohya_layers
from pipeline_copies import pipeline_copy
from torch import Tensor, nn

from webui.arch import Arch
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.networks.apply.apply_errors import NetworkApplyError
from webui.networks.apply.keys import Component, KeyMap
from webui.networks.apply.patcher import NetworkPatcher
from webui.networks.apply.strengths import Strengths
from webui.networks.format.modules import LoraModule
from webui.networks.format.network import Network, load_network

ARCHS = [pytest.param(Arch.SD1, id="sd1"), pytest.param(Arch.SDXL, id="sdxl")]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@cache
def base_pipeline(arch: Arch) -> DiffusionPipeline:
    torch.manual_seed(0)
    return build_pipeline(ModelSpec(arch))


@pytest.fixture
def pipe(request: pytest.FixtureRequest) -> DiffusionPipeline:
    """A fresh copy of the tiny pipeline of the test's `arch` parameter."""
    return pipeline_copy(base_pipeline(request.node.callspec.params["arch"]))


def snapshot(pipe: Any) -> dict[str, Tensor]:
    """Every parameter and buffer of every torch component, copied."""
    state: dict[str, Tensor] = {}
    for name, component in vars(pipe).items():
        if isinstance(component, nn.Module):
            for key, tensor in component.state_dict(keep_vars=True).items():
                state[f"{name}.{key}"] = tensor.detach().clone()
    return state


def differing(pipe: Any, expected: dict[str, Tensor]) -> list[str]:
    """The keys whose tensors are not bit-identical to `expected` (dtype included)."""
    now = snapshot(pipe)
    assert set(now) == set(expected)
    return sorted(
        k for k, t in now.items() if t.dtype != expected[k].dtype or not torch.equal(t, expected[k])
    )


def in_component(keys: list[str], *components: str) -> list[str]:
    return [k for k in keys if k.split(".", 1)[0] in components]


# Three networks with overlapping coverage: A touches every Linear/Conv2d, B the attention
# layers, C the text encoders' attention and the UNet's ResNets (so B ∩ C is text attention).
def _everything(component: str, path: str) -> bool:
    return True


def _attention(component: str, path: str) -> bool:
    return ".attn" in path or "self_attn" in path


def _text_attention_and_resnets(component: str, path: str) -> bool:
    return "self_attn" in path if component != "unet" else ".resnets." in path


@dataclass(frozen=True)
class Networks:
    a: Network
    b: Network
    c: Network


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loras")


def _write(directory: Path, name: str, arch: Arch, **kwargs: Any) -> Network:
    path = directory / f"{name}-{arch.value}.safetensors"
    if not path.exists():
        metadata = {"ss_base_model_version": BASE_MODEL_VERSION[arch]}
        write_kohya_layers(path, base_pipeline(arch), arch, metadata=metadata, **kwargs)
    return load_network(path)


@pytest.fixture
def nets(request: pytest.FixtureRequest, lora_dir: Path) -> Networks:
    arch = request.node.callspec.params["arch"]
    return Networks(
        _write(lora_dir, "a", arch, include=_everything, seed=1),
        _write(lora_dir, "b", arch, include=_attention, seed=2, alpha=8.0),
        _write(lora_dir, "c", arch, include=_text_attention_and_resnets, seed=3, rank=2),
    )


@dataclass
class DeltaCalls:
    """Computations of a LoraModule's delta (full-size `weight_delta` or `low_rank_factors`), by
    module key; can raise on the N-th call."""

    keys: list[str]
    fail_at: int | None = None
    error: Callable[[], BaseException] = lambda: RuntimeError("injected failure")
    raised_at: int | None = None  # the call that raised

    def __len__(self) -> int:
        return len(self.keys)


@pytest.fixture
def delta_calls(monkeypatch: pytest.MonkeyPatch) -> DeltaCalls:
    calls = DeltaCalls([])

    def counting(method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: LoraModule, *args: Any, **kwargs: Any) -> Any:
            calls.keys.append(self.key)
            if calls.fail_at is not None and len(calls.keys) == calls.fail_at:
                calls.raised_at = len(calls.keys)
                raise calls.error()
            return method(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(LoraModule, "weight_delta", counting(LoraModule.weight_delta))
    monkeypatch.setattr(LoraModule, "low_rank_factors", counting(LoraModule.low_rank_factors))
    return calls


def touched(pipe: Any, network: Network) -> set[tuple[Component, str]]:
    """The (component, module path) pairs a network's prefixes name in `pipe`."""
    keymap = KeyMap.from_pipeline(pipe)
    refs = [keymap.resolve(prefix) for prefix in network.modules]
    assert all(ref is not None for ref in refs)
    return {(ref.component, ref.path) for ref in refs if ref is not None}


def fresh_apply(arch: Arch, entries: list[tuple[Network, Any]]) -> dict[str, Tensor]:
    """The weights a brand-new patcher gives a brand-new model for `entries`."""
    other = pipeline_copy(base_pipeline(arch))
    NetworkPatcher(other, arch).apply(entries)
    return snapshot(other)


@pytest.mark.parametrize("arch", ARCHS)
def test_restore_is_bit_exact_after_apply(arch: Arch, pipe: Any, nets: Networks) -> None:
    base = snapshot(pipe)
    patcher = NetworkPatcher(pipe, arch)
    report = patcher.apply([(nets.a, 0.8), (nets.b, Strengths(te=0.5, unet=1.0))])
    assert all(r.applied and not r.unmatched for r in report.networks)
    assert in_component(differing(pipe, base), "unet")
    assert in_component(differing(pipe, base), "text_encoder")
    patcher.restore()
    assert differing(pipe, base) == []
    assert patcher.patched_modules == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_switching_sets_lands_on_the_new_set_and_restores(
    arch: Arch, pipe: Any, nets: Networks
) -> None:
    base = snapshot(pipe)
    patcher = NetworkPatcher(pipe, arch)
    patcher.apply([(nets.a, 1.0)])
    assert differing(pipe, fresh_apply(arch, [(nets.a, 1.0)])) == []
    patcher.apply([(nets.a, 1.0), (nets.b, 0.6)])
    assert differing(pipe, fresh_apply(arch, [(nets.a, 1.0), (nets.b, 0.6)])) == []
    report = patcher.apply([(nets.b, 0.6)])
    assert differing(pipe, fresh_apply(arch, [(nets.b, 0.6)])) == []
    assert report.modules_changed == len(touched(pipe, nets.a))  # B's are a subset of A's
    assert patcher.patched_modules == len(touched(pipe, nets.b))
    patcher.restore()
    assert differing(pipe, base) == []


FAILURES = [
    # a network's failing delta math is blamed on it; interrupts pass as they are
    pytest.param(lambda: RuntimeError("injected failure"), NetworkApplyError, id="exception"),
    pytest.param(KeyboardInterrupt, KeyboardInterrupt, id="interrupt"),
]
FAIL_AT = ["middle", "last"]


@pytest.mark.parametrize("fail_at", FAIL_AT)
@pytest.mark.parametrize(("error", "error_type"), FAILURES)
@pytest.mark.parametrize("previous", ["base", "patched"])
@pytest.mark.parametrize("arch", ARCHS)
def test_failure_mid_apply_leaves_the_model_as_before(
    arch: Arch,
    previous: str,
    error: Callable[[], BaseException],
    error_type: type[BaseException],
    fail_at: str,
    pipe: Any,
    nets: Networks,
    delta_calls: DeltaCalls,
) -> None:
    base = snapshot(pipe)
    patcher = NetworkPatcher(pipe, arch)
    if previous == "patched":
        patcher.apply([(nets.a, 1.0), (nets.c, 0.5)])
        # The failing call drops A and C from modules only they touch and changes the rest.
        failing = [(nets.b, 0.5), (nets.c, 1.0)]
    else:
        failing = [(nets.a, 1.0), (nets.b, 0.5)]
    before = snapshot(pipe)
    modules_before = patcher.patched_modules
    calls = sum(len(network.modules) for network, _ in failing)
    delta_calls.keys.clear()
    delta_calls.fail_at = {"first": 1, "middle": calls // 2, "last": calls}[fail_at]
    delta_calls.error = error

    with pytest.raises(error_type):
        patcher.apply(failing)

    assert delta_calls.raised_at == delta_calls.fail_at  # it failed part-way, at that call
    assert differing(pipe, before) == []
    patched_after_failure = patcher.patched_modules
    delta_calls.fail_at = None
    patcher.restore()
    assert differing(pipe, base) == []
    assert patched_after_failure == modules_before


@pytest.mark.parametrize("fail_at", FAIL_AT)
@pytest.mark.parametrize("arch", ARCHS)
def test_apply_after_a_failed_apply_gives_the_set(
    arch: Arch, fail_at: str, pipe: Any, nets: Networks, delta_calls: DeltaCalls
) -> None:
    """A failed call must not leave the patcher believing modules hold what it never wrote."""
    patcher = NetworkPatcher(pipe, arch)
    patcher.apply([(nets.a, 1.0), (nets.c, 0.5)])
    failing = [(nets.b, 0.5), (nets.c, 1.0)]
    calls = sum(len(network.modules) for network, _ in failing)
    delta_calls.fail_at = (
        len(delta_calls) + {"first": 1, "middle": calls // 2, "last": calls}[fail_at]
    )
    with pytest.raises(NetworkApplyError):
        patcher.apply(failing)
    delta_calls.fail_at = None

    patcher.apply(failing)
    assert differing(pipe, fresh_apply(arch, failing)) == []
    patcher.apply([(nets.a, 1.0), (nets.c, 0.5)])
    assert differing(pipe, fresh_apply(arch, [(nets.a, 1.0), (nets.c, 0.5)])) == []


@dataclass(frozen=True)
class Ramp:
    """A strength going from `start` to `end` over the run (a StepSchedule)."""

    start: float
    end: float

    def value_at(self, step: int, total_steps: int) -> float:
        return self.start + (self.end - self.start) * (step - 1) / max(total_steps - 1, 1)


@pytest.mark.parametrize("arch", [pytest.param(Arch.SD1, id="sd1")])
def test_a_failed_apply_does_not_become_the_current_set(
    arch: Arch, pipe: Any, nets: Networks, delta_calls: DeltaCalls
) -> None:
    """The engine calls set_step while is_scheduled: a set that failed to apply must not be
    re-applied step by step as if it had succeeded."""
    patcher = NetworkPatcher(pipe, arch)
    patcher.apply([(nets.a, 1.0)])
    before = snapshot(pipe)
    delta_calls.fail_at = len(delta_calls) + 1
    with pytest.raises(NetworkApplyError):
        patcher.apply([(nets.b, Strengths(te=Ramp(0.0, 1.0), unet=Ramp(1.0, 0.0)))])
    delta_calls.fail_at = None

    assert not patcher.is_scheduled
    assert patcher.set_step(2, 10) is None
    assert differing(pipe, before) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_identical_set_recomputes_nothing(
    arch: Arch, pipe: Any, nets: Networks, delta_calls: DeltaCalls
) -> None:
    patcher = NetworkPatcher(pipe, arch)
    first = patcher.apply([(nets.a, 0.8), (nets.b, Strengths(te=0.5, unet=1.0))])
    assert first.modules_changed == len(touched(pipe, nets.a))
    assert len(delta_calls) == len(nets.a.modules) + len(nets.b.modules)
    patched = snapshot(pipe)

    delta_calls.keys.clear()
    again = patcher.apply([(nets.a, 0.8), (nets.b, Strengths(te=0.5, unet=1.0))])
    assert len(delta_calls) == 0
    assert again.modules_changed == 0
    assert differing(pipe, patched) == []
    assert [r.matched for r in again.networks] == [r.matched for r in first.networks]


@pytest.mark.parametrize("arch", ARCHS)
def test_changing_one_strength_recomputes_only_its_modules(
    arch: Arch, pipe: Any, nets: Networks, delta_calls: DeltaCalls
) -> None:
    patcher = NetworkPatcher(pipe, arch)
    patcher.apply([(nets.a, 1.0), (nets.b, 1.0), (nets.c, 1.0)])
    by_network = {name: touched(pipe, getattr(nets, name)) for name in ("a", "b", "c")}
    assert by_network["b"] & by_network["c"], "the set should overlap on some modules"
    assert by_network["c"] - by_network["b"], "C should touch modules B does not"

    delta_calls.keys.clear()
    report = patcher.apply([(nets.a, 1.0), (nets.b, 0.5), (nets.c, 1.0)])
    # Every contribution on a module B touches is recomputed (the module is rewritten whole),
    # nothing else is.
    expected = sum(
        sum(module in modules for modules in by_network.values()) for module in by_network["b"]
    )
    assert report.modules_changed == len(by_network["b"])
    assert len(delta_calls) == expected
    recomputed = {prefix for prefix in delta_calls.keys if prefix in nets.c.modules}
    keymap = KeyMap.from_pipeline(pipe)
    for prefix in recomputed:
        ref = keymap.resolve(prefix)
        assert ref is not None and (ref.component, ref.path) in by_network["b"]
    assert differing(pipe, fresh_apply(arch, [(nets.a, 1.0), (nets.b, 0.5), (nets.c, 1.0)])) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_text_encoder_strength_zero_leaves_text_encoders_untouched(
    arch: Arch, pipe: Any, nets: Networks
) -> None:
    base = snapshot(pipe)
    NetworkPatcher(pipe, arch).apply([(nets.a, Strengths(te=0, unet=1))])
    changed = differing(pipe, base)
    assert in_component(changed, *TEXT_ENCODERS) == []
    assert in_component(changed, "unet")


@pytest.mark.parametrize("arch", [pytest.param(Arch.SDXL, id="sdxl")])
def test_sdxl_strength_per_text_encoder(arch: Arch, pipe: Any, nets: Networks) -> None:
    base = snapshot(pipe)
    # unet=0 too, so that only text_encoder may change.
    NetworkPatcher(pipe, arch).apply([(nets.a, Strengths(te1=0.5, te2=0, unet=0))])
    changed = differing(pipe, base)
    assert changed and in_component(changed, "text_encoder") == changed
    # te1 at 0.5 is what a uniform 0.5 gives text_encoder.
    uniform = fresh_apply(arch, [(nets.a, 0.5)])
    now = snapshot(pipe)
    for key in in_component(list(now), "text_encoder"):
        assert torch.equal(now[key], uniform[key]), key


def test_network_for_another_base_is_not_applied(
    lora_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arch = Arch.SD1
    pipe = pipeline_copy(base_pipeline(arch))
    path = lora_dir / "made-for-sdxl.safetensors"
    # SD1 keys, but the trainer's metadata says SDXL: metadata wins, and the keys do not fit.
    write_kohya_layers(
        path, pipe, arch, metadata={"ss_base_model_version": BASE_MODEL_VERSION[Arch.SDXL]}
    )
    with caplog.at_level(logging.WARNING):
        network = load_network(path)
    assert network.base.arch is Arch.SDXL
    good = _write(lora_dir, "a", arch, include=_everything, seed=1)
    base = snapshot(pipe)

    report = NetworkPatcher(pipe, arch).apply([(network, 1.0)])
    (net_report,) = report.networks
    assert not net_report.compatible and not net_report.applied
    assert net_report.base is Arch.SDXL
    assert report.modules_changed == 0
    assert differing(pipe, base) == []
    assert len(report.warnings) == 1
    assert "made-for-sdxl" in report.warnings[0] and "sdxl" in report.warnings[0]

    # In a set, the incompatible one is skipped and the others apply.
    mixed = NetworkPatcher(pipe, arch).apply([(network, 1.0), (good, 1.0)])
    assert [r.applied for r in mixed.networks] == [False, True]
    assert differing(pipe, fresh_apply(arch, [(good, 1.0)])) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_model_patches_in_fp32_and_restores_exactly(arch: Arch, nets: Networks) -> None:
    half = pipeline_copy(base_pipeline(arch)).to(dtype=torch.float16)
    base = snapshot(half)
    # The same fp16 values in an fp32 model: the patcher's fp32 math, without the final cast.
    full = pipeline_copy(half).to(dtype=torch.float32)
    entries = [(nets.a, 0.8), (nets.b, Strengths(te=0.5, unet=1.0))]

    patcher = NetworkPatcher(half, arch)
    patcher.apply(entries)
    NetworkPatcher(full, arch).apply(entries)
    patched = snapshot(half)
    expected = {
        k: t.to(torch.float16) if t.is_floating_point() else t for k, t in snapshot(full).items()
    }
    changed = differing(half, base)
    assert in_component(changed, "unet") and in_component(changed, "text_encoder")
    assert all(patched[k].dtype == torch.float16 for k in changed)
    assert differing(half, expected) == []

    patcher.restore()
    assert differing(half, base) == []


def weight_tensors(pipe: Any) -> dict[str, Tensor]:
    """Every module weight and bias of every component, not copied: the tensors themselves."""
    return {
        f"{name}.{key}": tensor.detach()
        for name, component in vars(pipe).items()
        if isinstance(component, nn.Module)
        for key, tensor in component.named_parameters()
    }


@pytest.mark.parametrize("arch", [pytest.param(Arch.SD1, id="sd1")])
def test_patching_never_writes_into_the_original_tensors(
    arch: Arch, pipe: Any, nets: Networks
) -> None:
    """The originals are the backup: a patched module gets new tensors, so taking the backup
    copies nothing, and restore gives every module back the very tensors it had."""
    base = snapshot(pipe)
    originals = weight_tensors(pipe)
    pointers = {k: t.data_ptr() for k, t in originals.items()}
    patcher = NetworkPatcher(pipe, arch)
    patcher.apply([(nets.a, 0.8), (nets.c, 1.0)])
    patcher.apply([(nets.a, 0.8), (nets.b, 0.5)])  # a switch writes into the new tensors
    changed = differing(pipe, base)
    assert changed
    now = weight_tensors(pipe)
    assert all(now[k].data_ptr() != pointers[k] for k in changed)
    assert all(torch.equal(originals[k], base[k]) for k in originals)

    patcher.restore()
    assert {k: t.data_ptr() for k, t in weight_tensors(pipe).items()} == pointers
    assert differing(pipe, base) == []


def patched_tensors(pipe: Any, base: dict[str, Tensor]) -> dict[str, Tensor]:
    """The weights that differ from `base`: the tensors themselves."""
    now = weight_tensors(pipe)
    return {k: now[k] for k in differing(pipe, base)}


def same_memory(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].data_ptr() == b[k].data_ptr() for k in a)


@pytest.mark.parametrize("arch", [pytest.param(Arch.SD1, id="sd1")])
def test_patched_weights_have_the_layout_of_the_originals(
    arch: Arch, pipe: Any, nets: Networks
) -> None:
    """The forward pass runs the same kernels on patched weights as on the base: every new or
    spare tensor has the original's dtype, device, shape and strides, and is as aligned as the
    allocator makes any tensor (64 bytes on the CPU)."""
    base = snapshot(pipe)
    originals = weight_tensors(pipe)
    patcher = NetworkPatcher(pipe, arch)
    for entries in ([(nets.a, 0.8)], [(nets.a, 0.8), (nets.c, 1.0)], [(nets.b, 0.5)]):
        patcher.apply(entries)
        patched = patched_tensors(pipe, base)
        assert patched
        for key, tensor in patched.items():
            original = originals[key]
            assert (tensor.dtype, tensor.device, tensor.shape, tensor.stride()) == (
                original.dtype,
                original.device,
                original.shape,
                original.stride(),
            ), key
            assert tensor.data_ptr() % 64 == 0, key
        patcher.restore()  # the next set is written into spares


@pytest.mark.parametrize("arch", [pytest.param(Arch.SD1, id="sd1")])
def test_a_restored_module_is_patched_again_into_the_memory_it_let_go_of(
    arch: Arch, pipe: Any, nets: Networks
) -> None:
    """Off and on again writes into the spares of the first patch, never into the originals,
    and lands on what a fresh patcher gives; `release_memory` lets the spares go."""
    base = snapshot(pipe)
    originals = {k: t.data_ptr() for k, t in weight_tensors(pipe).items()}
    entries = [(nets.a, 0.8), (nets.c, 1.0)]
    patcher = NetworkPatcher(pipe, arch)
    patcher.apply(entries)
    # held here, so new memory could never be at the same address
    first = patched_tensors(pipe, base)
    patcher.restore()
    assert differing(pipe, base) == []
    assert patcher.spare_bytes == sum(t.numel() * t.element_size() for t in first.values())

    patcher.apply([(nets.b, 0.5)])  # a subset of the modules: each takes its own spare
    assert differing(pipe, fresh_apply(arch, [(nets.b, 0.5)])) == []
    again = patched_tensors(pipe, base)
    assert again and same_memory(again, {k: first[k] for k in again})
    patcher.apply(entries)
    assert differing(pipe, fresh_apply(arch, entries)) == []
    assert same_memory(patched_tensors(pipe, base), first)

    patcher.restore()
    assert {k: t.data_ptr() for k, t in weight_tensors(pipe).items()} == originals
    assert differing(pipe, base) == []
    patcher.release_memory()
    assert patcher.spare_bytes == 0
    patcher.apply(entries)
    assert differing(pipe, fresh_apply(arch, entries)) == []


@pytest.mark.parametrize("arch", [pytest.param(Arch.SD1, id="sd1")])
def test_without_spares_a_restore_keeps_no_memory(arch: Arch, pipe: Any, nets: Networks) -> None:
    patcher = NetworkPatcher(pipe, arch, keep_spares=False)
    patcher.apply([(nets.a, 0.8)])
    patcher.restore()
    assert patcher.spare_bytes == 0


@pytest.mark.parametrize("arch", [pytest.param(Arch.SD1, id="sd1")])
def test_a_spare_that_no_longer_fits_is_not_used(arch: Arch, pipe: Any, nets: Networks) -> None:
    """Spares from an fp32 model, which then moved to fp16: the next patch takes new memory
    and is right."""
    patcher = NetworkPatcher(pipe, arch)
    patcher.apply([(nets.a, 0.8)])
    patcher.restore()
    assert patcher.spare_bytes > 0
    pipe.to(dtype=torch.float16)
    base = snapshot(pipe)
    half = pipeline_copy(base_pipeline(arch)).to(dtype=torch.float16)
    NetworkPatcher(half, arch).apply([(nets.a, 0.8)])
    patcher.apply([(nets.a, 0.8)])
    assert differing(pipe, snapshot(half)) == []
    assert all(t.dtype == torch.float16 for t in weight_tensors(pipe).values())
    patcher.restore()
    assert differing(pipe, base) == []


@pytest.mark.parametrize("arch", [pytest.param(Arch.SD1, id="sd1")])
def test_restore_after_the_model_changed_dtype_copies_the_originals(
    arch: Arch, pipe: Any, nets: Networks
) -> None:
    """A model moved while patched (another dtype here, another device under offload) cannot
    take the original tensors back as they are: their values are copied into its own."""
    moved = ("unet", "text_encoder")
    expected = {
        k: t.to(torch.float64) if t.is_floating_point() and k.split(".")[0] in moved else t
        for k, t in snapshot(pipe).items()
    }
    patcher = NetworkPatcher(pipe, arch)
    patcher.apply([(nets.a, 0.8)])
    for name in moved:
        getattr(pipe, name).to(torch.float64)
    patcher.restore()
    assert differing(pipe, expected) == []


@pytest.mark.parametrize("arch", [pytest.param(Arch.SD1, id="sd1")])
def test_progress_counts_the_modules_written_and_can_stop_the_apply(
    arch: Arch, pipe: Any, nets: Networks
) -> None:
    base = snapshot(pipe)
    patcher = NetworkPatcher(pipe, arch)
    calls: list[tuple[int, int]] = []
    report = patcher.apply([(nets.a, 1.0)], on_progress=lambda *call: calls.append(call))
    n = len(touched(pipe, nets.a))
    assert report.modules_changed == n
    assert calls == [(done, n) for done in range(1, n + 1)]

    calls.clear()
    patcher.apply([(nets.a, 1.0)], on_progress=lambda *call: calls.append(call))
    assert calls == []  # an identical set writes nothing

    def stop_halfway(done: int, total: int) -> None:
        if done == total // 2:
            raise KeyboardInterrupt

    patched = snapshot(pipe)
    with pytest.raises(KeyboardInterrupt):
        patcher.apply([(nets.b, 0.5)], on_progress=stop_halfway)
    assert differing(pipe, patched) == []
    patcher.restore()
    assert differing(pipe, base) == []
