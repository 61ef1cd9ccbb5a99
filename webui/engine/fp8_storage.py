"""fp8 weights kept in fp8 (as Forge and ComfyUI do): a FLUX.1 transformer's Linear layers hold
the file's fp8 tensors and upcast them to the compute dtype inside each forward only, so the
transformer takes about half the memory of bf16 weights.

Why our own layer and not diffusers' `apply_layerwise_casting`: its hooks `module.to()` the
parameters at every call, replacing their tensors (the patcher's backup is the stored tensor
itself) and rounding a patched compute-dtype weight back to fp8 after each forward."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

FP8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})


class UpcastLinear(nn.Linear):
    """A Linear whose weight and bias may be stored in fp8: each forward computes on copies in
    `compute_dtype`, made and dropped there; the parameters are never replaced, so a patched
    weight (already in the compute dtype) is used as it is."""

    compute_dtype: torch.dtype

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        has_bias = linear.bias is not None
        super().__init__(linear.in_features, linear.out_features, bias=has_bias, device="meta")
        self.weight = linear.weight  # the very Parameter objects: nothing is copied
        self.bias = linear.bias
        self.compute_dtype = compute_dtype

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype
        return F.linear(x, _upcast(self.weight, dtype), _upcast(self.bias, dtype))


def _upcast(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if tensor is None or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)  # fp8 -> bf16/fp16/fp32 is exact


def keep_fp8(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Make every Linear of `model` whose weight is fp8 an `UpcastLinear` sharing its parameters,
    and upcast (exactly) every other fp8 parameter or buffer to `compute_dtype` (norm scales,
    whose layers compute in their weight's dtype). Returns the number of Linear layers kept fp8."""
    kept = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module.weight.dtype in FP8_DTYPES:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, UpcastLinear(module, compute_dtype))
            kept += 1
    for module in model.modules():
        if isinstance(module, UpcastLinear):
            continue
        own = (*module.parameters(recurse=False), *module.buffers(recurse=False))
        for tensor in own:
            if tensor.dtype in FP8_DTYPES:
                tensor.data = tensor.data.to(compute_dtype)
    log.debug("%d Linear layers keep their fp8 weights (computing in %s)", kept, compute_dtype)
    return kept


def fp8_stored(model: nn.Module | None) -> bool:
    """Whether `model` keeps fp8 weights with `keep_fp8` (what the model's load line says)."""
    return model is not None and any(isinstance(m, UpcastLinear) for m in model.modules())
