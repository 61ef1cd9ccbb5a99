"""The running cluster the tests talk to (over loopback)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import requests


@dataclass(frozen=True)
class Cluster:
    port: int
    root: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def jobs(self) -> dict:
        return requests.get(f"{self.url}/cluster/jobs", timeout=10).json()
