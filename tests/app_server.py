"""The app under test over a scratch folder (models, loras, outputs, cache, settings file): served
in this process (what `python app.py` builds, under uvicorn on a thread: no second start of
torch, diffusers and Gradio). tests/test_server.py starts the real `python app.py` process."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tests.test_server import free_port

if TYPE_CHECKING:
    from webui.engine.generate import Engine


def app_arguments(tmp: Path, port: int) -> list[str]:
    """`python app.py`'s options for the folders under `tmp`: nothing is written into the repo."""
    return [
        *("--port", str(port), "--device", "cpu"),
        *("--models-dir", str(tmp / "models"), "--loras-dir", str(tmp / "loras")),
        *("--outputs-dir", str(tmp / "outputs"), "--cache-dir", str(tmp / "cache")),
        *("--settings-file", str(tmp / "config.json")),
    ]


def write_app_folder(
    tmp: Path, checkpoint: Path | None = None, settings: dict | None = None
) -> None:
    """The folders `app_arguments` names under `tmp`: models/ (with `checkpoint` copied in as
    `sd.safetensors`), an empty loras/, and `settings` as the settings file."""
    (tmp / "models").mkdir()
    (tmp / "loras").mkdir()
    if checkpoint is not None:
        shutil.copy(checkpoint, tmp / "models" / "sd.safetensors")
    if settings is not None:
        (tmp / "config.json").write_text(json.dumps(settings))


@contextmanager
def running_app(tmp: Path) -> Iterator[str]:
    """The app `python app.py` serves on the folders under `tmp`, in this process; its URL.
    Stopped on exit (close the pages first: an open event stream holds a graceful shutdown)."""
    import uvicorn

    import app

    port = free_port()
    engine, served = app.server_app(app.build_parser().parse_args(app_arguments(tmp, port)))
    warming = threading.Thread(target=app.load_default_quietly, args=(engine,), daemon=True)
    warming.start()
    # log_config None: uvicorn leaves this process's logging as it found it
    config = uvicorn.Config(
        served,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        warming.join(timeout=120)  # a model load left running would slow the next test
        _stop_jobs(engine)
        assert not thread.is_alive(), "the app did not stop"


def _stop_jobs(engine: Engine, timeout: float = 60) -> None:
    """Interrupt what the engine still runs (a failed test's long generation, on a thread of its
    own) until its queue is empty: it would take the next tests' CPU, then abort the exit."""
    from webui.engine.jobs import JobQueue

    jobs = JobQueue.for_engine(engine)
    deadline = time.monotonic() + timeout
    while jobs.status().job_count and time.monotonic() < deadline:
        jobs.interrupt()
        time.sleep(0.1)
