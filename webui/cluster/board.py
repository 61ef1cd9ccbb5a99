"""The job board: one small Ray actor where replicas post which job they run and how far it
got, and read whether it was interrupted; the front reads it for /progress and /interrupt."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace

import ray

BOARD_NAME = "lora-webui-jobs"
NAMESPACE = "lora-webui"
HISTORY = 500  # finished jobs kept for /cluster/jobs


@dataclass(frozen=True)
class JobRecord:
    """One job's run on one replica."""

    job_id: str
    name: str
    prompt: str
    replica: str
    pid: int
    attempt: int
    started: float
    step: int = 0
    total: int = 0
    interrupted: bool = False
    finished: float | None = None
    modules_written: int = 0
    switched: bool = False


@ray.remote(num_cpus=0, max_concurrency=64)
class JobBoard:
    def __init__(self) -> None:
        self._running: dict[str, JobRecord] = {}
        self._done: deque[JobRecord] = deque(maxlen=HISTORY)

    def start(self, record: JobRecord) -> None:
        self._running[record.job_id] = record

    def progress(self, job_id: str, step: int, total: int) -> bool:
        """Record progress; True when the job was interrupted."""
        record = self._running.get(job_id)
        if record is None:
            return False
        self._running[job_id] = replace(record, step=step, total=total)
        return record.interrupted

    def finish(self, job_id: str, modules_written: int, switched: bool) -> None:
        record = self._running.pop(job_id, None)
        if record is not None:
            done = replace(
                record, finished=time.time(), modules_written=modules_written, switched=switched
            )
            self._done.append(done)

    def drop(self, job_id: str) -> None:
        """The job's replica was lost: it is running nowhere now."""
        self._running.pop(job_id, None)

    def interrupt(self) -> int:
        """Interrupt every running job (A1111's /interrupt names no job); how many."""
        for job_id, record in self._running.items():
            self._running[job_id] = replace(record, interrupted=True)
        return len(self._running)

    def running(self) -> list[JobRecord]:
        return sorted(self._running.values(), key=lambda r: r.started)

    def history(self) -> list[JobRecord]:
        return list(self._done)


def board(create: bool = False) -> ray.actor.ActorHandle | None:
    """The cluster's board (made by the front when `create`); None when there is none."""
    if create:
        return JobBoard.options(
            name=BOARD_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
        ).remote()
    try:
        return ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
