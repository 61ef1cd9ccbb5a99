"""Applying networks to a loaded pipeline: the pure plan (what maps where), the native patcher
(the only writer of model weights), the diffusers fallback, both behind one `LoraBackend`
protocol, strengths per component/block/step, UNet blocks, the key map, and extraction's SVD
math (its inverse). The only door of the package: other packages import from
`webui.networks.apply`, never from its inner modules."""

from webui.networks.apply.apply_errors import NetworkApplyError
from webui.networks.apply.backend import LoraBackend
from webui.networks.apply.diffusers_backend import (
    DiffusersBackend,
    FallbackReport,
    has_peft_layers,
    refusal_reason,
)
from webui.networks.apply.extract import (
    EXTRACTION_METADATA_KEY,
    BflFusion,
    ExtractedModule,
    ExtractionRecord,
    RankRule,
    SourceLora,
    kohya_name,
    lora_metadata,
    lora_state_dict,
    low_rank,
    overall_error,
)
from webui.networks.apply.keys import Component, KeyMap, ModuleRef
from webui.networks.apply.patcher import NetworkPatcher
from webui.networks.apply.planning import plan_network
from webui.networks.apply.reports import (
    ModuleDelta,
    ModuleProgress,
    NetworkReport,
    PatchReport,
    model_check,
)
from webui.networks.apply.strengths import Strengths

__all__ = [
    "EXTRACTION_METADATA_KEY",
    "BflFusion",
    "Component",
    "DiffusersBackend",
    "ExtractedModule",
    "ExtractionRecord",
    "FallbackReport",
    "KeyMap",
    "LoraBackend",
    "ModuleDelta",
    "ModuleProgress",
    "ModuleRef",
    "NetworkApplyError",
    "NetworkPatcher",
    "NetworkReport",
    "PatchReport",
    "RankRule",
    "SourceLora",
    "Strengths",
    "has_peft_layers",
    "kohya_name",
    "lora_metadata",
    "lora_state_dict",
    "low_rank",
    "model_check",
    "overall_error",
    "plan_network",
    "refusal_reason",
]
