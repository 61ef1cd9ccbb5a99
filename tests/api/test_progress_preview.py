"""`/sdapi/v1/progress` returns the running job's live preview as `current_image` (base64 PNG)."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time
from dataclasses import replace

import requests
from conftest import folders
from PIL import Image

from webui.arch import Arch


def test_progress_returns_a_preview_during_a_run(
    start_server, tmp_path_factory, tiny_checkpoint_factory
) -> None:
    settings = replace(folders(tmp_path_factory.mktemp("preview")), live_preview_every=1)
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), settings.models_dir / "tiny.safetensors")
    server = start_server(settings)
    server.engine.load("tiny")
    body = {"prompt": "a cat", "steps": 150, "width": 64, "height": 64}
    done: list[int] = []
    worker = threading.Thread(
        target=lambda: done.append(
            requests.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=300).status_code
        )
    )
    worker.start()
    preview = None
    while worker.is_alive() and preview is None:
        preview = requests.get(server.url + "/sdapi/v1/progress", timeout=30).json()[
            "current_image"
        ]
        time.sleep(0.02)
    worker.join()
    assert done == [200]
    assert preview is not None
    image = Image.open(io.BytesIO(base64.b64decode(preview)))
    assert image.format == "PNG" and image.size == (8, 8)
    idle = requests.get(server.url + "/sdapi/v1/progress", timeout=30).json()
    assert idle["current_image"] is None  # no job, no preview
