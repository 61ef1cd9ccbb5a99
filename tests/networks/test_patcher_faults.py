"""The patcher under faults: errors and interrupts during an apply, during its rollback (double
faults) and during restore, injected at the seams where the patcher computes deltas, writes
weights and puts originals back.

Expected weights come from a fresh patcher on a fresh copy of the model (or the untouched base),
never from the patcher under test.
"""

from __future__ import annotations

import copy
import random
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_files import BASE_MODEL_VERSION, one_torch_thread, write_kohya_layers
from torch import Tensor

import webui.networks.apply.patcher as patcher_module
import webui.networks.apply.writing as writing_module
from webui.arch import Arch
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.networks.apply.apply_errors import NetworkApplyError
from webui.networks.apply.patcher import NetworkPatcher
from webui.networks.apply.strengths import Strengths
from webui.networks.format.modules import LoraModule
from webui.networks.format.network import Network, load_network

ARCH = Arch.SD1
COMPONENTS = ("text_encoder", "unet")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@cache
def base_pipeline() -> Any:
    torch.manual_seed(0)
    return build_pipeline(ModelSpec(ARCH))


def model() -> types.SimpleNamespace:
    """A fresh copy of the tiny SD1 text encoder and UNet (all the patcher touches)."""
    pipe = base_pipeline()
    return types.SimpleNamespace(
        **{name: copy.deepcopy(getattr(pipe, name)) for name in COMPONENTS}
    )


def snapshot(pipe: Any) -> dict[str, Tensor]:
    return {
        f"{name}.{key}": tensor.detach().clone()
        for name in COMPONENTS
        for key, tensor in getattr(pipe, name).state_dict(keep_vars=True).items()
    }


def differing(pipe: Any, expected: dict[str, Tensor]) -> list[str]:
    """Keys whose tensors are not bit-identical to `expected` (dtype included)."""
    now = {
        f"{name}.{key}": tensor
        for name in COMPONENTS
        for key, tensor in getattr(pipe, name).state_dict(keep_vars=True).items()
    }
    assert now.keys() == expected.keys()
    return sorted(
        k for k, t in now.items() if t.dtype != expected[k].dtype or not torch.equal(t, expected[k])
    )


def _attention(component: str, path: str) -> bool:
    return ".attn" in path or "self_attn" in path


def _resnets_and_mlp(component: str, path: str) -> bool:
    return ".resnets." in path or ".mlp." in path


@pytest.fixture(scope="module")
def networks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Network, ...]:
    """Three small kohya LoRAs that overlap: every 5th layer, attention, ResNets and MLPs."""
    directory = tmp_path_factory.mktemp("fault-loras")
    specs: list[tuple[str, dict[str, Any]]] = [
        ("a", {"every": 5, "seed": 1}),
        ("b", {"include": _attention, "every": 3, "seed": 2, "alpha": 8.0}),
        ("c", {"include": _resnets_and_mlp, "every": 2, "seed": 3, "rank": 2}),
    ]
    out = []
    for name, kwargs in specs:
        path = directory / f"{name}.safetensors"
        metadata = {"ss_base_model_version": BASE_MODEL_VERSION[ARCH]}
        write_kohya_layers(path, base_pipeline(), ARCH, metadata=metadata, **kwargs)
        out.append(load_network(path))
    return tuple(out)


Entries = tuple[tuple[Network, float], ...]


def as_set(entries: Entries) -> tuple[tuple[Network, Strengths], ...]:
    """Entries as the patcher's `current_set` gives them."""
    return tuple((network, Strengths.of(strength)) for network, strength in entries)


def names(entries: tuple[tuple[Network, Any], ...]) -> list[tuple[str, Any]]:
    return [(network.name, strength) for network, strength in entries]


@dataclass(frozen=True)
class Expected:
    weights: dict[str, Tensor]
    modules: int


@pytest.fixture(scope="module")
def expected() -> Callable[[Entries], Expected]:
    """What a fresh patcher on a fresh model gives for a set (the base for the empty set)."""
    results: dict[tuple[tuple[str, Any], ...], Expected] = {}

    def of(entries: tuple[tuple[Network, Any], ...]) -> Expected:
        key = tuple(names(entries))
        if key not in results:
            fresh = model()
            patcher = NetworkPatcher(fresh, ARCH)
            patcher.apply(list(entries))
            results[key] = Expected(snapshot(fresh), patcher.patched_modules)
        return results[key]

    return of


# Where faults go in: a network's delta math, the writing of a patched tensor, the putting back
# of an original (apply, rollback and restore all go through them), and the progress callback
# (how the engine interrupts).
SEAMS = ("delta", "install", "put_back", "progress")


@dataclass
class Faults:
    """Planned faults, fired in order: the next is armed when the previous fires, and raises at
    the n-th call through its seam after that (any seam when None)."""

    plan: list[tuple[str | None, int, BaseException]] = field(default_factory=list)
    fired: list[BaseException] = field(default_factory=list)
    calls: int = 0

    def hit(self, seam: str) -> None:
        if not self.plan:
            return
        wanted, n, error = self.plan[0]
        if wanted is not None and wanted != seam:
            return
        self.calls += 1
        if self.calls == n:
            self.plan.pop(0)
            self.calls = 0
            self.fired.append(error)
            raise error

    def arm(self, *plan: tuple[str | None, int, BaseException]) -> None:
        self.plan, self.fired, self.calls = list(plan), [], 0

    def progress(self, done: int, total: int) -> None:
        self.hit("progress")


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    injector = Faults()

    def through(seam: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            injector.hit(seam)
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        LoraModule, "low_rank_factors", through("delta", LoraModule.low_rank_factors)
    )
    monkeypatch.setattr(LoraModule, "weight_delta", through("delta", LoraModule.weight_delta))
    monkeypatch.setattr(writing_module, "_install", through("install", writing_module._install))
    # the put-back seam has two callers: the patcher's restore and `patch` (a bias)
    put_back = through("put_back", writing_module.put_back_tensor)
    monkeypatch.setattr(writing_module, "put_back_tensor", put_back)
    monkeypatch.setattr(patcher_module, "put_back_tensor", put_back)
    return injector


def test_finding_6_a_fault_while_rolling_back_leaves_no_mixed_weights_nor_stale_records(
    networks: tuple[Network, ...], faults: Faults, expected: Callable[[Entries], Expected]
) -> None:
    """Finding 6: a delta fails part-way through a first apply, then Ctrl-C hits the rollback's
    first put-back. The old patcher stopped undoing there (modules left patched), kept a backup
    without its applied entry (every later apply touching it raised KeyError) and restore()
    did not see it."""
    a, b, _ = networks
    pipe = model()
    base = snapshot(pipe)
    patcher = NetworkPatcher(pipe, ARCH)
    middle = len(a.modules) // 2
    faults.arm(("delta", middle, RuntimeError("bad delta")), ("put_back", 1, KeyboardInterrupt()))

    with pytest.raises(NetworkApplyError) as raised:
        patcher.apply([(a, 1.0)])

    assert len(faults.fired) == 2  # the second fault did hit the rollback
    assert raised.value.__cause__ is faults.fired[0]  # the first error is the one raised
    assert differing(pipe, base) == []
    assert patcher.patched_modules == 0 and patcher.current_set == ()
    entries = ((a, 1.0), (b, 0.5))
    patcher.apply(list(entries))
    assert differing(pipe, expected(entries).weights) == []
    patcher.restore()
    assert differing(pipe, base) == []
    assert patcher.patched_modules == 0


def test_a_fault_while_rolling_back_a_switch_puts_the_base_back(
    networks: tuple[Network, ...], faults: Faults, expected: Callable[[Entries], Expected]
) -> None:
    """The previous set's modules are re-patched on rollback; when that fails too (out of
    memory here), the promise falls back to the base, exactly, and the set is empty."""
    a, b, c = networks
    pipe = model()
    base = snapshot(pipe)
    patcher = NetworkPatcher(pipe, ARCH)
    patcher.apply([(a, 1.0), (c, 0.5)])
    faults.arm(("delta", 7, RuntimeError("bad delta")), ("delta", 1, MemoryError()))

    with pytest.raises(NetworkApplyError):
        patcher.apply([(b, 0.5), (c, 1.0)])

    assert len(faults.fired) == 2
    assert differing(pipe, base) == []
    assert patcher.current_set == () and patcher.patched_modules == 0
    patcher.apply([(a, 1.0), (c, 0.5)])
    assert differing(pipe, expected(((a, 1.0), (c, 0.5))).weights) == []


@pytest.mark.parametrize(
    "error", [KeyboardInterrupt(), MemoryError(), torch.OutOfMemoryError("CUDA")], ids=repr
)
def test_interrupts_and_out_of_memory_roll_back_and_pass_as_they_are(
    networks: tuple[Network, ...],
    faults: Faults,
    expected: Callable[[Entries], Expected],
    error: BaseException,
) -> None:
    a, b, c = networks
    pipe = model()
    patcher = NetworkPatcher(pipe, ARCH)
    previous = ((a, 1.0), (c, 0.5))
    patcher.apply(list(previous))
    faults.arm(("delta", 5, error))
    with pytest.raises(type(error)) as raised:
        patcher.apply([(b, 0.5), (c, 1.0)])
    assert raised.value is error
    assert patcher.current_set == as_set(previous)
    assert differing(pipe, expected(previous).weights) == []


def test_a_failing_network_is_named_with_its_module(networks: tuple[Network, ...]) -> None:
    """A broken file (up and down of different ranks) fails as NetworkApplyError naming
    the file and the module, with the cause chained; the model is left as it was."""
    a, b, _ = networks
    prefix = next(p for p in b.modules if "attn1_to_q" in p)
    module = b.modules[prefix]
    assert isinstance(module, LoraModule)
    broken_modules = dict(b.modules)
    broken_modules[prefix] = copy.copy(module)
    object.__setattr__(broken_modules[prefix], "up", module.up[:, :-1])  # one rank short
    broken = Network(Path("broken.safetensors"), "broken", b.metadata, broken_modules, {}, b.base)
    pipe = model()
    base = snapshot(pipe)
    patcher = NetworkPatcher(pipe, ARCH)

    with pytest.raises(NetworkApplyError) as raised:
        patcher.apply([(a, 1.0), (broken, 1.0)])

    error = raised.value
    assert isinstance(error, ValueError)
    assert error.network is broken and error.module == prefix
    assert str(error).startswith(f"broken.safetensors: module {prefix}: ")
    assert error.__cause__ is not None
    assert differing(pipe, base) == [] and patcher.patched_modules == 0


def test_a_failure_while_planning_is_named_with_its_module(
    networks: tuple[Network, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _, _ = networks
    prefix = next(iter(a.modules))
    accepts = LoraModule.accepts

    def failing(self: LoraModule, shape: Any) -> bool:
        if self.key == prefix:
            raise IndexError("no such dimension")
        return accepts(self, shape)

    monkeypatch.setattr(LoraModule, "accepts", failing)
    patcher = NetworkPatcher(model(), ARCH)
    with pytest.raises(NetworkApplyError, match=f"a.safetensors: module {prefix}: no such") as e:
        patcher.apply([(a, 1.0)])
    assert e.value.network is a and isinstance(e.value.__cause__, IndexError)


def test_restore_goes_on_past_a_failure_and_raises_it_after(
    networks: tuple[Network, ...], faults: Faults
) -> None:
    a, _, c = networks
    pipe = model()
    base = snapshot(pipe)
    patcher = NetworkPatcher(pipe, ARCH)
    patcher.apply([(a, 1.0), (c, 0.5)])
    faults.arm(("put_back", 3, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        patcher.restore()
    assert differing(pipe, base) == []
    assert patcher.patched_modules == 0


# -- the standing guard: random sequences ------------------------------------------------------

ERRORS: tuple[Callable[[], BaseException], ...] = (
    lambda: RuntimeError("injected"),
    MemoryError,
    KeyboardInterrupt,
    lambda: torch.OutOfMemoryError("injected"),
)


def _fault(rng: random.Random, seams: tuple[str, ...]) -> tuple[str | None, int, BaseException]:
    seam = rng.choice((*seams, None))
    return seam, rng.randint(1, 12), rng.choice(ERRORS)()


@pytest.mark.parametrize("seed", range(3))
def test_random_applies_switches_restores_and_faults_keep_the_weights_exact(
    seed: int,
    networks: tuple[Network, ...],
    faults: Faults,
    expected: Callable[[Entries], Expected],
) -> None:
    """Hundreds of random steps (apply a random set, or restore), many with one fault during
    the step and some with a second during its rollback. After every step the weights are
    bit-exact what a fresh patcher gives for the patcher's current set (the base when empty),
    a failed apply leaves the previous set (or, after a double fault, the base), the patcher
    records exactly the modules that set touches, and the first fault is what was raised."""
    rng = random.Random(seed)
    pipe = model()
    patcher = NetworkPatcher(pipe, ARCH)
    strengths = (0.5, 1.0)
    fired = {1: 0, 2: 0}
    for step in range(120):
        before = patcher.current_set
        restoring = rng.random() < 0.2
        wanted: Entries = (
            ()
            if restoring
            else tuple((n, rng.choice(strengths)) for n in networks if rng.random() < 0.5)
        )
        plan = []
        if rng.random() < 0.6:
            plan.append(_fault(rng, ("put_back",) if restoring else SEAMS))
            if not restoring and rng.random() < 0.5:
                plan.append(_fault(rng, SEAMS))  # lands in the rollback, if it gets that far
        faults.arm(*plan)
        raised: BaseException | None = None
        try:
            if restoring:
                patcher.restore()
            else:
                patcher.apply(list(wanted), on_progress=faults.progress)
        except BaseException as error:  # every raise is checked below
            raised = error
        faults.plan.clear()  # unfired faults must not hit the checks
        if faults.fired:
            fired[len(faults.fired)] += 1
        where = f"step {step}: {'restore' if restoring else names(wanted)}, fired {faults.fired!r}"

        if not faults.fired:
            assert raised is None, where
            assert patcher.current_set == as_set(wanted), where
        else:
            first = faults.fired[0]
            assert raised is not None, where
            if isinstance(raised, NetworkApplyError):  # only a RuntimeError in a network's math
                assert type(first) is RuntimeError and raised.__cause__ is first, where
            else:
                assert raised is first, where
            if restoring:
                assert patcher.current_set == (), where
            elif len(faults.fired) == 1:
                assert patcher.current_set == before, where
            else:
                assert patcher.current_set in (before, ()), where
        result = expected(patcher.current_set)
        assert differing(pipe, result.weights) == [], where
        assert patcher.patched_modules == result.modules, where

    assert fired[1] >= 20 and fired[2] >= 5, fired  # the sequence did reach the rollbacks
    # and it keeps working
    everything = tuple((n, 1.0) for n in networks)
    patcher.apply(list(everything))
    assert differing(pipe, expected(everything).weights) == []
    patcher.restore()
    assert differing(pipe, expected(()).weights) == []
    assert patcher.patched_modules == 0
