"""Writing one module's patched weights: its record (originals kept as the backup), spare
tensors, fp32 scratch buffers, the summed deltas and the checks on them."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from webui.networks.apply.apply_errors import NetworkApplyError
from webui.networks.apply.planning import NOT_A_NETWORK_FAULT, Contribution
from webui.networks.format.modules import LowRankFactors, NetworkModule, WeightDelta
from webui.networks.format.network import Network


@runtime_checkable
class UpcastOnForward(Protocol):
    """A layer that stores its weights narrower (fp8) and upcasts them to `compute_dtype` for
    each forward (`engine/fp8_storage.py`): its patched weights are held in `compute_dtype`."""

    compute_dtype: torch.dtype


def held_dtype(module: object) -> torch.dtype | None:
    """The dtype a module's patched tensors are held in: a layer that upcasts on forward, its
    compute dtype (a delta rounded to fp8 would mostly vanish); None for the others: the dtype
    their tensors have."""
    return module.compute_dtype if isinstance(module, UpcastOnForward) else None


@dataclass
class Patched:
    """The record of one module whose tensors may not be its originals: the original weight and
    bias themselves (the backup: a patched module is given new tensors, so keeping them copies
    nothing and putting them back is bit-exact by construction), and the contributions its
    weight holds now (None while being written: unknown, so never taken as up to date)."""

    weight: Tensor
    bias: Tensor | None
    contributions: tuple[Contribution, ...] | None = None


@dataclass
class Spare:
    """The patched tensors a restored module let go of, kept to hold its next patch."""

    weight: Tensor | None
    bias: Tensor | None


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors are views of the same memory, from the same first element."""
    return a.device == b.device and a.data_ptr() == b.data_ptr()


def _writable(
    param: Tensor, original: Tensor, held: torch.dtype | None, spare: Tensor | None = None
) -> Tensor:
    """Where `param`'s patched values go, in `held` (None: param's dtype): while it still holds
    the original (the backup must stay untouched) or a dtype too narrow, the spare its module had
    before if it fits, else a new tensor; otherwise its own tensor, written in place."""
    dtype = held or param.dtype
    if not _same_memory(param, original) and param.dtype == dtype:
        return param.detach()
    if spare is not None and _fits(spare, param, dtype):
        return spare
    return torch.empty_like(param, dtype=dtype)


def _fits(spare: Tensor, param: Tensor, dtype: torch.dtype) -> bool:
    return (
        spare.shape == param.shape
        and spare.stride() == param.stride()
        and spare.dtype == dtype
        and spare.device == param.device
    )


def _install(param: Tensor, values: Tensor) -> None:
    """Make `values` (from `_writable`) the parameter's data; nothing to do when written in place."""
    if not _same_memory(param, values):
        param.data = values


def put_back_tensor(
    param: Tensor | None, original: Tensor | None, held: torch.dtype | None = None
) -> Tensor | None:
    """Give `param` its original values: the original tensor itself (also when the patch was
    `held` in a wider dtype than an fp8 original), or a copy of its values when the module has
    been moved to another device or dtype since. Returns the patched tensor the parameter let go
    of, if any."""
    if param is None or original is None:
        return None
    if param.device == original.device and param.dtype in (original.dtype, held):
        released = param.detach()
        param.data = original
        return None if _same_memory(released, original) else released
    if param.dtype == held:  # a weight stored narrower, moved since: stored so again, there
        param.data = original.to(param.device)
    else:
        param.copy_(original)
    return None


class Scratch:
    """fp32 buffers reused by every module and every call, one per (slot, device): the gathered
    low-rank factors and the fp32 accumulator (fresh memory for each module costs more on a CPU
    than the arithmetic). They grow to the largest module seen; `release()` frees them."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], Tensor] = {}

    def fp32(self, slot: str, shape: Sequence[int], device: torch.device) -> Tensor:
        """An uninitialised contiguous fp32 tensor of `shape` on `device`."""
        numel = math.prod(shape)
        buffer = self._buffers.get((slot, device))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32, device=device)
            self._buffers[(slot, device)] = buffer
        return buffer[:numel].view(*shape)

    def gather(self, slot: str, pieces: Sequence[Tensor], dim: int, device: torch.device) -> Tensor:
        """The pieces (any float dtype, on one device) concatenated along `dim` in fp32 on
        `device`, in this slot's buffer: one concatenation where they are, one converting copy."""
        joined = pieces[0] if len(pieces) == 1 else torch.cat(list(pieces), dim=dim)
        return self.fp32(slot, joined.shape, device).copy_(joined)

    def release(self) -> None:
        self._buffers.clear()


def _gathered_factors(
    factors: Sequence[LowRankFactors], scratch: Scratch, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(up, down) of every network on one module in fp32, each network's rows of `down` scaled,
    so that up @ down is the sum of their deltas: one product for all of them."""
    up = scratch.gather("up", [f.up for f in factors], 1, device)
    down = scratch.gather("down", [f.down for f in factors], 0, device)
    offset = 0
    for f in factors:
        if f.scale != 1.0:
            down[offset : offset + f.rank].mul_(f.scale)  # rows: contiguous
        offset += f.rank
    return up, down


def patch(
    weight: Tensor,
    bias: Tensor | None,
    backup: Patched,
    contributions: Sequence[Contribution],
    scratch: Scratch,
    spare: Spare | None = None,
    held: torch.dtype | None = None,
) -> None:
    """weight = original + sum of deltas, computed in fp32 and written once, in the weight's
    dtype (or `held`: the compute dtype of a weight stored in fp8), into the weight's own tensor
    (a new one at its first patch: the original is the backup).

    Low-rank deltas (LoRA, LoCon) are never built full-size on their own: their factors are
    gathered into fp32 buffers, each network's scale on its rows of `down`, and multiplied once
    for all networks together. Other variants add their full-size `weight_delta`. Every delta
    is computed before the module sees new values, so a failure there leaves it untouched."""
    factors: list[LowRankFactors] = []
    general: list[tuple[Network, NetworkModule, float]] = []
    for net, module, multiplier in contributions:
        with blame(net, module.key):
            low_rank = module.low_rank_factors(weight, multiplier)
            if low_rank is not None:
                _check_factors(low_rank, weight)
        if low_rank is None:
            general.append((net, module, multiplier))
        else:
            factors.append(low_rank)
    device, rows = weight.device, weight.shape[0]
    original = backup.weight.to(device)  # no copy on the same device
    if factors:
        up, down = _gathered_factors(factors, scratch, device)
    spare_weight = None if spare is None else spare.weight
    target = _writable(weight, backup.weight, held, spare_weight)
    # brand-new memory: the module still holds its original and had no spare that fits
    fresh = _same_memory(weight, backup.weight) and target is not spare_weight
    deltas: list[WeightDelta] = []
    if not general and _fp32_contiguous(original, target):
        if fresh:  # fresh pages are faulted in faster by a copy than by the product's threads
            target.copy_(original).view(rows, -1).addmm_(up, down)
        else:  # one pass: target = original + up @ down
            torch.addmm(original.view(rows, -1), up, down, out=target.view(rows, -1))
    else:
        # fp16/bf16 (or non-contiguous): original + deltas accumulated in fp32, then one cast
        accumulator = scratch.fp32("accumulator", weight.shape, device).copy_(original)
        original_bias = None if backup.bias is None else backup.bias.to(device, torch.float32)
        # every full-size delta is computed from the original before anything is added
        for net, module, m in general:
            with blame(net, module.key):
                deltas.append(_checked(module.weight_delta(accumulator, m, original_bias), backup))
        if factors:
            accumulator.view(rows, -1).addmm_(up, down)
        for delta in deltas:
            if delta.weight is not None:
                accumulator.add_(delta.weight.reshape(accumulator.shape))
        target.copy_(accumulator)  # casts to the weight's dtype

    bias_deltas = [d.bias for d in deltas if d.bias is not None]
    if bias is not None and backup.bias is not None and bias_deltas:
        patched_bias = backup.bias.to(device, torch.float32)
        for delta_bias in bias_deltas:
            patched_bias = patched_bias + delta_bias.reshape(patched_bias.shape)
        bias_spare = None if spare is None else spare.bias
        bias_target = _writable(bias, backup.bias, held, bias_spare)
        bias_target.copy_(patched_bias)
        _install(bias, bias_target)
    else:
        put_back_tensor(bias, backup.bias, held)
    _install(weight, target)


@contextmanager
def blame(network: Network, module: str) -> Iterator[None]:
    """Raise a failure of one network's module as `NetworkApplyError`; interrupts and
    out-of-memory errors are nobody's file's fault and pass as they are."""
    try:
        yield
    except NOT_A_NETWORK_FAULT:
        raise
    except Exception as error:
        raise NetworkApplyError(network, module, error) from error


def _check_factors(factors: LowRankFactors, weight: Tensor) -> None:
    """Factors whose product does not fit the weight fail here, blamed on their network, rather
    than in the product of every network's factors together."""
    rows, rank = weight.shape[0], factors.rank
    if factors.up.shape != (rows, rank) or factors.down.shape != (rank, weight.numel() // rows):
        raise ValueError(
            f"factors {tuple(factors.up.shape)} @ {tuple(factors.down.shape)} do not fit "
            f"the weight {tuple(weight.shape)}"
        )


def _checked(delta: WeightDelta, backup: Patched) -> WeightDelta:
    """A full-size delta whose sizes fit the weight and bias, else ValueError."""
    for name, value, original in (
        ("weight", delta.weight, backup.weight),
        ("bias", delta.bias, backup.bias),
    ):
        if value is not None and original is not None and value.numel() != original.numel():
            raise ValueError(
                f"{name} delta of shape {tuple(value.shape)} does not fit {tuple(original.shape)}"
            )
    return delta


def _fp32_contiguous(original: Tensor, target: Tensor) -> bool:
    return (
        original.dtype == target.dtype == torch.float32
        and original.is_contiguous()
        and target.is_contiguous()
    )
