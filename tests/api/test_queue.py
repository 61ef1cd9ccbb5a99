"""One queue for UI and API work: jobs run one at a time in arrival order, concurrent requests
all complete with their own seeds, and progress reports the running job."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import webuiapi
from conftest import RunningServer, folders
from gradio_client import Client

from tests.ui_client import generate_via_ui
from webui.api.infotext_fields import a1111_fields
from webui.engine.generate import Engine, GenerationRequest
from webui.engine.jobs import JobQueue

SMALL = {"width": 64, "height": 64, "steps": 3, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory) -> RunningServer:
    return start_server(folders(tmp_path_factory.mktemp("queue")))


def test_jobs_run_one_at_a_time_in_arrival_order(tmp_path) -> None:
    queue = JobQueue(Engine(folders(tmp_path)))
    release = threading.Event()
    order: list[int] = []

    def job(number: int) -> int:
        def work(report) -> int:
            if number == 0:
                release.wait(10)
            order.append(number)
            return number * 10

        return queue.run(f"job {number}", work)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(job, 0)]
        for number in range(1, 6):  # each queued only once the previous one is waiting
            futures.append(pool.submit(job, number))
            deadline = time.monotonic() + 10
            while queue.status().job_count < number + 1 and time.monotonic() < deadline:
                time.sleep(0.005)
        status = queue.status()
        assert (status.job, status.job_count) == ("job 0", 6)
        release.set()
        assert [f.result(timeout=10) for f in futures] == [0, 10, 20, 30, 40, 50]
    assert order == [0, 1, 2, 3, 4, 5]
    assert queue.status().job_count == 0


def test_a_failing_job_does_not_block_the_next(tmp_path) -> None:
    queue = JobQueue(Engine(folders(tmp_path)))

    def fail(report) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        queue.run("bad", fail)
    assert queue.run("good", lambda report: 1) == 1


def test_an_interrupt_while_the_model_loads_stops_the_job(tmp_path) -> None:
    engine = Engine(folders(tmp_path))
    queue = JobQueue(engine)
    loading, generated = threading.Event(), []

    def slow_load() -> None:
        loading.set()
        time.sleep(0.5)

    engine.load_default = slow_load  # type: ignore[method-assign]
    engine.generate = lambda *a, **k: generated.append(1)  # type: ignore[method-assign]
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(queue.generate, GenerationRequest(prompt="x", steps=2))
        assert loading.wait(10)
        queue.interrupt()
        result = future.result(timeout=10)
    assert result.interrupted and result.images == []
    assert generated == []  # the interrupt was not lost to the engine's fresh start


def test_ten_concurrent_requests_and_a_ui_job_all_complete(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = server.engine
    running, overlaps, original = [0], [0], engine.generate

    def exclusive(*args, **kwargs):
        running[0] += 1
        overlaps[0] = max(overlaps[0], running[0])
        try:
            return original(*args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(engine, "generate", exclusive)
    snapshots: list[dict] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            snapshots.append(requests.get(server.url + "/sdapi/v1/progress", timeout=30).json())
            time.sleep(0.02)

    def call_api(seed: int) -> tuple[int, list[int], str]:
        result = webuiapi.WebUIApi(port=server.port).txt2img(prompt="a cat", seed=seed, **SMALL)
        return seed, result.info["all_seeds"], result.image.info["parameters"]

    def call_ui() -> str:
        client = Client(server.url + "/", verbose=False)
        _, infotext, *_ = generate_via_ui(
            client,
            **{"Prompt": "a dog", "Negative prompt": "", "Sampler": "Euler", "Steps": 3},
            **{"Width": 64, "Height": 64, "CFG scale": 7, "Seed (-1 = random)": 77},
        )
        return infotext

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(11) as pool:
            ui_job = pool.submit(call_ui)
            results = list(pool.map(call_api, range(500, 510)))
            ui_infotext = ui_job.result(timeout=120)
    finally:
        done.set()
        watcher.join()

    for seed, all_seeds, parameters in results:
        assert all_seeds == [seed]
        assert a1111_fields(parameters)["Seed"] == str(seed)
    assert len({parameters for _, _, parameters in results}) == 10
    assert "Seed: 77" in ui_infotext
    assert overlaps[0] == 1  # never two generations at once
    busy = [s for s in snapshots if s["state"]["job"] == "txt2img"]
    assert busy, "progress never showed the running job"
    assert max(s["state"]["job_count"] for s in busy) > 1  # others waited their turn
    assert all(s["state"]["sampling_steps"] == 3 for s in busy if s["state"]["sampling_step"])
    assert all(0 <= s["progress"] <= 1 for s in snapshots)
    final = requests.get(server.url + "/sdapi/v1/progress", timeout=30).json()
    assert (final["progress"], final["state"]["job_count"], final["state"]["job"]) == (0, 0, "")


def test_interrupt_stops_the_running_job(server: RunningServer) -> None:
    api = webuiapi.WebUIApi(port=server.port)
    started = threading.Event()

    def interrupt_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            progress = api.get_progress()
            if progress["state"]["sampling_step"] > 0:
                started.set()
                api.interrupt()
                return
            time.sleep(0.01)

    interrupter = threading.Thread(target=interrupt_when_running)
    interrupter.start()
    result = api.txt2img(prompt="a cat", seed=1, **{**SMALL, "steps": 150})
    interrupter.join()
    assert started.is_set()
    assert result.info["interrupted"] is True
    assert len(result.images) == 1  # the image so far is still returned
    assert api.get_progress()["state"]["interrupted"] is False  # idle again
