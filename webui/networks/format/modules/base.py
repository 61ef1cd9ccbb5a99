"""The contract every LoRA variant implements: one module of a file, one weight delta."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


class Variant(Enum):
    """The network algorithms we can apply; DoRA is a LoRA/LoHa/LoKr with a weight decompose."""

    LORA = "lora"
    LOHA = "loha"
    LOKR = "lokr"
    IA3 = "ia3"
    GLORA = "glora"
    OFT = "oft"
    BOFT = "boft"
    FULL = "full"
    NORM = "norm"


class ShapeMismatchError(ValueError):
    """A module's tensors do not fit the weight it was matched to."""


class InvalidModuleError(ValueError):
    """A module's tensors contradict each other or their variant (ranks that disagree, a 0-d
    factor, a non-scalar alpha): the file is malformed, not merely of an unknown format."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key!r}: {reason}")


def check_factor(key: str, name: str, tensor: Tensor, dims: tuple[int, ...] = (2,)) -> None:
    """Raise InvalidModuleError unless `tensor` is a non-empty float tensor with one of `dims`."""
    if tensor.dim() not in dims:
        allowed = " or ".join(map(str, dims))
        raise InvalidModuleError(
            key, f"{name} has shape {tuple(tensor.shape)}, expected {allowed} dims"
        )
    if tensor.numel() == 0:
        raise InvalidModuleError(key, f"{name} is empty (shape {tuple(tensor.shape)})")
    if not tensor.is_floating_point():
        raise InvalidModuleError(key, f"{name} holds {tensor.dtype}, not floats")


def check_equal(key: str, what: str, left: int, right: int) -> None:
    """Raise InvalidModuleError naming `what` when two sizes that must agree differ."""
    if left != right:
        raise InvalidModuleError(key, f"{what} disagree ({left} vs {right})")


def check_scalar(key: str, name: str, value: float | None) -> None:
    """Raise InvalidModuleError when a scalar parameter is NaN or infinite."""
    if value is not None and not math.isfinite(value):
        raise InvalidModuleError(key, f"{name} is {value}, not a finite number")


@dataclass(frozen=True)
class LowRankFactors:
    """A weight delta kept as two small factors: ΔW = scale · up @ down, `scale` holding every
    multiplier (alpha/rank, the strength). `down` is flattened past dim 0, so the product has the
    shape of the target weight flattened to (out, -1).

    The factors are the file's tensors (any float dtype, any device), not copies: the patcher
    converts them once, straight into its fp32 buffers on the weight's device."""

    up: Tensor  # (out, r)
    down: Tensor  # (r, in·k·k)
    scale: float

    @property
    def rank(self) -> int:
        return self.up.shape[1]


@dataclass(frozen=True)
class WeightDelta:
    """fp32 tensors to add to the original weight and bias (None: leave it as it is)."""

    weight: Tensor | None
    bias: Tensor | None


def to_compute(tensor: Tensor, like: Tensor) -> Tensor:
    """Return `tensor` as fp32 on the device of `like`, where all delta math runs."""
    return tensor.to(device=like.device, dtype=torch.float32)


def low_rank_scale(alpha: float | None, rank: int | None) -> float:
    """Return alpha / rank; an absent or zero alpha, or no rank at all, means no scaling (1.0)."""
    # LyCORIS and kohya both read alpha=0/None as "alpha = rank".
    if rank is None or alpha is None or alpha == 0:
        return 1.0
    return alpha / rank


@dataclass(frozen=True, kw_only=True)
class NetworkModule(ABC):
    """One target module's tensors from a network file, able to compute its weight delta."""

    key: str
    variant: ClassVar[Variant]

    def __post_init__(self) -> None:
        self.validate()

    @abstractmethod
    def validate(self) -> None:
        """Raise InvalidModuleError (naming the key and the tensor) when the tensors cannot
        form this variant; checked at construction, so a built module is well-formed."""

    @property
    def expected_shape(self) -> tuple[int, ...] | None:
        """The target weight shape the tensors imply (may be flattened past dim 0), or None."""
        return None

    def accepts(self, weight_shape: torch.Size | tuple[int, ...]) -> bool:
        """Whether this module can patch a weight of `weight_shape` (Linear and 1x1 conv agree)."""
        expected = self.expected_shape
        if expected is None:
            return True
        return (
            len(weight_shape) > 0
            and weight_shape[0] == expected[0]
            and math.prod(weight_shape) == math.prod(expected)
        )

    def check_shape(self, weight_shape: torch.Size | tuple[int, ...]) -> None:
        """Raise ShapeMismatchError naming the key when `accepts(weight_shape)` is false."""
        if not self.accepts(weight_shape):
            raise ShapeMismatchError(
                f"{self.key}: {self.variant.value} expects a weight of shape "
                f"{self.expected_shape}, the target has {tuple(weight_shape)}"
            )

    @abstractmethod
    def weight_delta(
        self, original_weight: Tensor, multiplier: float, original_bias: Tensor | None = None
    ) -> WeightDelta:
        """Return the fp32 delta that makes `original + delta` the trainer's patched weight.

        `original_weight` is fp32 on the target device; the delta lands on the same device.
        """

    def low_rank_factors(self, weight: Tensor, multiplier: float) -> LowRankFactors | None:
        """The delta at `multiplier` as two small factors, for variants whose delta is exactly
        one product of two matrices (so the patcher can add it without building it full-size);
        None for the others, whose delta comes from `weight_delta`.

        `weight` is the target weight (any dtype): it gives the device and the shape to check.
        """
        return None


@dataclass(frozen=True)
class WeightDecompose:
    """DoRA's magnitude: the patched weight's norm per output row or per input column."""

    magnitude: Tensor
    on_output: bool

    def apply(self, merged: Tensor, multiplier: float) -> Tensor:
        """Rescale `merged` (W + full-strength ΔW) to the magnitude, the LyCORIS way.

        W' = merged · (m·(magnitude/‖merged‖ − 1) + 1), the norm taken per output row
        (on_output) or per input column over the output and kernel axes.
        """
        rest = [1] * (merged.dim() - 1)
        if self.on_output:
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *rest)
            magnitude = self.magnitude.reshape(-1, *rest)
        else:
            columns = merged.transpose(0, 1).reshape(merged.shape[1], -1)
            norm = columns.norm(dim=1).reshape(1, -1, *rest[1:])
            magnitude = self.magnitude.reshape(1, -1, *rest[1:])
        # LyCORIS adds fp32 eps so an all-zero row cannot divide by zero.
        norm = norm + torch.finfo(merged.dtype).eps
        factor = to_compute(magnitude, merged) / norm
        if multiplier != 1:
            factor = multiplier * (factor - 1) + 1
        return merged * factor


@dataclass(frozen=True, kw_only=True)
class LowRankModule(NetworkModule):
    """A variant whose delta is a rebuilt ΔW times alpha/rank, with an optional DoRA step."""

    alpha: float | None = None
    dora: WeightDecompose | None = None
    bias_diff: Tensor | None = None  # ComfyUI's LoraSave writes `diff_b` beside the factors

    def validate(self) -> None:
        """alpha finite; a DoRA magnitude with one entry per output row (or some input columns);
        a bias difference with one entry per output row."""
        check_scalar(self.key, "alpha", self.alpha)
        if self.bias_diff is not None:
            check_factor(self.key, "diff_b", self.bias_diff, dims=(1,))
            if self.expected_shape is not None:
                rows = self.expected_shape[0]
                check_equal(self.key, "diff_b and output rows", self.bias_diff.numel(), rows)
        if self.dora is None:
            return
        check_factor(self.key, "DoRA magnitude", self.dora.magnitude, dims=(1,))
        if self.dora.on_output and self.expected_shape is not None:
            check_equal(
                self.key,
                "DoRA magnitude and output rows",
                self.dora.magnitude.numel(),
                self.expected_shape[0],
            )

    @property
    @abstractmethod
    def rank(self) -> int | None:
        """The rank alpha is divided by, or None when the variant has no rank (scale 1)."""

    @property
    def scale(self) -> float:
        """alpha / rank: the only place any low-rank variant computes its scale."""
        return low_rank_scale(self.alpha, self.rank)

    @abstractmethod
    def rebuild(self, original_weight: Tensor) -> Tensor:
        """Return the unscaled ΔW in fp32 on the original's device (any shape of equal size),
        as a new tensor the caller may modify."""

    def weight_delta(
        self, original_weight: Tensor, multiplier: float, original_bias: Tensor | None = None
    ) -> WeightDelta:
        """ΔW·scale·m, or with DoRA: decompose(W + ΔW·scale, m) − W; the bias gets diff_b·m."""
        self.check_shape(original_weight.shape)
        rebuilt = self.rebuild(original_weight).reshape(original_weight.shape)
        bias = None
        if self.bias_diff is not None and original_bias is not None:  # no bias: ComfyUI skips it
            bias = to_compute(self.bias_diff, original_weight) * multiplier
        if self.dora is None:
            # rebuild() always returns a fresh tensor, so scale it in place: no second full-size
            # allocation (fresh pages dominate the cost of patching on a CPU)
            return WeightDelta(weight=rebuilt.mul_(self.scale * multiplier), bias=bias)
        diff = rebuilt * self.scale
        merged = self.dora.apply(original_weight + diff, multiplier)
        return WeightDelta(weight=merged - original_weight, bias=bias)
