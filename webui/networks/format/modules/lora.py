"""LoRA / LoCon (kohya, LyCORIS, PEFT, diffusers names): ΔW = up · [mid] · down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import (
    LowRankFactors,
    LowRankModule,
    Variant,
    check_equal,
    check_factor,
    to_compute,
)


@dataclass(frozen=True, kw_only=True)
class LoraModule(LowRankModule):
    """up (out, r[, 1, 1]), down (r, in[, k, k]) and an optional Tucker mid (r, r, k, k)."""

    variant: ClassVar[Variant] = Variant.LORA
    up: Tensor
    down: Tensor
    mid: Tensor | None = None

    def validate(self) -> None:
        """up's columns meet mid (Tucker) or down's rows: the rank must agree."""
        check_factor(self.key, "lora_up", self.up, dims=(2, 3, 4))
        check_factor(self.key, "lora_down", self.down, dims=(2, 3, 4))
        up_columns = self.up.flatten(1).shape[1]
        if self.mid is None:
            check_equal(
                self.key, "lora_up columns and lora_down rows (rank)", up_columns, self.rank
            )
        else:
            check_factor(self.key, "lora_mid", self.mid, dims=(2, 3, 4))
            check_equal(
                self.key, "lora_up columns and lora_mid dim 0", up_columns, self.mid.shape[0]
            )
            check_equal(self.key, "lora_mid dim 1 and lora_down rows", self.mid.shape[1], self.rank)
        super().validate()

    @property
    def rank(self) -> int:
        """The number of rows of down."""
        return self.down.shape[0]

    @property
    def kernel(self) -> tuple[int, ...]:
        """The spatial kernel of the target (empty for Linear)."""
        source = self.mid if self.mid is not None else self.down
        return tuple(source.shape[2:])

    @property
    def expected_shape(self) -> tuple[int, ...]:
        """(out, in, *kernel)."""
        return (self.up.shape[0], self.down.shape[1], *self.kernel)

    def truncated(self, dyn: int) -> LoraModule:
        """The DyLoRA sub-network of the first `dyn` ranks, alpha kept (kohya's extraction)."""
        if dyn >= self.rank:
            return self
        mid = None if self.mid is None else self.mid[:dyn, :dyn]
        return LoraModule(
            key=self.key,
            alpha=self.alpha,
            dora=self.dora,
            bias_diff=self.bias_diff,
            up=self.up[:, :dyn],
            down=self.down[:dyn],
            mid=mid,
        )

    def rebuild(self, original_weight: Tensor) -> Tensor:
        """up @ down flattened, or the Tucker product up ×₀ mid ×₁ down."""
        up = to_compute(self.up, original_weight).flatten(1)
        down = to_compute(self.down, original_weight).flatten(1)
        if self.mid is None:
            return up @ down
        mid = to_compute(self.mid, original_weight)
        return torch.einsum("pq...,op,qi->oi...", mid, up, down)

    def low_rank_factors(self, weight: Tensor, multiplier: float) -> LowRankFactors | None:
        """(up, down, scale·m), a Tucker mid folded into down; None with DoRA (not a product)
        or a bias difference (the factors carry no bias)."""
        if self.dora is not None or self.bias_diff is not None:
            return None
        self.check_shape(weight.shape)
        down = self.down.flatten(1)
        if self.mid is not None:
            # up ×₀ mid ×₁ down = up @ (mid ×₁ down): (r, in, *k) flattened to (r, in·k·k)
            mid, down = to_compute(self.mid, weight), to_compute(down, weight)
            down = torch.einsum("pq...,qi->pi...", mid, down).flatten(1)
        return LowRankFactors(up=self.up.flatten(1), down=down, scale=self.scale * multiplier)
