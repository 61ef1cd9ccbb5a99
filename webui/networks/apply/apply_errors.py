"""The error that names the one network an apply failed on, so the caller can drop it and retry."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from webui.networks.format.network import Network


class NetworkApplyError(ValueError):
    """One network's delta (or its plan) failed on one module. Raised by `NetworkPatcher.apply`
    after the model is rolled back; the cause is chained. Never raised for interrupts or
    out-of-memory errors: those are nobody's file's fault and propagate as they are."""

    def __init__(self, network: Network, module: str, cause: BaseException) -> None:
        what = str(cause) or type(cause).__name__
        super().__init__(f"{network.path.name}: module {module}: {what}")
        self.network = network
        self.module = module
        self.cause = cause
        self.__cause__ = cause

    @property
    def network_name(self) -> str:
        return self.network.name


# Errors that are nobody's file's fault: they propagate as they are, never as NetworkApplyError.
NOT_A_NETWORK_FAULT = (MemoryError, torch.OutOfMemoryError, NetworkApplyError)
