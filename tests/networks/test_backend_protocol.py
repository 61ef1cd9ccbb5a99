"""Both LoRA backends implement the one `LoraBackend` protocol: same methods, and each method
accepts every parameter the protocol names, of the same kind and default."""

from __future__ import annotations

import inspect
import types

import pytest

from webui.networks.apply import DiffusersBackend, LoraBackend, NetworkPatcher

METHODS = ("apply", "set_step", "restore")


@pytest.mark.parametrize("backend", [NetworkPatcher, DiffusersBackend], ids=lambda c: c.__name__)
def test_backend_matches_the_protocol(backend: type) -> None:
    assert isinstance(backend.is_scheduled, property)
    for name in METHODS:
        wanted = inspect.signature(getattr(LoraBackend, name)).parameters
        got = inspect.signature(getattr(backend, name)).parameters
        for param in wanted.values():
            assert param.name in got, f"{backend.__name__}.{name} lacks {param.name}"
            assert got[param.name].kind == param.kind
            assert got[param.name].default == param.default
        extra = [p for p in got.values() if p.name not in wanted]
        assert all(p.default is not inspect.Parameter.empty for p in extra), extra


def test_instances_are_runtime_checked() -> None:
    pipe = types.SimpleNamespace(unet=None)  # no components: nothing to patch, enough to build both
    assert isinstance(NetworkPatcher(pipe), LoraBackend)
    assert isinstance(DiffusersBackend(pipe), LoraBackend)
    assert not isinstance(object(), LoraBackend)
