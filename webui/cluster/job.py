"""A generation job as it travels to a replica: the request, the checkpoint, and the LoRA set
it will apply (so the router can judge each replica's switch cost without loading anything)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from webui.cluster.affinity import LoraSet
from webui.engine.generate import Engine, GenerationRequest
from webui.engine.network_set import choose_networks
from webui.prompt import parse_prompt


@dataclass(frozen=True)
class ClusterJob:
    """One request for one replica; `attempt` 2 is the retry after a replica was lost."""

    job_id: str
    name: str
    request: GenerationRequest
    model: str | None
    wanted: LoraSet
    modules: Mapping[str, frozenset[str]] = field(default_factory=dict)
    attempt: int = 1


def lora_key(path: Path, loras_dir: Path) -> str:
    """A LoRA file as every node names it: its path under the shared loras/ folder."""
    try:
        return path.resolve().relative_to(loras_dir.resolve()).as_posix()
    except ValueError:  # outside loras/: only its own path names it
        return str(path.resolve())


def wanted_set(
    engine: Engine, request: GenerationRequest, model: str | None
) -> tuple[LoraSet, dict[str, frozenset[str]]]:
    """The set `request` applies and each of its files' module names (the patcher's unit of
    writing), read through the engine's catalog; unknown names are left to the replica to
    report, as a single process does."""
    tags = parse_prompt(request.prompt).tags
    ignored: list[str] = []
    chosen = choose_networks(tags, engine.catalog, ignored) if tags else []
    loras_dir = engine.settings.loras_dir
    entries = frozenset((lora_key(c.network.path, loras_dir), repr(c.strengths)) for c in chosen)
    modules = {lora_key(c.network.path, loras_dir): frozenset(c.network.modules) for c in chosen}
    return LoraSet(model, entries), modules
