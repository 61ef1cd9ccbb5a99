"""Per-variant LoRA math: typed modules that turn a file's tensors into weight deltas."""

from .base import (
    InvalidModuleError,
    LowRankFactors,
    LowRankModule,
    NetworkModule,
    ShapeMismatchError,
    Variant,
    WeightDecompose,
    WeightDelta,
    low_rank_scale,
)
from .full import FullModule, NormModule
from .glora import GloraModule
from .ia3 import Ia3Module
from .loha import LohaModule
from .lokr import LokrModule
from .lora import LoraModule
from .oft import BoftModule, OftConstraint, OftModule, cayley_rotations
from .registry import (
    VARIANT_MARKERS,
    UnsupportedModuleError,
    canonical_suffix,
    file_variants,
    group_by_module,
    module_variant,
    parse_module,
    split_module_key,
)

__all__ = [
    "VARIANT_MARKERS",
    "BoftModule",
    "FullModule",
    "GloraModule",
    "Ia3Module",
    "InvalidModuleError",
    "LohaModule",
    "LokrModule",
    "LoraModule",
    "LowRankFactors",
    "LowRankModule",
    "NetworkModule",
    "NormModule",
    "OftConstraint",
    "OftModule",
    "ShapeMismatchError",
    "UnsupportedModuleError",
    "Variant",
    "WeightDecompose",
    "WeightDelta",
    "canonical_suffix",
    "cayley_rotations",
    "file_variants",
    "group_by_module",
    "low_rank_scale",
    "module_variant",
    "parse_module",
    "split_module_key",
]
