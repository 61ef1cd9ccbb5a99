"""Two CPU replicas behind `serve-cluster`, driven through the A1111 API with `webuiapi`: same
images as one process, LoRA-set affinity, progress and interrupt reaching the replica, and a
replica killed mid-job."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import webuiapi
from engine_settings import cpu_settings
from gradio_client import Client
from ray_cluster import Cluster
from ui_client import generate_via_ui

from webui.engine.generate import Engine, GenerationRequest

pytestmark = pytest.mark.cluster

UI_INTERRUPT = "/interrupt"
SMALL = {"width": 64, "height": 64, "cfg_scale": 7.0, "sampler_name": "Euler a"}


def api(cluster: Cluster) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=cluster.port)


def local_images(cluster: Cluster, prompt: str, seed: int, steps: int, count: int = 1) -> list:
    """The same request rendered by one engine in this process (the single-process reference)."""
    root = cluster.root
    settings = cpu_settings(root / "models", root / "loras", root / "local", save_outputs=False)
    engine = Engine(settings)
    engine.load(engine.checkpoints()[0].name)
    request = GenerationRequest(
        prompt=prompt, steps=steps, seed=seed, width=64, height=64, batch_count=count
    )
    return [np.asarray(i.image) for i in engine.generate(request).images]


def done_by_prompt(cluster: Cluster, prompt: str) -> list[dict]:
    return [r for r in cluster.jobs()["done"] if r["prompt"] == prompt]


def wait_running(cluster: Cluster, prompt: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [r for r in cluster.jobs()["running"] if r["prompt"] == prompt]
        if running and running[0]["step"] > 0:
            return running[0]
        time.sleep(0.1)
    raise AssertionError(f"{prompt!r} never started")


def wait_in_flight(cluster: Cluster, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = requests.get(f"{cluster.url}/sdapi/v1/progress", timeout=10).json()
        if progress["state"]["job_count"] >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"never {count} jobs in flight")


def test_images_equal_a_single_process_run(cluster: Cluster) -> None:
    prompt = "a fox <lora:qset:0.8>"
    result = api(cluster).txt2img(prompt=prompt, seed=1234, steps=3, **SMALL)
    (expected,) = local_images(cluster, prompt, 1234, 3)
    assert np.array_equal(np.asarray(result.image.convert("RGB")), expected)


def test_requests_go_to_the_replica_holding_their_set(cluster: Cluster) -> None:
    """One request at a time: the router's own record decides (no reports to wait for), and
    ties go to the replica sent a job longest ago, so the placement is the same on every run."""
    client = api(cluster)
    order = ["qset", "kset", "qset", "kset", "qset", "kset"]
    for i, name in enumerate(order):
        client.txt2img(prompt=f"affinity {i} <lora:{name}>", seed=i, steps=1, **SMALL)
    replicas = {
        name: {done_by_prompt(cluster, f"affinity {i} <lora:{n}>")[0]["replica"]
               for i, n in enumerate(order) if n == name}
        for name in ("qset", "kset")
    }  # fmt: skip
    # each set stays on one replica once placed, and the two sets are on different ones
    assert len(replicas["qset"]) == 1 and len(replicas["kset"]) == 1
    assert replicas["qset"] != replicas["kset"]
    later = [r for r in cluster.jobs()["done"] if r["prompt"].startswith("affinity")][2:]
    assert not any(r["switched"] for r in later)


def test_progress_and_interrupt_reach_the_running_replica(cluster: Cluster) -> None:
    prompt = "long <lora:kset>"
    outcome: dict = {}

    def run() -> None:
        outcome["result"] = api(cluster).txt2img(
            prompt=prompt, seed=5, steps=150, n_iter=4, **SMALL
        )

    thread = threading.Thread(target=run)
    thread.start()
    record = wait_running(cluster, prompt)
    progress = requests.get(f"{cluster.url}/sdapi/v1/progress", timeout=10).json()
    assert progress["state"]["job_count"] >= 1 and progress["progress"] > 0
    holder = done_by_prompt(cluster, "affinity 1 <lora:kset>")[0]["replica"]
    assert record["replica"] == holder
    requests.post(f"{cluster.url}/sdapi/v1/interrupt", timeout=10).raise_for_status()
    thread.join(120)
    assert outcome["result"].info["interrupted"] is True
    assert len(outcome["result"].images) < 4
    (finished,) = done_by_prompt(cluster, prompt)
    assert finished["replica"] == holder and finished["interrupted"]


def test_progress_and_interrupt_reach_the_replica_of_a_ui_generation(cluster: Cluster) -> None:
    prompt = "from the page <lora:qset>"
    client = Client(cluster.url, verbose=False)
    outcome: dict = {}

    def run() -> None:
        outcome["outputs"] = generate_via_ui(
            client,
            **{"Prompt": prompt, "Negative prompt": "", "Steps": 150, "Batch count": 4},
            **{"Width": 64, "Height": 64, "Seed (-1 = random)": 7},
        )

    thread = threading.Thread(target=run)
    thread.start()
    record = wait_running(cluster, prompt)
    holder = done_by_prompt(cluster, "affinity 0 <lora:qset>")[0]["replica"]
    assert record["replica"] == holder
    progress = requests.get(f"{cluster.url}/sdapi/v1/progress", timeout=10).json()
    assert progress["progress"] > 0
    client.predict(api_name=UI_INTERRUPT)  # the page's Interrupt button
    thread.join(120)
    gallery, *_ = outcome["outputs"]
    assert len(gallery) < 4
    (finished,) = done_by_prompt(cluster, prompt)
    assert finished["replica"] == holder and finished["interrupted"]


def test_options_report_the_model_the_replicas_run(cluster: Cluster) -> None:
    client = api(cluster)
    assert client.get_options()["sd_model_checkpoint"].startswith("tiny.safetensors ")
    client.set_options({"sd_model_checkpoint": "tiny2"})
    try:
        assert client.get_options()["sd_model_checkpoint"].startswith("tiny2.safetensors ")
        # A holds one replica; the next job joins it (the model is loaded there now); with two
        # jobs there the idle replica takes the other and loads the model itself
        results: dict = {}

        def run(name: str, steps: int) -> None:
            results[name] = client.txt2img(prompt=f"model {name}", seed=3, steps=steps, **SMALL)

        threads = [threading.Thread(target=run, args=("A", 150))]
        threads[0].start()
        wait_running(cluster, "model A")
        threads.append(threading.Thread(target=run, args=("B", 2)))
        threads[1].start()
        wait_in_flight(cluster, 2)
        run("C", 2)
        for t in threads:
            t.join(120)
        for result in results.values():
            assert re.search(r"Model: tiny2(,|$)", result.info["infotexts"][0], re.M)
        ran_on = {done_by_prompt(cluster, f"model {n}")[0]["replica"] for n in "ABC"}
        assert len(ran_on) == 2
    finally:
        client.set_options({"sd_model_checkpoint": "tiny"})
    assert client.get_options()["sd_model_checkpoint"].startswith("tiny.safetensors ")


def test_a_killed_replicas_job_is_finished_by_the_other(cluster: Cluster) -> None:
    prompt = "killed <lora:vset>"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = api(cluster).txt2img(prompt=prompt, seed=9, steps=40, **SMALL)
        except RuntimeError as exc:  # webuiapi raises on an error status
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    victim = wait_running(cluster, prompt)
    os.kill(victim["pid"], signal.SIGKILL)
    thread.join(120)
    if "error" in outcome:  # the only other allowed ending: a clear error
        assert "lost twice" in str(outcome["error"])
        return
    (expected,) = local_images(cluster, prompt, 9, 40)
    assert np.array_equal(np.asarray(outcome["result"].image.convert("RGB")), expected)
    (retry,) = done_by_prompt(cluster, prompt)
    assert retry["attempt"] == 2 and retry["pid"] != victim["pid"]
    # the other replica keeps serving, and Serve brings the killed one back
    assert api(cluster).txt2img(prompt="after <lora:qset>", seed=1, steps=1, **SMALL).images
    assert Path(cluster.log).exists()
