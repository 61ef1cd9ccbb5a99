"""Apply a set of (Network, strength) to a diffusers pipeline's weights, natively.

- The deltas of every network on one module are summed in fp32 on the weight's device and
  written once, in the weight's dtype (a weight stored in fp8: in its layer's compute dtype).
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
import time
from collections.abc import Iterator, Sequence

import torch

from webui.arch import Arch
from webui.networks.apply.blocks import BlockMap, model_blocks
from webui.networks.apply.keys import Component, KeyMap, ModuleRef
from webui.networks.apply.planning import (
    Contribution,
    Plan,
    Signature,
    bias_of,
    plan_network,
    signature,
    weight_of,
)
from webui.networks.apply.reports import ModuleDelta, ModuleProgress, NetworkReport, PatchReport
from webui.networks.apply.strengths import Strengths
from webui.networks.apply.writing import (
    Patched,
    Scratch,
    Spare,
    held_dtype,
    patch,
    put_back_tensor,
)
from webui.networks.format.network import Network

log = logging.getLogger(__name__)


class NetworkPatcher:
    """Patches one pipeline's text encoder(s) and denoiser (UNet or transformer) in place. Not thread-safe: the engine
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
        self._scratch = Scratch()
        self._spares: dict[ModuleRef, Spare] = {}
        # the one record of what is patched: a module without an entry holds its originals
        self._patched: dict[ModuleRef, Patched] = {}
        self._set: list[tuple[Network, Strengths]] = []
        self._blocks: BlockMap = model_blocks(pipe, arch)

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
        plan = Plan()
        reports = [
            self._plan_network(network, strengths.at_step(step, total_steps), plan)
            for network, strengths in wanted_set
        ]
        wanted = {key: signature(contribs) for key, contribs in plan.targets.items()}
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

    def plan(self, networks: Sequence[Network]) -> PatchReport:
        """The dry run: how each network maps onto this model (matched, unmatched, shape
        mismatches, whether its base fits), with nothing written and the current set kept."""
        started = time.perf_counter()
        reports = tuple(
            plan_network(network, Strengths(), self.keymap, self.arch, self._blocks)
            for network in networks
        )
        return PatchReport(reports, 0, time.perf_counter() - started)

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

    def _plan_network(self, network: Network, strengths: Strengths, plan: Plan) -> NetworkReport:
        return plan_network(network, strengths, self.keymap, self.arch, self._blocks, plan)

    # -- writing ------------------------------------------------------------------------------

    def _holds(self, key: ModuleRef) -> Signature | None:
        """What a module's weight holds now: () for its originals, None when unknown."""
        record = self._patched.get(key)
        if record is None:
            return ()
        return None if record.contributions is None else signature(record.contributions)

    @torch.no_grad()
    def _write(
        self, changed: list[ModuleRef], plan: Plan, on_progress: ModuleProgress | None = None
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

    def _set_module(self, key: ModuleRef, contributions: Sequence[Contribution]) -> None:
        """Make one module hold `contributions` (none: its originals), its record kept true at
        every point an exception can stop it."""
        weight, bias = weight_of(key.module), bias_of(key.module)
        record = self._patched.get(key)
        if not contributions:
            if record is not None:
                self._put_back(key, record)
            return
        assert weight is not None  # planned modules have a weight
        if record is None:  # recorded before anything is written: the originals are the backup
            record = Patched(weight.detach(), None if bias is None else bias.detach())
            self._patched[key] = record
        record.contributions = None
        spare = self._spares.pop(key, None)
        patch(weight, bias, record, contributions, self._scratch, spare, held_dtype(key.module))
        record.contributions = tuple(contributions)

    def _roll_back(
        self,
        changed: list[ModuleRef],
        previous: dict[ModuleRef, tuple[Contribution, ...] | None],
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

    def _put_back(self, key: ModuleRef, record: Patched) -> None:
        """Give a module its original tensors, forget its record, and keep what it let go of as
        its spare. Safe to repeat: a module holding its originals lets go of nothing."""
        weight, bias = weight_of(key.module), bias_of(key.module)
        record.contributions = None  # a failure between weight and bias leaves it half done
        held = held_dtype(key.module)
        spare = Spare(
            put_back_tensor(weight, record.weight, held), put_back_tensor(bias, record.bias, held)
        )
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
            weight, bias = weight_of(key.module), bias_of(key.module)
            bias_delta = None
            if bias is not None and backup.bias is not None and not torch.equal(bias, backup.bias):
                bias_delta = bias.float() - backup.bias.to(bias.device, torch.float32)
            yield ModuleDelta(
                key,
                weight.float() - backup.weight.to(weight.device, torch.float32),
                bias_delta,
            )


__all__ = [
    "Component",
    "ModuleDelta",
    "ModuleProgress",
    "NetworkPatcher",
    "NetworkReport",
    "PatchReport",
]
