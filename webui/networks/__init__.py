"""Everything about LoRA files, in three sub-packages, each entered only by its `__init__`:
`format` (what a file is), `library` (the `loras/` and `embeddings/` folders) and `apply`
(patching a pipeline).

    from webui.networks import load_network, NetworkPatcher, Strengths
    net = load_network("loras/style.safetensors")
    patcher = NetworkPatcher(pipe)
    report = patcher.apply([(net, 0.8), (other, Strengths(te=0.5, unet=1.0))])
    patcher.restore()
"""

from webui.networks.apply import NetworkPatcher, NetworkReport, PatchReport, Strengths
from webui.networks.format import Network, load_network

__all__ = ["Network", "NetworkPatcher", "NetworkReport", "PatchReport", "Strengths", "load_network"]
