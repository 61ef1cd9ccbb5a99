"""The error the patcher raises when one network's delta math fails, after it has rolled back:
callers drop that network with a warning and apply the others."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from webui.networks.network import Network


class NetworkApplyError(ValueError):
    """One network's module could not be applied; the model's weights are as before the call.

    `network` is the Network object, `module` the file's module key, `cause` the exception."""

    def __init__(self, network: Network, module: str, cause: BaseException) -> None:
        self.network = network
        self.module = module
        self.cause = cause
        super().__init__(f"{network.name}: module {module!r} could not be applied: {cause}")

    @property
    def network_name(self) -> str:
        return self.network.name
