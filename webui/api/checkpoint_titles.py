"""Checkpoints as A1111 names them: `title` is the file path below `models/` with its extension
and the short hash (`sub/model.safetensors [6ce0161689]`), `model_name` that path without the
extension and with `/` turned into `_`. Clients may name a checkpoint by any of these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from webui.engine.generate import DEMO_MODEL_NAME, Engine


@dataclass(frozen=True)
class CheckpointTitle:
    engine_name: str  # what Engine.load takes
    file_name: str  # path below models/ with extension
    sha256: str | None
    filename: str  # the absolute path ("" for the demo model)

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.file_name} [{self.short_hash}]" if self.short_hash else self.file_name

    @property
    def model_name(self) -> str:
        return Path(self.file_name.replace("/", "_")).stem if self.filename else self.file_name

    def is_named(self, wanted: str) -> bool:
        """Whether `wanted` names this checkpoint: its title, file name, model name, engine
        name, short hash or sha256 (case-insensitive, as A1111's lookup)."""
        names = {self.title, self.file_name, self.model_name, self.engine_name}
        names |= {h for h in (self.short_hash, self.sha256) if h}
        return wanted.strip().lower() in {n.lower() for n in names}


def checkpoint_titles(engine: Engine) -> list[CheckpointTitle]:
    """Every checkpoint in `models/` with its sha256 (hashed once per file version, then
    cached), or the demo model when there is none."""
    models_dir = engine.settings.models_dir
    titles = [
        CheckpointTitle(
            c.name,
            c.path.relative_to(models_dir).as_posix(),
            engine.hashes.sha256(c.path) if c.path.is_file() else None,
            str(c.path),
        )
        for c in engine.checkpoints()
    ]
    return titles or [CheckpointTitle(DEMO_MODEL_NAME, DEMO_MODEL_NAME, None, "")]


def find_checkpoint(titles: list[CheckpointTitle], wanted: str) -> CheckpointTitle | None:
    return next((t for t in titles if t.is_named(wanted)), None)
