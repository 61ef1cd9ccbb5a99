"""(IA)³ (LyCORIS): W' = W · (1 + m·w), w scaling output rows or, with on_input, input columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import NetworkModule, Variant, WeightDelta, check_factor, to_compute


@dataclass(frozen=True, kw_only=True)
class Ia3Module(NetworkModule):
    """`weight` holds one factor per output (or, on_input, per input) channel."""

    variant: ClassVar[Variant] = Variant.IA3
    weight: Tensor
    on_input: bool

    def validate(self) -> None:
        """At least one float factor."""
        check_factor(self.key, "weight", self.weight, dims=(1, 2, 3, 4))

    @property
    def channels(self) -> int:
        """The number of scaled channels (LyCORIS stores conv factors as (1, c, 1, 1))."""
        return self.weight.numel()

    def accepts(self, weight_shape: torch.Size | tuple[int, ...]) -> bool:
        """The scaled axis must have one entry per factor."""
        axis = 1 if self.on_input else 0
        return len(weight_shape) > axis and weight_shape[axis] == self.channels

    def weight_delta(
        self, original_weight: Tensor, multiplier: float, original_bias: Tensor | None = None
    ) -> WeightDelta:
        """W · (m·w) broadcast along the scaled axis."""
        self.check_shape(original_weight.shape)
        factors = to_compute(self.weight, original_weight).flatten() * multiplier
        ones = [1] * (original_weight.dim() - 2)
        shape = (1, -1, *ones) if self.on_input else (-1, 1, *ones)
        factors = factors.reshape(shape)
        return WeightDelta(weight=original_weight * factors, bias=None)
