"""Tools-tab jobs (extract, bake) go through the engine's one `JobQueue`: a bake submitted while a
generation holds the model waits its turn, shows as job "bake" in the queue's status (what
`/sdapi/v1/progress` reports), and stops without writing anything when interrupted."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from engine_settings import cpu_settings
from lora_files import write_kohya_lora

from webui.arch import Arch
from webui.engine.generate import Engine, GenerationRequest, Progress, Stage
from webui.engine.jobs import JobQueue, JobStatus
from webui.ui.tools_tab import run_bake

WAIT = 120  # seconds; only a hang reaches it


class StatusRecorder:
    """Stands in for gr.Progress: remembers the queue's status at each call."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self.seen: list[JobStatus] = []

    def __call__(self, fraction: tuple[int, int], desc: str = "", unit: str = "") -> None:
        self.seen.append(self.queue.status())


@pytest.fixture
def engine(tmp_path: Path, tiny_checkpoint_factory) -> Engine:
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    loras.mkdir()
    shutil.copy(tiny_checkpoint_factory(Arch.SD1), models / "tiny.safetensors")
    write_kohya_lora(loras / "ink.safetensors", Arch.SD1, {"ss_base_model_version": "sd_v1"})
    return Engine(cpu_settings(models, loras, tmp_path, save_outputs=False))


def test_a_bake_waits_for_the_running_generation_and_reports_as_bake(engine: Engine) -> None:
    queue = JobQueue.for_engine(engine)
    denoising, release = threading.Event(), threading.Event()
    order: list[str] = []

    def hold(progress: Progress) -> None:  # the generation stops at its first step until told
        if progress.stage is Stage.DENOISE:
            denoising.set()
            assert release.wait(WAIT)

    def generation() -> None:
        request = GenerationRequest("a fox", steps=2, width=64, height=64, seed=1)
        queue.generate(request, on_progress=hold, model="tiny")
        order.append("txt2img")

    bar = StatusRecorder(queue)
    baked: list[str] = []

    def bake() -> None:
        baked.append(run_bake(engine, "tiny", "ink:0.5", "fp32", "baked", bar))
        order.append("bake")

    first = threading.Thread(target=generation)
    first.start()
    assert denoising.wait(WAIT)
    second = threading.Thread(target=bake)
    second.start()
    while queue.status().job_count < 2:  # the bake took its ticket behind the generation
        second.join(0.05)
        assert second.is_alive(), baked
    waiting = queue.status()
    assert (waiting.job, waiting.job_count) == ("txt2img", 2)
    assert not bar.seen and not (engine.settings.models_dir / "baked.safetensors").exists()

    release.set()
    first.join(WAIT)
    second.join(WAIT)

    assert order == ["txt2img", "bake"]
    assert (engine.settings.models_dir / "baked.safetensors").is_file(), baked
    assert [s.job for s in bar.seen] == ["bake"] * 3
    assert [(s.step, s.total) for s in bar.seen] == [(0, 3), (1, 3), (2, 3)]
    assert queue.status() == JobStatus()


def test_an_interrupted_bake_writes_nothing(engine: Engine) -> None:
    queue = JobQueue.for_engine(engine)

    def interrupt_at_once(fraction: tuple[int, int], desc: str = "", unit: str = "") -> None:
        queue.interrupt()

    shown = run_bake(engine, "tiny", "ink:0.5", "fp32", "baked", interrupt_at_once)

    assert "bake interrupted; nothing was written" in shown
    assert not (engine.settings.models_dir / "baked.safetensors").exists()
    assert queue.status() == JobStatus()
