"""Everything about LoRA files: reading them, mapping their keys, patching a pipeline.

The public API:

    from webui.networks import load_network, NetworkPatcher, Strengths
    net = load_network("loras/style.safetensors")
    patcher = NetworkPatcher(pipe)
    report = patcher.apply([(net, 0.8), (other, Strengths(te=0.5, unet=1.0))])
    patcher.restore()
"""

from webui.networks.network import Network, load_network
from webui.networks.patcher import NetworkPatcher, NetworkReport, PatchReport
from webui.networks.strengths import Strengths

__all__ = ["Network", "NetworkPatcher", "NetworkReport", "PatchReport", "Strengths", "load_network"]
