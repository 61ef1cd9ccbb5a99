"""A running server for the API tests: uvicorn in a background thread on a free port, serving
`webui.server.build_app` over folders the test fills (tiny models, LoRA files)."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from engine_settings import cpu_settings
from fastapi import FastAPI

from webui.engine.generate import Engine
from webui.server import Access, build_app
from webui.settings import Settings


@dataclass(frozen=True)
class RunningServer:
    engine: Engine
    port: int
    app: FastAPI | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def autov3(path: Path) -> str:
    """A1111's LoRA hash: sha256 of a safetensors file's tensor data (after the header)."""
    data = path.read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + header_length :]).hexdigest()[:12]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folders(root: Path) -> Settings:
    for name in ("models", "loras"):
        (root / name).mkdir(parents=True, exist_ok=True)
    return cpu_settings(root / "models", root / "loras", root, save_outputs=False)


@pytest.fixture(scope="module")
def start_server() -> Iterator:
    """Call with (settings, access) to serve a new engine; every server stops at module end."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(settings: Settings, access: Access | None = None) -> RunningServer:
        engine = Engine(settings)
        port = free_port()
        app = build_app(engine, access or Access())
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("the server did not start")
            time.sleep(0.05)
        return RunningServer(engine, port, app)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)
