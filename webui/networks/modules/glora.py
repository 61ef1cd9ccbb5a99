"""GLoRA (LyCORIS): ΔW = (W · a1 · a2 + b1 · [bm] · b2) · alpha/rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import LowRankModule, Variant, to_compute


@dataclass(frozen=True, kw_only=True)
class GloraModule(LowRankModule):
    """a1 (in, r), a2 (r, in) act on the original's input side; b1 (out, r), b2 (r, in[, k, k])."""

    variant: ClassVar[Variant] = Variant.GLORA
    a1: Tensor
    a2: Tensor
    b1: Tensor
    b2: Tensor
    bm: Tensor | None = None

    @property
    def rank(self) -> int:
        """The number of rows of a2."""
        return self.a2.shape[0]

    @property
    def expected_shape(self) -> tuple[int, ...]:
        """(out, in, *kernel)."""
        kernel = (self.bm if self.bm is not None else self.b2).shape[2:]
        return (self.b1.shape[0], self.b2.shape[1], *kernel)

    def rebuild(self, original_weight: Tensor) -> Tensor:
        """W·a1·a2 (over W's input axis) plus the b product, shaped like W."""
        a1 = to_compute(self.a1, original_weight).flatten(1)
        a2 = to_compute(self.a2, original_weight).flatten(1)
        b1 = to_compute(self.b1, original_weight).flatten(1)
        b2 = to_compute(self.b2, original_weight).flatten(1)
        if self.bm is None:
            wb = (b1 @ b2).reshape(original_weight.shape)
        else:
            bm = to_compute(self.bm, original_weight)
            wb = torch.einsum("pq...,op,qi->oi...", bm, b1, b2)
        wa = torch.einsum("oi...,ij,jk->ok...", original_weight, a1, a2)
        return wa + wb
