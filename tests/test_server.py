"""`python app.py` starts, serves the page on 127.0.0.1, and generates through the UI's API."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client

from tests.ui_client import generate_via_ui
from webui.arch import Arch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"server exited early:\n{process.stdout.read() if process.stdout else ''}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.fixture
def server(tmp_path: Path, tiny_checkpoint_factory):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "tiny.safetensors")
    port = free_port()
    # a real process: the one test of the server entry point as the README starts it (the other
    # CLI tests call app.main in-process; the browser tests skip without Chromium)
    process = subprocess.Popen(
        [
            sys.executable,
            "app.py",
            "--port",
            str(port),
            "--models-dir",
            str(models),
            "--device",
            "cpu",
            *("--outputs-dir", str(tmp_path / "outputs"), "--cache-dir", str(tmp_path / "cache")),
            *("--settings-file", str(tmp_path / "config.json")),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        yield url, wait_for(url, process)
    finally:
        # killed, not stopped: nothing to flush, and a graceful stop waits out its 5 s timeout
        # on the Gradio client's heartbeat stream, which closing the client does not end
        process.kill()
        process.wait(timeout=30)


def test_serves_the_page_and_generates(server) -> None:
    url, page = server
    assert "LoRA WebUI" in page  # the page title, set through Gradio's config
    client = Client(url, verbose=False)
    try:
        gallery, infotext, warnings, *_ = generate_via_ui(
            client,
            **{"Prompt": "a cat", "Negative prompt": "", "Sampler": "Euler", "Steps": 2},
            **{"Width": 64, "Height": 64, "CFG scale": 7, "Seed (-1 = random)": 5},
        )
    finally:
        client.close()  # its heartbeat thread
    assert len(gallery) == 1
    assert "Seed: 5" in infotext and "Model: tiny" in infotext
    assert warnings == ""
