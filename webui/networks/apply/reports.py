"""What an apply did: a report per network and per call, the change it made per module, and
the `inspect-lora` summary of a report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from webui.arch import Arch
from webui.networks.apply.keys import Component, ModuleRef
from webui.networks.format.inspection import EXAMPLES, ModelCheck

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
    notes: tuple[str, ...] = ()  # strengths not applied as asked (a wrong block vector, ...)

    @property
    def warnings(self) -> list[str]:
        """One line per problem, naming the network, for the UI."""
        out: list[str] = []
        if not self.compatible:
            out.append(
                f"{self.name}: made for {self.base.value if self.base else '?'} ({self.base_source}), not applied to this model"
            )
            return out
        out += [f"{self.name}: {note}" for note in self.notes]
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


@dataclass(frozen=True)
class ModuleDelta:
    """One module's weight change under the applied set (fp32); `bias` is None when unchanged."""

    ref: ModuleRef
    weight: Tensor
    bias: Tensor | None = None


def model_check(report: NetworkReport, model: str, model_arch: Arch) -> ModelCheck:
    """Summarize the patcher's report of this network on one model."""
    return ModelCheck(
        model=model,
        model_arch=model_arch.value,
        base_fits=report.compatible,
        matched=len(report.matched),
        unmatched=len(report.unmatched),
        shape_mismatch=len(report.shape_mismatch),
        unsupported=len(report.unsupported),
        matched_examples=report.matched[:EXAMPLES],
        unmatched_examples=report.unmatched[:EXAMPLES],
        shape_mismatch_examples=report.shape_mismatch[:EXAMPLES],
        warnings=tuple(report.warnings),
    )
