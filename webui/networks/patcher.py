"""Apply a set of (Network, strength) to a diffusers pipeline's weights, natively.

- The deltas of every network on one module are summed in fp32 on the weight's device and
  written once, in the weight's dtype.
- A touched weight (or bias) is given a new tensor and its original tensor is kept untouched
  as the backup: no copy is made, and `restore()` hands the originals back (bit-exact).
- Applying a new set recomputes only the modules whose (network, strength) list changed.
- One record, per module, of what is patched: its original tensors and the contributions its
  weight holds (unknown while it is being written). A module without a record holds its
  originals; `restore()` walks every record.
- An exception or interrupt part-way rolls back: every module this call touched gets its
  previous contributions again (re-patched from its originals, deterministic, so bit-exact) or
  its originals back. The rollback keeps going past a failure of its own (a second error or
  interrupt); if any module could not get its previous state, every module is put back to its
  originals instead: after a failed apply the model is exactly the previous set, or exactly the
  base with an empty current set (`current_set` says which). The first error is re-raised.
- A failure of one network's delta math (or its plan) is raised as `NetworkApplyError` naming
  the network and module; interrupts and out-of-memory errors propagate as they are.

The only module that writes model weights."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from webui.arch import Arch
from webui.networks.apply_errors import NetworkApplyError
from webui.networks.base_detection import fits
from webui.networks.blocks import OUTSIDE, UnetBlock, unet_blocks
from webui.networks.keys import Component, KeyMap, ModuleRef
from webui.networks.modules import LowRankFactors, NetworkModule, WeightDelta
from webui.networks.network import Network
from webui.networks.strengths import Strengths

log = logging.getLogger(__name__)

# One contribution to a target module: which network, which of its modules, at what multiplier.
_Contribution = tuple[Network, NetworkModule, float]

# Called by `apply` after each module written: (modules done, modules to write in this call).
ModuleProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class NetworkReport:
    """What happened to one network of a set."""

    name: str
    variants: tuple[str, ...]
    matched: tuple[str, ...]
    unmatched: tuple[str, ...]  # prefixes that name no module of the loaded model
    unsupported: tuple[str, ...]  # prefixes whose keys no variant understands
    shape_mismatch: tuple[str, ...]  # matched, but the tensors do not fit the weight
    base: Arch | None
    base_source: str
    compatible: bool
    applied: bool

    @property
    def warnings(self) -> list[str]:
        """One line per problem, naming the network, for the UI."""
        out: list[str] = []
        if not self.compatible:
            out.append(
                f"{self.name}: made for {self.base.value if self.base else '?'} ({self.base_source}), not applied to this model"
            )
            return out
        if self.unmatched:
            out.append(
                f"{self.name}: {len(self.unmatched)} module(s) match nothing in the model, e.g. {self.unmatched[0]}"
            )
        if self.unsupported:
            out.append(
                f"{self.name}: {len(self.unsupported)} module(s) of an unknown format skipped, e.g. {self.unsupported[0]}"
            )
        if self.shape_mismatch:
            out.append(
                f"{self.name}: {len(self.shape_mismatch)} module(s) skipped for shape mismatch, e.g. {self.shape_mismatch[0]}"
            )
        return out


@dataclass(frozen=True)
class PatchReport:
    """The result of one `apply`: a report per network and how much work it took."""

    networks: tuple[NetworkReport, ...] = ()
    modules_changed: int = 0
    seconds: float = 0.0
    components_changed: frozenset[Component] = frozenset()

    @property
    def warnings(self) -> list[str]:
        return [w for report in self.networks for w in report.warnings]


@dataclass
class _Patched:
    """The record of one module whose tensors may not be its originals: the original weight and
    bias themselves (the backup: a patched module is given new tensors, so keeping them copies
    nothing and putting them back is bit-exact by construction), and the contributions its
    weight holds now (None while being written: unknown, so never taken as up to date)."""

    weight: Tensor
    bias: Tensor | None
    contributions: tuple[_Contribution, ...] | None = None


@dataclass
class _Spare:
    """The patched tensors a restored module let go of, kept to hold its next patch."""

    weight: Tensor | None
    bias: Tensor | None


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors are views of the same memory, from the same first element."""
    return a.device == b.device and a.data_ptr() == b.data_ptr()


def _writable(param: Tensor, original: Tensor, spare: Tensor | None = None) -> Tensor:
    """Where `param`'s patched values go: while it still holds the original (the backup must
    stay untouched), the spare its module had before if it fits, else a new tensor; otherwise its
    own tensor, written in place."""
    if not _same_memory(param, original):
        return param.detach()
    if spare is not None and _fits(spare, param):
        return spare
    return torch.empty_like(param)


def _fits(spare: Tensor, param: Tensor) -> bool:
    return (
        spare.shape == param.shape
        and spare.stride() == param.stride()
        and spare.dtype == param.dtype
        and spare.device == param.device
    )


def _install(param: Tensor, values: Tensor) -> None:
    """Make `values` (from `_writable`) the parameter's data; nothing to do when written in place."""
    if not _same_memory(param, values):
        param.data = values


def _put_back(param: Tensor | None, original: Tensor | None) -> Tensor | None:
    """Give `param` its original values: the original tensor itself, or a copy of its values when
    the module has been moved to another device or dtype since. Returns the patched tensor the
    parameter let go of, if any."""
    if param is None or original is None:
        return None
    if param.device == original.device and param.dtype == original.dtype:
        released = param.detach()
        param.data = original
        return None if _same_memory(released, original) else released
    param.copy_(original)
    return None


class _Scratch:
    """fp32 buffers reused by every module and every call, one per (slot, device): the gathered
    low-rank factors and the fp32 accumulator (fresh memory for each module costs more on a CPU
    than the arithmetic). They grow to the largest module seen; `release()` frees them."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], Tensor] = {}

    def fp32(self, slot: str, shape: Sequence[int], device: torch.device) -> Tensor:
        """An uninitialised contiguous fp32 tensor of `shape` on `device`."""
        numel = math.prod(shape)
        buffer = self._buffers.get((slot, device))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32, device=device)
            self._buffers[(slot, device)] = buffer
        return buffer[:numel].view(*shape)

    def gather(self, slot: str, pieces: Sequence[Tensor], dim: int, device: torch.device) -> Tensor:
        """The pieces (any float dtype, on one device) concatenated along `dim` in fp32 on
        `device`, in this slot's buffer: one concatenation where they are, one converting copy."""
        joined = pieces[0] if len(pieces) == 1 else torch.cat(list(pieces), dim=dim)
        return self.fp32(slot, joined.shape, device).copy_(joined)

    def release(self) -> None:
        self._buffers.clear()


def _gathered_factors(
    factors: Sequence[LowRankFactors], scratch: _Scratch, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(up, down) of every network on one module in fp32, each network's rows of `down` scaled,
    so that up @ down is the sum of their deltas: one product for all of them."""
    up = scratch.gather("up", [f.up for f in factors], 1, device)
    down = scratch.gather("down", [f.down for f in factors], 0, device)
    offset = 0
    for f in factors:
        if f.scale != 1.0:
            down[offset : offset + f.rank].mul_(f.scale)  # rows: contiguous
        offset += f.rank
    return up, down


@dataclass
class _Plan:
    """Per target module: the contributions wanted after this call."""

    targets: dict[ModuleRef, list[_Contribution]] = field(default_factory=dict)

    def add(self, ref: ModuleRef, contribution: _Contribution) -> None:
        self.targets.setdefault(ref, []).append(contribution)


# What decides whether a module must be rewritten: its (network, module key, multiplier) list.
# Networks compare by identity (a reloaded file is another network).
_Signature = tuple[tuple[Network, str, float], ...]


def _signature(contributions: Iterable[_Contribution]) -> _Signature:
    return tuple((net, module.key, multiplier) for net, module, multiplier in contributions)


class NetworkPatcher:
    """Patches one pipeline's text encoder(s) and UNet in place. Not thread-safe: the engine
    serializes calls."""

    def __init__(self, pipe: object, arch: Arch | None = None, *, keep_spares: bool = True) -> None:
        """`keep_spares`: keep the patched tensors of CPU weights when their module is restored,
        and write the module's next patch into them. New memory is a large part of an apply's
        cost on a CPU (every page is faulted in at its first write), so turning LoRAs off and on
        again then costs what a switch costs; the price is that the memory stays held while no
        LoRA is applied (`release_memory()` frees it). CUDA weights never keep spares: the
        caching allocator already reuses freed memory, and for anything, not only the next
        patch."""
        self.keymap = KeyMap.from_pipeline(pipe)
        self.arch = arch
        self.keep_spares = keep_spares
        self._scratch = _Scratch()
        self._spares: dict[ModuleRef, _Spare] = {}
        # the one record of what is patched: a module without an entry holds its originals
        self._patched: dict[ModuleRef, _Patched] = {}
        self._set: list[tuple[Network, Strengths]] = []
        unet = getattr(pipe, "unet", None)
        self._blocks: dict[str, UnetBlock] = unet_blocks(unet.config) if unet is not None else {}

    @property
    def patched_modules(self) -> int:
        return len(self._patched)

    @property
    def current_set(self) -> tuple[tuple[Network, Strengths], ...]:
        """The set the weights hold (empty: the base). After a failed apply, the set before it,
        or empty when the rollback itself failed and put the base back."""
        return tuple(self._set)

    def apply(
        self,
        networks: Sequence[tuple[Network, float | Strengths]],
        *,
        step: int = 1,
        total_steps: int = 1,
        on_progress: ModuleProgress | None = None,
    ) -> PatchReport:
        """Make the model's weights equal base + the given set (replacing any previous set).
        Scheduled strengths are taken at `step` (1-based) of `total_steps`. `on_progress(done,
        total)` is called after each module written (an exception from it rolls back too).

        On any exception or interrupt the model is rolled back (see the module docstring) and
        the error re-raised; a failure of one network's delta or plan as `NetworkApplyError`."""
        started = time.perf_counter()
        wanted_set = [(network, Strengths.of(strength)) for network, strength in networks]
        plan = _Plan()
        reports = [
            self._plan_network(network, strengths.at_step(step, total_steps), plan)
            for network, strengths in wanted_set
        ]
        wanted = {key: _signature(contribs) for key, contribs in plan.targets.items()}
        changed = [
            key
            for key in set(wanted) | set(self._patched)
            if key not in self._patched or wanted.get(key) != self._holds(key)
        ]
        self._write(changed, plan, on_progress)
        self._set = wanted_set  # only a set that was fully written becomes the current one
        return PatchReport(
            tuple(reports),
            len(changed),
            time.perf_counter() - started,
            frozenset(ref.component for ref in changed),
        )

    @property
    def is_scheduled(self) -> bool:
        """True when the current set has strengths that change between steps."""
        return any(strengths.is_scheduled for _, strengths in self._set)

    def set_step(self, step: int, total_steps: int) -> PatchReport | None:
        """Re-apply the current set at `step`; only modules whose multiplier changed are written.
        None when nothing in the set is scheduled."""
        if not self.is_scheduled:
            return None
        return self.apply(list(self._set), step=step, total_steps=total_steps)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every patched weight back exactly as it was before the first apply. Keeps going
        past a failure (a module that fails is tried again after the others), then re-raises the
        first; a module still patched stays recorded, for the next `restore` or `apply`."""
        self._set = []
        errors = self._put_back_all()
        if errors:
            raise errors[0]

    def release_memory(self) -> None:
        """Free what is kept only to make the next apply faster: spare tensors and fp32
        buffers. The weights and the current set are untouched."""
        self._spares.clear()
        self._scratch.release()

    @property
    def spare_bytes(self) -> int:
        """Memory held by spare tensors (see `keep_spares`)."""
        return sum(
            t.numel() * t.element_size()
            for spare in self._spares.values()
            for t in (spare.weight, spare.bias)
            if t is not None
        )

    # -- planning -----------------------------------------------------------------------------

    def _plan_network(self, network: Network, strengths: Strengths, plan: _Plan) -> NetworkReport:
        compatible = fits(network.base, self.arch)  # never a family this app does not run
        matched: list[str] = []
        unmatched: list[str] = []
        mismatched: list[str] = []
        for prefix, module in network.modules.items():
            try:
                ref = self.keymap.resolve(prefix)
                if ref is None:
                    unmatched.append(prefix)
                    continue
                weight = _weight_of(ref.module)
                if weight is None or not module.accepts(weight.shape):
                    mismatched.append(prefix)
                    continue
                matched.append(prefix)
                unet = ref.component is Component.UNET
                multiplier = strengths.multiplier(
                    ref.component, self._blocks.get(ref.path, OUTSIDE) if unet else None
                )
            except _NOT_A_NETWORK_FAULT:
                raise
            except Exception as error:
                raise NetworkApplyError(network, prefix, error) from error
            if compatible and multiplier != 0:
                plan.add(ref, (network, module, multiplier))
        for prefix in mismatched:
            log.warning("%s: %s does not fit its target weight; skipped", network.name, prefix)
        return NetworkReport(
            name=network.name,
            variants=tuple(v.value for v in network.variants),
            matched=tuple(matched),
            unmatched=tuple(unmatched),
            unsupported=tuple(network.unsupported),
            shape_mismatch=tuple(mismatched),
            base=network.base.arch,
            base_source=network.base.source,
            compatible=compatible,
            applied=compatible and bool(matched),
        )

    # -- writing ------------------------------------------------------------------------------

    def _holds(self, key: ModuleRef) -> _Signature | None:
        """What a module's weight holds now: () for its originals, None when unknown."""
        record = self._patched.get(key)
        if record is None:
            return ()
        return None if record.contributions is None else _signature(record.contributions)

    @torch.no_grad()
    def _write(
        self, changed: list[ModuleRef], plan: _Plan, on_progress: ModuleProgress | None = None
    ) -> None:
        """Write the planned weights of `changed` modules; on any exception (KeyboardInterrupt
        included) roll back, then re-raise it."""
        previous = {
            key: self._patched[key].contributions for key in changed if key in self._patched
        }
        try:
            for done, key in enumerate(changed, start=1):
                self._set_module(key, plan.targets.get(key, ()))
                if on_progress is not None:
                    on_progress(done, len(changed))
        except BaseException as error:
            self._roll_back(changed, previous, error)
            raise

    def _set_module(self, key: ModuleRef, contributions: Sequence[_Contribution]) -> None:
        """Make one module hold `contributions` (none: its originals), its record kept true at
        every point an exception can stop it."""
        weight, bias = _weight_of(key.module), _bias_of(key.module)
        record = self._patched.get(key)
        if not contributions:
            if record is not None:
                self._put_back(key, record)
            return
        assert weight is not None  # planned modules have a weight
        if record is None:  # recorded before anything is written: the originals are the backup
            record = _Patched(weight.detach(), None if bias is None else bias.detach())
            self._patched[key] = record
        record.contributions = None
        _patch(weight, bias, record, contributions, self._scratch, self._spares.pop(key, None))
        record.contributions = tuple(contributions)

    def _roll_back(
        self,
        changed: list[ModuleRef],
        previous: dict[ModuleRef, tuple[_Contribution, ...] | None],
        error: BaseException,
    ) -> None:
        """Give every module of `changed` what it held before the failed call, going on past
        failures; if any fails, put every module back to its originals instead."""
        failures: list[BaseException] = []
        for key in reversed(changed):
            record, before = self._patched.get(key), previous.get(key, ())
            if record is None and not before:
                continue  # holds its originals, as it did
            if record is not None and before is not None and record.contributions is before:
                continue  # not reached by the failed call
            try:
                # before is None for a module an earlier failure left unknown: originals then
                self._set_module(key, before or ())
            except BaseException as failure:  # the first error is re-raised
                failures.append(failure)
        if not failures:
            return
        self._set = []
        failures += self._put_back_all()
        note = ", ".join(type(f).__name__ for f in failures)
        log.warning("Rolling back a failed apply failed too (%s); back to the base weights", note)
        error.add_note(f"while rolling back: {note}; every weight was put back to the base")

    def _put_back_all(self) -> list[BaseException]:
        """Put every recorded module back to its originals, going on past failures, and trying
        each failed one once more at the end; returns the errors."""
        errors: list[BaseException] = []
        for _ in range(2):
            failed = False
            for key, record in list(self._patched.items()):
                try:
                    self._put_back(key, record)
                except BaseException as error:  # returned, to be re-raised
                    errors.append(error)
                    failed = True
            if not failed:
                break
        return errors

    def _put_back(self, key: ModuleRef, record: _Patched) -> None:
        """Give a module its original tensors, forget its record, and keep what it let go of as
        its spare. Safe to repeat: a module holding its originals lets go of nothing."""
        weight, bias = _weight_of(key.module), _bias_of(key.module)
        record.contributions = None  # a failure between weight and bias leaves it half done
        spare = _Spare(_put_back(weight, record.weight), _put_back(bias, record.bias))
        del self._patched[key]
        if self.keep_spares and any(
            t is not None and t.device.type == "cpu" for t in (spare.weight, spare.bias)
        ):
            self._spares[key] = spare

    @torch.no_grad()
    def deltas(self) -> Iterator[ModuleDelta]:
        """What the current set changed, one patched module at a time (read-only): current
        weight (and bias) minus the original, in fp32 on the weight's device."""
        for key, backup in list(self._patched.items()):
            weight, bias = _weight_of(key.module), _bias_of(key.module)
            bias_delta = None
            if bias is not None and backup.bias is not None and not torch.equal(bias, backup.bias):
                bias_delta = bias.float() - backup.bias.to(bias.device, torch.float32)
            yield ModuleDelta(
                key,
                weight.float() - backup.weight.to(weight.device, torch.float32),
                bias_delta,
            )


def _patch(
    weight: Tensor,
    bias: Tensor | None,
    backup: _Patched,
    contributions: Sequence[_Contribution],
    scratch: _Scratch,
    spare: _Spare | None = None,
) -> None:
    """weight = original + sum of deltas, computed in fp32 and written once, in the weight's
    dtype, into the weight's own tensor (a new one at its first patch: the original is the
    backup).

    Low-rank deltas (LoRA, LoCon) are never built full-size on their own: their factors are
    gathered into fp32 buffers, each network's scale on its rows of `down`, and multiplied once
    for all networks together. Other variants add their full-size `weight_delta`. Every delta
    is computed before the module sees new values, so a failure there leaves it untouched."""
    factors: list[LowRankFactors] = []
    general: list[tuple[Network, NetworkModule, float]] = []
    for net, module, multiplier in contributions:
        with _blame(net, module.key):
            low_rank = module.low_rank_factors(weight, multiplier)
            if low_rank is not None:
                _check_factors(low_rank, weight)
        if low_rank is None:
            general.append((net, module, multiplier))
        else:
            factors.append(low_rank)
    device, rows = weight.device, weight.shape[0]
    original = backup.weight.to(device)  # no copy on the same device
    if factors:
        up, down = _gathered_factors(factors, scratch, device)
    spare_weight = None if spare is None else spare.weight
    target = _writable(weight, backup.weight, spare_weight)
    # brand-new memory: the module still holds its original and had no spare that fits
    fresh = _same_memory(weight, backup.weight) and target is not spare_weight
    deltas: list[WeightDelta] = []
    if not general and _fp32_contiguous(original, target):
        if fresh:  # fresh pages are faulted in faster by a copy than by the product's threads
            target.copy_(original).view(rows, -1).addmm_(up, down)
        else:  # one pass: target = original + up @ down
            torch.addmm(original.view(rows, -1), up, down, out=target.view(rows, -1))
    else:
        # fp16/bf16 (or non-contiguous): original + deltas accumulated in fp32, then one cast
        accumulator = scratch.fp32("accumulator", weight.shape, device).copy_(original)
        original_bias = None if backup.bias is None else backup.bias.to(device, torch.float32)
        # every full-size delta is computed from the original before anything is added
        for net, module, m in general:
            with _blame(net, module.key):
                deltas.append(_checked(module.weight_delta(accumulator, m, original_bias), backup))
        if factors:
            accumulator.view(rows, -1).addmm_(up, down)
        for delta in deltas:
            if delta.weight is not None:
                accumulator.add_(delta.weight.reshape(accumulator.shape))
        target.copy_(accumulator)  # casts to the weight's dtype

    bias_deltas = [d.bias for d in deltas if d.bias is not None]
    if bias is not None and backup.bias is not None and bias_deltas:
        patched_bias = backup.bias.to(device, torch.float32)
        for delta_bias in bias_deltas:
            patched_bias = patched_bias + delta_bias.reshape(patched_bias.shape)
        bias_target = _writable(bias, backup.bias, None if spare is None else spare.bias)
        bias_target.copy_(patched_bias)
        _install(bias, bias_target)
    else:
        _put_back(bias, backup.bias)
    _install(weight, target)


_NOT_A_NETWORK_FAULT = (MemoryError, torch.OutOfMemoryError, NetworkApplyError)


@contextmanager
def _blame(network: Network, module: str) -> Iterator[None]:
    """Raise a failure of one network's module as `NetworkApplyError`; interrupts and
    out-of-memory errors are nobody's file's fault and pass as they are."""
    try:
        yield
    except _NOT_A_NETWORK_FAULT:
        raise
    except Exception as error:
        raise NetworkApplyError(network, module, error) from error


def _check_factors(factors: LowRankFactors, weight: Tensor) -> None:
    """Factors whose product does not fit the weight fail here, blamed on their network, rather
    than in the product of every network's factors together."""
    rows, rank = weight.shape[0], factors.rank
    if factors.up.shape != (rows, rank) or factors.down.shape != (rank, weight.numel() // rows):
        raise ValueError(
            f"factors {tuple(factors.up.shape)} @ {tuple(factors.down.shape)} do not fit "
            f"the weight {tuple(weight.shape)}"
        )


def _checked(delta: WeightDelta, backup: _Patched) -> WeightDelta:
    """A full-size delta whose sizes fit the weight and bias, else ValueError."""
    for name, value, original in (
        ("weight", delta.weight, backup.weight),
        ("bias", delta.bias, backup.bias),
    ):
        if value is not None and original is not None and value.numel() != original.numel():
            raise ValueError(
                f"{name} delta of shape {tuple(value.shape)} does not fit {tuple(original.shape)}"
            )
    return delta


def _fp32_contiguous(original: Tensor, target: Tensor) -> bool:
    return (
        original.dtype == target.dtype == torch.float32
        and original.is_contiguous()
        and target.is_contiguous()
    )


@dataclass(frozen=True)
class ModuleDelta:
    """One module's weight change under the applied set (fp32); `bias` is None when unchanged."""

    ref: ModuleRef
    weight: Tensor
    bias: Tensor | None = None


def _weight_of(module: nn.Module) -> Tensor | None:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, Tensor) else None


def _bias_of(module: nn.Module) -> Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, Tensor) else None


__all__ = [
    "Component",
    "ModuleDelta",
    "ModuleProgress",
    "NetworkPatcher",
    "NetworkReport",
    "PatchReport",
]
