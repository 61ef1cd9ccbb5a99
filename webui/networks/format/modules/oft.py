"""Orthogonal finetuning: block-diagonal OFT (LyCORIS diag-oft, kohya) and butterfly BOFT.

Both rotate the original weight's output rows by Cayley transforms of skew-symmetric blocks,
R = (I + Q)(I − Q)⁻¹ with Q = B − Bᵀ, optionally bounded by ‖Q‖ ≤ alpha · out_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
from torch import Tensor

from .base import (
    InvalidModuleError,
    NetworkModule,
    Variant,
    WeightDelta,
    check_equal,
    check_factor,
    check_scalar,
    to_compute,
)


class OftConstraint(Enum):
    """How a trainer bounds ‖Q‖ by its constraint c = alpha · out_dim."""

    # LyCORIS: Q·c/(‖Q‖+1e-8) only when ‖Q‖+1e-8 > c; c = 0 means unconstrained.
    LYCORIS = "lycoris"
    # kohya sd-scripts networks/oft.py: Q·(min(‖Q‖, c)+1e-8)/(‖Q‖+1e-8), always.
    KOHYA = "kohya"


def cayley_rotations(
    blocks: Tensor, constraint: float, style: OftConstraint = OftConstraint.LYCORIS
) -> Tensor:
    """Return R = (I + Q)(I − Q)⁻¹ per block, Q = B − Bᵀ bounded as the trainer did."""
    q = blocks - blocks.transpose(-1, -2)
    norm = torch.linalg.vector_norm(q)
    if style is OftConstraint.KOHYA:
        q = q * ((norm.clamp(max=constraint) + 1e-8) / (norm + 1e-8))
    elif constraint > 0 and norm + 1e-8 > constraint:
        q = q * (constraint / (norm + 1e-8))
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _rescaled(rotated: Tensor, rescale: Tensor | None, like: Tensor) -> Tensor:
    if rescale is None:
        return rotated
    factors = to_compute(rescale, like).reshape(-1, *[1] * (rotated.dim() - 1))
    return rotated * factors


@dataclass(frozen=True, kw_only=True)
class _BlockRotations(NetworkModule):
    """Orthogonal block rotations of the output axis (OFT, BOFT): oft_blocks (..., num_blocks,
    block_size, block_size), alpha (the constraint), rescale (out,)."""

    blocks: Tensor
    alpha: float | None = None
    rescale: Tensor | None = None

    def validate(self) -> None:
        """Square blocks, a finite alpha, rescale one value per output row."""
        check_factor(self.key, "oft_blocks", self.blocks, dims=(3, 4))
        check_equal(
            self.key, "oft_blocks' last two dims", self.blocks.shape[-1], self.blocks.shape[-2]
        )
        check_scalar(self.key, "alpha", self.alpha)
        if self.rescale is not None:
            check_factor(self.key, "rescale", self.rescale, dims=(1, 2, 3, 4))
            check_equal(
                self.key, "rescale and output rows", self.rescale.numel(), self.out_features
            )

    @property
    def out_features(self) -> int:
        """num_blocks · block_size."""
        return self.blocks.shape[-3] * self.blocks.shape[-2]

    def accepts(self, weight_shape: torch.Size | tuple[int, ...]) -> bool:
        """The blocks must tile the output axis exactly."""
        return len(weight_shape) > 0 and weight_shape[0] == self.out_features

    def _rotations(
        self,
        original_weight: Tensor,
        multiplier: float,
        style: OftConstraint = OftConstraint.LYCORIS,
    ) -> Tensor:
        """The constrained Cayley rotations, each interpolated toward identity by `multiplier`
        (LyCORIS interpolates every block and every BOFT stage, not their product)."""
        self.check_shape(original_weight.shape)
        blocks = to_compute(self.blocks, original_weight)
        constraint = (self.alpha or 0.0) * self.out_features
        rotations = cayley_rotations(blocks, constraint, style)
        eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
        return multiplier * (rotations - eye) + eye


@dataclass(frozen=True, kw_only=True)
class OftModule(_BlockRotations):
    """Diagonal OFT: oft_blocks (num_blocks, block_size, block_size); LyCORIS or kohya constraint."""

    variant: ClassVar[Variant] = Variant.OFT
    constraint_style: OftConstraint = OftConstraint.LYCORIS

    def weight_delta(
        self, original_weight: Tensor, multiplier: float, original_bias: Tensor | None = None
    ) -> WeightDelta:
        """rescale · (m·(R − I) + I)ᵀ W blockwise, minus W (LyCORIS diag-oft / kohya merge)."""
        rotations = self._rotations(original_weight, multiplier, self.constraint_style)
        num_blocks, block_size = self.blocks.shape[0], self.blocks.shape[1]
        grouped = original_weight.reshape(num_blocks, block_size, -1)
        rotated = torch.einsum("knm,knr->kmr", rotations, grouped).reshape(original_weight.shape)
        rotated = _rescaled(rotated, self.rescale, original_weight)
        return WeightDelta(weight=rotated - original_weight, bias=None)


@dataclass(frozen=True, kw_only=True)
class BoftModule(_BlockRotations):
    """oft_blocks (stages, num_blocks, block_size, block_size): butterfly-permuted OFT stages."""

    variant: ClassVar[Variant] = Variant.BOFT

    def validate(self) -> None:
        """Even blocks whose count the butterfly stages divide: stage i pairs rows
        2^i·(block/2) apart, so num_blocks must be a multiple of 2^(stages−1)."""
        super().validate()
        stages, num_blocks, block_size = self.blocks.shape[:3]
        if block_size % 2 or num_blocks % 2 ** (stages - 1):
            raise InvalidModuleError(
                self.key,
                f"BOFT oft_blocks {tuple(self.blocks.shape)}: {stages} butterfly stages need "
                f"an even block size and a number of blocks divisible by {2 ** (stages - 1)}",
            )

    def weight_delta(
        self, original_weight: Tensor, multiplier: float, original_bias: Tensor | None = None
    ) -> WeightDelta:
        """rescale · B_{s−1}⋯B_0 W − W, stage i acting on rows paired 2ⁱ·(block/2) apart."""
        rotations = self._rotations(original_weight, multiplier)
        stages, num_blocks, block_size = (
            self.blocks.shape[0],
            self.blocks.shape[1],
            self.blocks.shape[2],
        )
        rows = original_weight.shape[0]
        current = original_weight.reshape(rows, -1)
        for stage in range(stages):
            stride = (2**stage) * (block_size // 2)
            # Gather rows so each block sees pairs `stride` apart, rotate, scatter back.
            order = torch.arange(rows, device=current.device)
            order = order.reshape(-1, 2, stride).transpose(1, 2).reshape(-1)
            grouped = current[order].reshape(num_blocks, block_size, -1)
            mixed = torch.einsum("kij,kjr->kir", rotations[stage], grouped).reshape(rows, -1)
            current = torch.empty_like(mixed)
            current[order] = mixed
        rotated = _rescaled(current.reshape(original_weight.shape), self.rescale, original_weight)
        return WeightDelta(weight=rotated - original_weight, bias=None)
