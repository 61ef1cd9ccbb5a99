"""What a LoRA file is: its header and weights-only pickle reads, key formats, the base it was made
for, the variant table and typed modules, `Network`/`load_network`, PEFT alphas, training
metadata, embeddings bundled in it, and `inspect-lora`'s summary. The only door of the package:
other packages import from `webui.networks.format`, never from its inner modules."""

from webui.networks.format.base_detection import (
    BaseDetection,
    detect_base,
    fits,
    modelspec_architecture,
)
from webui.networks.format.files import (
    FileHashes,
    NetworkFileError,
    SafetensorsHeader,
    compute_hashes,
    is_safetensors,
    load_tensors,
    read_header,
    read_metadata,
    write_safetensors,
)
from webui.networks.format.inspection import (
    EXAMPLES,
    LoraInspection,
    ModelCheck,
    NotALoraError,
    format_text,
    inspect_network,
    refuse_checkpoint,
    verdict,
)
from webui.networks.format.key_formats import UNKNOWN, identify_format
from webui.networks.format.modules import (
    InvalidModuleError,
    LowRankModule,
    NetworkModule,
    Variant,
    file_variants,
)
from webui.networks.format.network import Network, load_network, read_network
from webui.networks.format.training_metadata import TrainingFacts, tag_frequency, training_facts

__all__ = [
    "EXAMPLES",
    "UNKNOWN",
    "BaseDetection",
    "FileHashes",
    "InvalidModuleError",
    "LoraInspection",
    "LowRankModule",
    "ModelCheck",
    "Network",
    "NetworkFileError",
    "NetworkModule",
    "NotALoraError",
    "SafetensorsHeader",
    "TrainingFacts",
    "Variant",
    "compute_hashes",
    "detect_base",
    "file_variants",
    "fits",
    "format_text",
    "identify_format",
    "inspect_network",
    "is_safetensors",
    "load_network",
    "load_tensors",
    "modelspec_architecture",
    "read_header",
    "read_metadata",
    "read_network",
    "refuse_checkpoint",
    "tag_frequency",
    "training_facts",
    "verdict",
    "write_safetensors",
]
