"""A local Ray cluster with 2 CPU replicas behind `python app.py serve-cluster`, started once for
the cluster tests (skipped when Ray is not installed), on loopback only, ended by process group."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

pytest.importorskip("ray", reason="Ray is an optional install (requirements-serve.txt)")

from lora_files import write_kohya_layers
from ray_cluster import Cluster

from webui.arch import Arch
from webui.engine.model_factory import ModelSpec, build_pipeline

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 150  # head, Serve and two replicas importing torch, on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_loras(loras: Path) -> None:
    """Sets over different modules, so switching between them has different costs."""
    pipe = build_pipeline(ModelSpec(Arch.SD1))
    for name, projection, seed in (("qset", "to_q", 1), ("kset", "to_k", 2), ("vset", "to_v", 3)):
        write_kohya_layers(
            loras / f"{name}.safetensors",
            pipe,
            Arch.SD1,
            include=lambda _c, path, p=projection: path.rsplit(".", 1)[-1] == p,
            seed=seed,
            std=0.3,
        )


@pytest.fixture(scope="session")
def cluster(tiny_checkpoint_factory, tmp_path_factory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    for name in ("models", "loras", "out", "cache"):
        (root / name).mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), root / "models" / "tiny.safetensors")
    shutil.copy(root / "models" / "tiny.safetensors", root / "models" / "tiny2.safetensors")
    write_loras(root / "loras")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env["PYTHONPATH"] = str(ROOT)
    log = root / "server.log"
    command = [
        sys.executable, str(ROOT / "app.py"), "serve-cluster",
        "--models-dir", str(root / "models"), "--loras-dir", str(root / "loras"),
        "--outputs-dir", str(root / "out"), "--cache-dir", str(root / "cache"),
        "--device", "cpu", "--port", str(port), "--replicas", "2",
        "--ray-temp-dir", str(Path("/tmp") / f"ray-c1-{port}"),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        cluster = Cluster(port, root, log)
        _wait_until_serving(cluster, process)
        yield cluster
    finally:
        _end_group(process)
        shutil.rmtree(Path("/tmp") / f"ray-c1-{port}", ignore_errors=True)


def _wait_until_serving(cluster: Cluster, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve-cluster exited:\n{cluster.log.read_text()[-4000:]}")
        try:
            if requests.get(f"{cluster.url}/sdapi/v1/samplers", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    pytest.fail(f"serve-cluster not serving in {START_TIMEOUT_S} s:\n{cluster.log.read_text()}")


def _end_group(process: subprocess.Popen) -> None:
    """SIGTERM the whole group (Ray's own processes included), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # Ray's agents outlive the driver
