"""LoHa (LyCORIS): ΔW = (w1a · w1b) ⊙ (w2a · w2b), each half optionally Tucker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import InvalidModuleError, LowRankModule, Variant, check_equal, check_factor, to_compute


@dataclass(frozen=True, kw_only=True)
class LohaModule(LowRankModule):
    """hada_w{1,2}_a (out, r) and _b (r, in·k·k); with Tucker t{1,2} (r, r, k, k), a (r, out)."""

    variant: ClassVar[Variant] = Variant.LOHA
    w1_a: Tensor
    w1_b: Tensor
    w2_a: Tensor
    w2_b: Tensor
    t1: Tensor | None = None
    t2: Tensor | None = None

    def validate(self) -> None:
        """Each half's factors meet at its rank; both halves rebuild the same shape."""
        if (self.t1 is None) != (self.t2 is None):
            raise InvalidModuleError(self.key, "LoHa Tucker needs both hada_t1 and hada_t2")
        shapes = []
        for n, a, b, t in (
            (1, self.w1_a, self.w1_b, self.t1),
            (2, self.w2_a, self.w2_b, self.t2),
        ):
            check_factor(self.key, f"hada_w{n}_a", a)
            if t is None:
                check_factor(self.key, f"hada_w{n}_b", b, dims=(2, 3, 4))
                check_equal(
                    self.key, f"hada_w{n}_a columns and hada_w{n}_b rows", a.shape[1], b.shape[0]
                )
                shapes.append((a.shape[0], b.flatten(1).shape[1]))
            else:
                check_factor(self.key, f"hada_w{n}_b", b)
                check_factor(self.key, f"hada_t{n}", t, dims=(2, 3, 4))
                check_equal(
                    self.key, f"hada_t{n} dim 0 and hada_w{n}_a rows", t.shape[0], a.shape[0]
                )
                check_equal(
                    self.key, f"hada_t{n} dim 1 and hada_w{n}_b rows", t.shape[1], b.shape[0]
                )
                shapes.append((a.shape[1], b.shape[1], *t.shape[2:]))
        if shapes[0] != shapes[1]:
            raise InvalidModuleError(
                self.key, f"the two LoHa halves rebuild {shapes[0]} and {shapes[1]}"
            )
        super().validate()

    @property
    def rank(self) -> int:
        """The number of rows of hada_w1_b."""
        return self.w1_b.shape[0]

    @property
    def expected_shape(self) -> tuple[int, ...]:
        """(out, in, *k) with Tucker, else (out, in·k·k): the file does not store the kernel."""
        if self.t1 is not None:
            return (self.w1_a.shape[1], self.w1_b.shape[1], *self.t1.shape[2:])
        return (self.w1_a.shape[0], self.w1_b.shape[1])

    def rebuild(self, original_weight: Tensor) -> Tensor:
        """The Hadamard product of the two rebuilt halves."""

        def half(a: Tensor, b: Tensor, t: Tensor | None) -> Tensor:
            a = to_compute(a, original_weight)
            b = to_compute(b, original_weight)
            if t is None:
                return a @ b
            return torch.einsum("pq...,po,qi->oi...", to_compute(t, original_weight), a, b)

        return half(self.w1_a, self.w1_b, self.t1) * half(self.w2_a, self.w2_b, self.t2)
