"""How strongly a network applies to each part of the model."""

from __future__ import annotations

from dataclasses import dataclass

from webui.networks.keys import Component


@dataclass(frozen=True)
class Strengths:
    """Multipliers per component. `te1`/`te2` (SDXL's two text encoders) default to `te`."""

    te: float = 1.0
    unet: float = 1.0
    te1: float | None = None
    te2: float | None = None

    @classmethod
    def uniform(cls, weight: float) -> Strengths:
        """The same multiplier everywhere, as `<lora:name:W>` means."""
        return cls(te=weight, unet=weight)

    def for_component(self, component: Component, path: str = "") -> float:
        """The multiplier for a module of `component` (`path` is for per-block rules)."""
        if component is Component.UNET:
            return self.unet
        if component is Component.TEXT_ENCODER_2:
            return self.te if self.te2 is None else self.te2
        return self.te if self.te1 is None else self.te1
