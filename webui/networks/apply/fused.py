"""A file module on a fused BFL weight (FLUX.1 `qkv`, `linear1`, the final modulation), seen
from one of the split diffusers modules it lands on: the fused delta is computed as the file
means it, then the target's rows are taken (LoRA: up's rows, down shared; LoKr, LoHa, full
diffs alike; a DoRA magnitude per output row is split by rows the same way)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from webui.networks.format.modules import NetworkModule
from webui.networks.format.modules.base import (
    LowRankFactors,
    LowRankModule,
    WeightDecompose,
    WeightDelta,
)

Rows = tuple[tuple[int, int], ...]


def take_rows(tensor: Tensor, rows: Rows) -> Tensor:
    """The rows of `tensor` in `rows` (ranges, concatenated in order)."""
    return torch.cat([tensor[start:stop] for start, stop in rows], dim=0)


@dataclass(frozen=True, kw_only=True)
class RowPiece(NetworkModule):
    """`inner` (a module of the fused weight, `fused_rows` rows) restricted to `rows`."""

    inner: NetworkModule
    rows: Rows
    fused_rows: int

    @property
    def variant(self):  # type: ignore[override]
        return self.inner.variant

    @property
    def piece_rows(self) -> int:
        return sum(stop - start for start, stop in self.rows)

    def validate(self) -> None:
        """Nothing beyond the inner module's own checks."""

    @property
    def expected_shape(self) -> tuple[int, ...] | None:
        expected = self.inner.expected_shape
        if expected is None:
            return None
        return (self.piece_rows, math.prod(expected) // expected[0])

    def accepts(self, weight_shape: torch.Size | tuple[int, ...]) -> bool:
        expected = self.inner.expected_shape
        dora = getattr(self.inner, "dora", None)
        if dora is not None and not dora.on_output:
            return False  # column norms span the whole fused weight: not splittable by rows
        if expected is not None and expected[0] != self.fused_rows:
            return False
        return super().accepts(weight_shape)

    def low_rank_factors(self, weight: Tensor, multiplier: float) -> LowRankFactors | None:
        """A low-rank inner module's factors with up's rows taken (down is shared): the fused
        delta is then never built, once for each piece of the fused weight."""
        self.check_shape(weight.shape)
        fused = weight.new_empty(()).expand(self.fused_rows, *weight.shape[1:])  # shape only
        factors = self.inner.low_rank_factors(fused, multiplier)
        if factors is None:
            return None
        return replace(factors, up=take_rows(factors.up, self.rows))

    def weight_delta(
        self, original_weight: Tensor, multiplier: float, original_bias: Tensor | None = None
    ) -> WeightDelta:
        fused = original_weight.new_zeros((self.fused_rows, *original_weight.shape[1:]))
        dora = getattr(self.inner, "dora", None)
        if dora is None:
            bias = None if original_bias is None else original_bias.new_zeros(self.fused_rows)
            delta = self.inner.weight_delta(fused, multiplier, bias)
            return WeightDelta(
                weight=None if delta.weight is None else take_rows(delta.weight, self.rows),
                bias=None if delta.bias is None else take_rows(delta.bias, self.rows),
            )
        assert isinstance(self.inner, LowRankModule)
        plain = replace(self.inner, dora=None)
        diff = take_rows(plain.weight_delta(fused, 1.0).weight, self.rows)  # type: ignore[arg-type]
        magnitude = take_rows(dora.magnitude.reshape(-1), self.rows)
        merged = WeightDecompose(magnitude, on_output=True).apply(
            original_weight + diff, multiplier
        )
        return WeightDelta(weight=merged - original_weight, bias=None)
