"""LoKr (LyCORIS): ΔW = w1 ⊗ w2, each factor stored whole or as a low-rank (Tucker) pair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import LowRankModule, Variant, check_equal, check_factor, to_compute


@dataclass(frozen=True, kw_only=True)
class LokrModule(LowRankModule):
    """w1 (a, c) or w1_a·w1_b; w2 (b, d[, k, k]) or w2_a·w2_b, or Tucker t2 ×₀ w2_a ×₁ w2_b."""

    variant: ClassVar[Variant] = Variant.LOKR
    w1: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t2: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.w1 is None) == (self.w1_a is None or self.w1_b is None):
            raise ValueError(f"{self.key}: LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        if (self.w2 is None) == (self.w2_a is None or self.w2_b is None):
            raise ValueError(f"{self.key}: LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
        super().__post_init__()

    def validate(self) -> None:
        """Factored halves meet at their rank; a Tucker t2 meets w2_a and w2_b."""
        if self.w1 is not None:
            check_factor(self.key, "lokr_w1", self.w1)
        else:
            assert self.w1_a is not None and self.w1_b is not None
            check_factor(self.key, "lokr_w1_a", self.w1_a)
            check_factor(self.key, "lokr_w1_b", self.w1_b)
            check_equal(
                self.key,
                "lokr_w1_a columns and lokr_w1_b rows",
                self.w1_a.shape[1],
                self.w1_b.shape[0],
            )
        if self.w2 is not None:
            check_factor(self.key, "lokr_w2", self.w2, dims=(2, 3, 4))
        else:
            assert self.w2_a is not None and self.w2_b is not None
            check_factor(self.key, "lokr_w2_a", self.w2_a)
            if self.t2 is None:
                check_factor(self.key, "lokr_w2_b", self.w2_b, dims=(2, 3, 4))
                check_equal(
                    self.key,
                    "lokr_w2_a columns and lokr_w2_b rows",
                    self.w2_a.shape[1],
                    self.w2_b.shape[0],
                )
            else:
                check_factor(self.key, "lokr_w2_b", self.w2_b)
                check_factor(self.key, "lokr_t2", self.t2, dims=(2, 3, 4))
                check_equal(
                    self.key,
                    "lokr_t2 dim 0 and lokr_w2_a rows",
                    self.t2.shape[0],
                    self.w2_a.shape[0],
                )
                check_equal(
                    self.key,
                    "lokr_t2 dim 1 and lokr_w2_b rows",
                    self.t2.shape[1],
                    self.w2_b.shape[0],
                )
        super().validate()

    @property
    def rank(self) -> int | None:
        """The rank of the factored half; None when both halves are whole (LyCORIS: scale 1)."""
        # w*_b is (r, ...) in every layout, while a Tucker w2_a is (r, b), not (b, r).
        if self.w1_b is not None:
            return self.w1_b.shape[0]
        if self.w2_b is not None:
            return self.w2_b.shape[0]
        return None

    def _w1_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return (self.w1.shape[0], self.w1.shape[1])
        assert self.w1_a is not None and self.w1_b is not None
        return (self.w1_a.shape[0], self.w1_b.shape[1])

    @property
    def expected_shape(self) -> tuple[int, ...]:
        """(a·b, c·d, *k); a factored non-Tucker conv w2 is flattened to (a·b, c·d·k·k)."""
        a, c = self._w1_shape()
        if self.w2 is not None:
            b, d, *kernel = self.w2.shape
        elif self.t2 is not None:
            assert self.w2_a is not None and self.w2_b is not None
            b, d, kernel = self.w2_a.shape[1], self.w2_b.shape[1], list(self.t2.shape[2:])
        else:
            assert self.w2_a is not None and self.w2_b is not None
            b, d, kernel = self.w2_a.shape[0], self.w2_b.shape[1], []
        return (a * b, c * d, *kernel)

    def rebuild(self, original_weight: Tensor) -> Tensor:
        """kron(w1, w2), w1 broadcast over w2's kernel axes."""
        if self.w1 is not None:
            w1 = to_compute(self.w1, original_weight)
        else:
            assert self.w1_a is not None and self.w1_b is not None
            w1 = to_compute(self.w1_a, original_weight) @ to_compute(self.w1_b, original_weight)
        if self.w2 is not None:
            w2 = to_compute(self.w2, original_weight)
        else:
            assert self.w2_a is not None and self.w2_b is not None
            w2_a = to_compute(self.w2_a, original_weight)
            w2_b = to_compute(self.w2_b, original_weight)
            if self.t2 is None:
                w2 = w2_a @ w2_b.flatten(1)
            else:
                t2 = to_compute(self.t2, original_weight)
                w2 = torch.einsum("pq...,po,qi->oi...", t2, w2_a, w2_b)
        # kron pads the smaller operand with leading axes, but the kernel axes trail;
        # it also needs a contiguous w2 (a Tucker einsum result is not).
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
        return torch.kron(w1, w2.contiguous())
