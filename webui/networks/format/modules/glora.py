"""GLoRA (LyCORIS): ΔW = (W · a1 · a2 + b1 · [bm] · b2) · alpha/rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import LowRankModule, Variant, check_equal, check_factor, to_compute


@dataclass(frozen=True, kw_only=True)
class GloraModule(LowRankModule):
    """a1 (in, r), a2 (r, in) act on the original's input side; b1 (out, r), b2 (r, in[, k, k])."""

    variant: ClassVar[Variant] = Variant.GLORA
    a1: Tensor
    a2: Tensor
    b1: Tensor
    b2: Tensor
    bm: Tensor | None = None

    def validate(self) -> None:
        """a1 meets a2 and b1 meets b2 (or bm) at their ranks."""
        for name, tensor in (("a1", self.a1), ("a2", self.a2), ("b1", self.b1), ("b2", self.b2)):
            check_factor(self.key, f"{name}.weight", tensor, dims=(2, 3, 4))
        check_equal(
            self.key, "a1 columns and a2 rows", self.a1.flatten(1).shape[1], self.a2.shape[0]
        )
        if self.bm is None:
            check_equal(
                self.key, "b1 columns and b2 rows", self.b1.flatten(1).shape[1], self.b2.shape[0]
            )
        else:
            check_factor(self.key, "bm.weight", self.bm, dims=(2, 3, 4))
            check_equal(
                self.key, "b1 columns and bm dim 0", self.b1.flatten(1).shape[1], self.bm.shape[0]
            )
            check_equal(self.key, "bm dim 1 and b2 rows", self.bm.shape[1], self.b2.shape[0])
        super().validate()

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
