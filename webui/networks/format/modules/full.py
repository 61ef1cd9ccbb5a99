"""Full-rank differences: LyCORIS `full` (diff, diff_b) and `norm` (w_norm, b_norm)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .base import NetworkModule, Variant, WeightDelta, check_equal, check_factor, to_compute

logger = logging.getLogger(__name__)


def _scaled_bias(
    key: str, bias: Tensor | None, original_bias: Tensor | None, like: Tensor, multiplier: float
) -> Tensor | None:
    if bias is None:
        return None
    if original_bias is None:
        # LyCORIS drops a bias difference when the layer has no bias.
        logger.debug("%s: the target has no bias; its bias difference is ignored", key)
        return None
    return to_compute(bias, like) * multiplier


@dataclass(frozen=True, kw_only=True)
class FullModule(NetworkModule):
    """diff has the target weight's shape; diff_b the bias's."""

    variant: ClassVar[Variant] = Variant.FULL
    diff: Tensor
    diff_b: Tensor | None = None

    def validate(self) -> None:
        """A non-empty diff; diff_b one value per output row."""
        check_factor(self.key, "diff", self.diff, dims=(1, 2, 3, 4))
        if self.diff_b is not None:
            check_factor(self.key, "diff_b", self.diff_b, dims=(1,))
            check_equal(self.key, "diff_b and diff rows", self.diff_b.numel(), self.diff.shape[0])

    @property
    def expected_shape(self) -> tuple[int, ...]:
        """The shape of diff."""
        return tuple(self.diff.shape)

    def weight_delta(
        self, original_weight: Tensor, multiplier: float, original_bias: Tensor | None = None
    ) -> WeightDelta:
        """m·diff and m·diff_b."""
        self.check_shape(original_weight.shape)
        weight = to_compute(self.diff, original_weight).reshape(original_weight.shape)
        bias = _scaled_bias(self.key, self.diff_b, original_bias, original_weight, multiplier)
        return WeightDelta(weight=weight * multiplier, bias=bias)


@dataclass(frozen=True, kw_only=True)
class NormModule(NetworkModule):
    """w_norm and b_norm: differences for a LayerNorm/GroupNorm weight and bias."""

    variant: ClassVar[Variant] = Variant.NORM
    w_norm: Tensor
    b_norm: Tensor | None = None

    def validate(self) -> None:
        """A non-empty w_norm; b_norm of the same size."""
        check_factor(self.key, "w_norm", self.w_norm, dims=(1,))
        if self.b_norm is not None:
            check_factor(self.key, "b_norm", self.b_norm, dims=(1,))
            check_equal(
                self.key, "b_norm and w_norm sizes", self.b_norm.numel(), self.w_norm.numel()
            )

    @property
    def expected_shape(self) -> tuple[int, ...]:
        """The shape of w_norm."""
        return tuple(self.w_norm.shape)

    def weight_delta(
        self, original_weight: Tensor, multiplier: float, original_bias: Tensor | None = None
    ) -> WeightDelta:
        """m·w_norm and m·b_norm."""
        self.check_shape(original_weight.shape)
        weight = to_compute(self.w_norm, original_weight).reshape(original_weight.shape)
        bias = _scaled_bias(self.key, self.b_norm, original_bias, original_weight, multiplier)
        return WeightDelta(weight=weight * multiplier, bias=bias)
