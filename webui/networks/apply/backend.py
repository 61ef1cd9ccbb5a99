"""The one interface both LoRA backends implement (the native patcher and the diffusers
fallback), so the engine drives either, or both, the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from webui.networks.apply.reports import PatchReport
from webui.networks.apply.strengths import Strengths
from webui.networks.format.network import Network


@runtime_checkable
class LoraBackend(Protocol):
    """Applies a set of (network, strength) to one pipeline, moves scheduled strengths, and puts
    the base back exactly."""

    def apply(
        self,
        networks: Sequence[tuple[Network, float | Strengths]],
        *,
        step: int = 1,
        total_steps: int = 1,
    ) -> PatchReport:
        """Make the pipeline hold exactly this set (replacing any previous one), scheduled
        strengths taken at `step` of `total_steps`."""
        ...

    def set_step(self, step: int, total_steps: int) -> PatchReport | None:
        """Move scheduled strengths to `step`; None when nothing in the set is scheduled."""
        ...

    def restore(self) -> None:
        """Take the whole set off: the base weights, exactly."""
        ...

    @property
    def is_scheduled(self) -> bool:
        """Whether the current set has strengths that change between steps."""
        ...
