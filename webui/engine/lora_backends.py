"""Which backend applies each LoRA of a prompt, and both backends driven as one.

`auto` never drops what it can apply: it gives the native patcher every file it maps (in full,
or in part with a message naming what is left out), and the diffusers fallback only a file
native maps nothing of and diffusers can load; a prompt may mix both. `native` and `diffusers`
force one backend for every LoRA.

Order, so that the two never corrupt each other's weights: fused fallback deltas are taken out
(exactly) before the native patcher writes, and the fallback fuses only when native applies
nothing; unfused PEFT adapters add their output at run time on top of the base layers the
native patcher patched in place (PEFT wraps the very `nn.Linear`/`nn.Conv2d` objects native
holds)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from webui.arch import Arch
from webui.engine.network_set import ChosenNetwork
from webui.networks.apply import (
    DiffusersBackend,
    FallbackReport,
    KeyMap,
    ModuleProgress,
    NetworkApplyError,
    NetworkPatcher,
    PatchReport,
    Strengths,
    refusal_reason,
)
from webui.networks.format import Network
from webui.settings import LoraBackend


@dataclass(frozen=True)
class LoraRoute:
    """Which backend took one LoRA of the prompt, why, and whether it was applied."""

    name: str
    backend: LoraBackend  # NATIVE or DIFFUSERS
    reason: str
    applied: bool = False

    def describe(self) -> str:
        """One line for the UI."""
        state = "applied" if self.applied else "not applied"
        return f"{self.name}: {self.backend.value} backend, {state} ({self.reason})"


@dataclass(frozen=True)
class NativeFit:
    """How much of one file the native patcher maps onto this model."""

    mapped: int  # modules native understands and places
    total: int  # modules in the file (understood or not)
    problem: str | None  # what is left out, in words (None: nothing)

    @property
    def complete(self) -> bool:
        return self.problem is None


def native_fit(network: Network, keymap: KeyMap) -> NativeFit:
    """What the native patcher can apply of `network` on this model."""
    match = keymap.match(network.modules)
    total = len(network.modules) + len(network.unsupported)
    left_out = []
    if network.unsupported:
        left_out.append(f"{len(network.unsupported)} module(s) in a format native does not know")
    if match.unmatched:
        left_out.append(
            f"{len(match.unmatched)} module(s) native does not map to this model, "
            f"e.g. {match.unmatched[0]}"
        )
    return NativeFit(len(match.resolved), total, "; ".join(left_out) or None)


def native_problem(network: Network, keymap: KeyMap) -> str | None:
    """Why the native patcher cannot apply all of `network` to this model (None: it can)."""
    return native_fit(network, keymap).problem


def choose_backend(
    name: str,
    choice: LoraBackend,
    native: NativeFit,
    diffusers: str | None,
    foreign: str | None = None,
) -> LoraRoute:
    """The backend for one LoRA, given the setting, what native maps of it and why diffusers
    cannot load it (None: it can); `foreign` is the sentence refusing a file of a family this
    app does not run."""
    if foreign is not None:  # a family this app does not run: no backend may write it
        return LoraRoute(name, LoraBackend.NATIVE, foreign)
    if choice is LoraBackend.NATIVE:
        return LoraRoute(name, LoraBackend.NATIVE, "LoRA backend setting: native")
    if choice is LoraBackend.DIFFUSERS:
        return LoraRoute(name, LoraBackend.DIFFUSERS, "LoRA backend setting: diffusers")
    if native.complete:
        return LoraRoute(name, LoraBackend.NATIVE, "auto: native maps every module")
    if native.mapped:
        return LoraRoute(
            name,
            LoraBackend.NATIVE,
            f"auto: native applies {native.mapped} of {native.total} modules; "
            f"left out: {native.problem}",
        )
    if diffusers is None:
        return LoraRoute(
            name, LoraBackend.DIFFUSERS, f"auto: native maps none of it ({native.problem})"
        )
    return LoraRoute(
        name,
        LoraBackend.NATIVE,
        f"auto: neither backend can apply it: native maps none of it ({native.problem}); "
        f"diffusers cannot ({diffusers})",
    )


def _refused(network: Network) -> FallbackReport:
    """The report of a file no backend may write: one sentence saying what it is."""
    return FallbackReport(
        name=network.name,
        variants=tuple(v.value for v in network.variants),
        matched=(),
        unmatched=(),
        unsupported=(),
        shape_mismatch=(),
        base=None,
        base_source=network.base.source,
        compatible=False,
        applied=False,
        refusal=network.base.refusal(network.path.name),
    )


@dataclass(frozen=True)
class RoutedReport:
    """The routes of one apply and the backends' combined report."""

    routes: tuple[LoraRoute, ...]
    report: PatchReport
    dropped: tuple[str, ...] = ()  # one warning per network left out because applying it failed

    @property
    def warnings(self) -> list[str]:
        """Every warning for the UI: the networks left out, then the backends' reports."""
        return [*self.dropped, *self.report.warnings]

    @property
    def applied(self) -> tuple[LoraRoute, ...]:
        return tuple(route for route in self.routes if route.applied)


def _combined(reports: Sequence[PatchReport | None]) -> PatchReport | None:
    present = [r for r in reports if r is not None]
    if not present:
        return None
    return PatchReport(
        tuple(n for r in present for n in r.networks),
        sum(r.modules_changed for r in present),
        sum(r.seconds for r in present),
        frozenset(c for r in present for c in r.components_changed),
    )


def _index_of(
    chosen: Sequence[ChosenNetwork], error: NetworkApplyError, dropped: Mapping[int, str]
) -> int | None:
    """The not-yet-dropped entry of `chosen` whose network failed (the same object)."""
    return next(
        (i for i, c in enumerate(chosen) if c.network is error.network and i not in dropped),
        None,
    )


class LoraBackends:
    """The native patcher and the diffusers fallback on one pipeline, with the
    `NetworkPatcher` interface (apply, set_step, restore, is_scheduled) plus routing."""

    def __init__(
        self, pipe: Any, arch: Arch | None = None, *, fuse: bool = False, keep_spares: bool = True
    ) -> None:
        self.native = NetworkPatcher(pipe, arch, keep_spares=keep_spares)
        self.fallback = DiffusersBackend(pipe, arch)
        self.keymap = KeyMap.from_pipeline(pipe)
        self.arch = arch
        self.fuse = fuse

    def route(self, chosen: Sequence[ChosenNetwork], choice: LoraBackend) -> list[LoraRoute]:
        """The backend for every chosen network under `choice`."""
        return [
            choose_backend(
                c.name,
                choice,
                native_fit(c.network, self.keymap),
                refusal_reason(c.network, self.arch),
                c.network.base.refusal(c.network.path.name),
            )
            for c in chosen
        ]

    def apply(
        self,
        chosen: Sequence[ChosenNetwork],
        choice: LoraBackend,
        *,
        total_steps: int = 1,
        on_progress: ModuleProgress | None = None,
    ) -> RoutedReport:
        """Apply the set at step 1, each network through its backend; `on_progress` follows the
        native patcher's modules (the fallback loads a file in one call). A network whose delta
        math fails (the patcher has rolled back) is left out with a warning and the rest applied
        again: at most one retry per network."""
        dropped: dict[int, str] = {}  # index in `chosen` -> warning
        while True:
            kept = [c for i, c in enumerate(chosen) if i not in dropped]
            try:
                routes, report = self._apply_once(kept, choice, total_steps, on_progress)
            except NetworkApplyError as error:
                index = _index_of(chosen, error, dropped)
                if index is None:  # not one of this set's networks: nothing safe to drop
                    raise
                dropped[index] = f"{chosen[index].name}: not applied ({error})"
                continue
            break
        by_chosen = iter(routes)
        all_routes = [
            replace(self.route([c], choice)[0], applied=False) if i in dropped else next(by_chosen)
            for i, c in enumerate(chosen)
        ]
        return RoutedReport(tuple(all_routes), report, tuple(dropped.values()))

    def _apply_once(
        self,
        chosen: Sequence[ChosenNetwork],
        choice: LoraBackend,
        total_steps: int,
        on_progress: ModuleProgress | None,
    ) -> tuple[list[LoraRoute], PatchReport]:
        routes = self.route(chosen, choice)
        by_backend: dict[LoraBackend, list[tuple[Network, Strengths]]] = {
            LoraBackend.NATIVE: [],
            LoraBackend.DIFFUSERS: [],
        }
        refused = [_refused(c.network) for c in chosen if c.network.base.foreign]
        for c, route in zip(chosen, routes, strict=True):
            if not c.network.base.foreign:
                by_backend[route.backend].append((c.network, c.strengths))
        native = by_backend[LoraBackend.NATIVE]
        self.fallback.unfuse()  # fused deltas out (exactly) before native writes any weight
        native_report = self.native.apply(
            native, step=1, total_steps=total_steps, on_progress=on_progress
        )
        self.fallback.fuse = self.fuse and not native
        fallback_report = self.fallback.apply(
            by_backend[LoraBackend.DIFFUSERS], step=1, total_steps=total_steps
        )
        applied = {
            backend: {r.name for r in report.networks if r.applied}
            for backend, report in (
                (LoraBackend.NATIVE, native_report),
                (LoraBackend.DIFFUSERS, fallback_report),
            )
        }
        routes = [
            replace(route, applied=c.network.name in applied[route.backend])
            for c, route in zip(chosen, routes, strict=True)
        ]
        report = _combined(
            [PatchReport(tuple(refused), 0, 0.0, frozenset()), native_report, fallback_report]
        )
        assert report is not None
        return routes, report

    @property
    def is_scheduled(self) -> bool:
        return self.native.is_scheduled or self.fallback.is_scheduled

    def set_step(self, step: int, total_steps: int) -> PatchReport | None:
        """Move both backends' scheduled strengths to `step` (None when nothing is scheduled)."""
        return _combined(
            [self.native.set_step(step, total_steps), self.fallback.set_step(step, total_steps)]
        )

    def restore(self) -> None:
        """Both backends off: the weights are the originals, no PEFT layer is left."""
        self.fallback.unfuse()
        self.native.restore()
        self.fallback.restore()
