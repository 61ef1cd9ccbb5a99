"""One queue for all work on the model: UI and API jobs run one at a time, first come first
served, and the queue knows which job runs and how far it got (for progress reports)."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from PIL import Image

from webui.engine.checkpoints import LoadedModel
from webui.engine.generate import (
    Engine,
    GenerationRequest,
    GenerationResult,
    Progress,
    ProgressCallback,
    Stage,
)

T = TypeVar("T")
_TOOL_STAGES = frozenset({Stage.EXTRACT, Stage.BAKE})

log = logging.getLogger(__name__)


class JobInterrupted(Exception):
    """A tool job (extract, bake) stopped by `interrupt()`; it wrote nothing."""


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of the queue: the running job (`job` is "" when idle) and how many wait."""

    job: str = ""
    job_count: int = 0  # running plus waiting
    job_timestamp: str = "0"
    step: int = 0
    total: int = 0
    interrupted: bool = False
    elapsed: float = 0.0  # seconds since the running job started
    current_image: Image.Image | None = None  # the latest live preview of the running job

    @property
    def progress(self) -> float:
        return self.step / self.total if self.total else 0.0

    @property
    def eta(self) -> float:
        """Seconds left, extrapolated from the time per step so far (0 before the first step)."""
        if not self.step or not self.total:
            return 0.0
        return self.elapsed / self.progress - self.elapsed


@dataclass
class _Running:
    name: str
    started: float
    timestamp: str
    # an interrupt lets the current unit of work finish (a plot's cell) instead of the step
    finish_unit: bool = False
    step: int = 0
    total: int = 0
    preview: Image.Image | None = None


class JobQueue:
    """Serializes work on one engine in arrival order. Every caller blocks until its own job
    has run; `status()` can be read at any time from any thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._turns = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._running: _Running | None = None
        self._interrupted = False

    @classmethod
    def for_engine(cls, engine: Engine) -> JobQueue:
        """The engine's one queue (made on first use), shared by the UI and the API."""
        with _QUEUES_LOCK:
            queue = _QUEUES.get(engine)
            if queue is None:
                queue = _QUEUES[engine] = cls(engine)
            return queue

    @classmethod
    def install(cls, engine: Engine, queue: JobQueue) -> None:
        """Make `queue` the engine's one queue (a cluster front forwards jobs to replicas)."""
        with _QUEUES_LOCK:
            _QUEUES[engine] = queue

    def run(
        self, name: str, work: Callable[[ProgressCallback], T], *, finish_unit: bool = False
    ) -> T:
        """Wait for this job's turn, then run `work(report)`; `report` records its progress.
        With `finish_unit`, an interrupt only marks the job (`status().interrupted`) and the work
        stops at its next unit boundary (a plot after its current cell), not after the step."""
        with self._turns:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._turns.wait_for(lambda: self._serving == ticket)
            self._running = _Running(
                name, time.monotonic(), time.strftime("%Y%m%d%H%M%S"), finish_unit=finish_unit
            )
            self._interrupted = False
        try:
            return work(self._record)
        finally:
            with self._turns:
                self._running = None
                self._serving += 1
                self._turns.notify_all()

    def generate(
        self,
        request: GenerationRequest,
        on_progress: ProgressCallback | None = None,
        model: str | None = None,
        name: str = "txt2img",
    ) -> GenerationResult:
        """Render `request` in turn: with checkpoint `model` loaded first when given, else with
        the loaded model (the default one when none is loaded yet)."""
        request.validate()  # a bad request fails at once instead of after waiting its turn

        def work(report: ProgressCallback) -> GenerationResult:
            if model is not None:
                self.engine.load(model)
            elif self.engine.model is None:
                self.engine.load_default()
            with self._turns:  # interrupted while the model loaded: the engine would forget it
                if self._interrupted:
                    return GenerationResult([], interrupted=True)

            def progress(p: Progress) -> None:
                report(p)
                if on_progress is not None:
                    on_progress(p)

            result = self.engine.generate(request, on_progress=progress)
            # the one console line of a generation, for the UI and the API alike
            log.info("generated %d image(s) in %.1f s", len(result.images), result.seconds)
            return result

        return self.run(name, work)

    def load(self, model: str) -> LoadedModel:
        """Load checkpoint `model` in turn."""
        return self.run("load model", lambda _report: self.engine.load(model))

    def interrupt(self) -> None:
        """Stop the running job after its current step; waiting jobs still run."""
        with self._turns:
            if self._running is None:
                return
            self._interrupted = True
            if self._running.finish_unit:
                return
        self.engine.interrupt()

    def status(self) -> JobStatus:
        with self._turns:
            running = self._running
            waiting = self._next_ticket - self._serving
            if running is None:
                return JobStatus(job_count=waiting)
            return JobStatus(
                job=running.name,
                job_count=waiting,
                job_timestamp=running.timestamp,
                step=running.step,
                total=running.total,
                interrupted=self._interrupted,
                elapsed=time.monotonic() - running.started,
                current_image=running.preview,
            )

    def _record(self, progress: Progress) -> None:
        """Keep denoising and tool progress for `status()` (what A1111's API reports as steps);
        an interrupted tool job stops here, at its next step, before it writes anything."""
        if progress.stage is Stage.LORAS:
            return
        with self._turns:
            if self._interrupted and progress.stage in _TOOL_STAGES:
                name = self._running.name if self._running else "job"
                raise JobInterrupted(f"{name} interrupted; nothing was written")
            if self._running is not None:
                self._running.step, self._running.total = progress.step, progress.total
                if progress.preview is not None:
                    self._running.preview = progress.preview


_QUEUES: weakref.WeakKeyDictionary[Engine, JobQueue] = weakref.WeakKeyDictionary()
_QUEUES_LOCK = threading.Lock()
