"""Live previews in the page: a generation run on a worker thread while the Gradio handler
(a generator) yields each `Progress.preview` the engine reports, then the result."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from PIL import Image

from webui.engine.generate import Progress

R = TypeVar("R")
ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class Preview:
    image: Image.Image


@dataclass(frozen=True)
class Done(Generic[R]):
    result: R


def stream_previews(
    work: Callable[[ProgressCallback], R], on_progress: ProgressCallback
) -> Iterator[Preview | Done[R]]:
    """Run `work(report)` on a thread; yield a Preview for each preview reported, then Done.
    `on_progress` is called on the caller's thread (Gradio's progress lives in its context);
    an exception from `work` is raised here."""
    events: queue.Queue[tuple[str, object]] = queue.Queue()

    def run() -> None:
        try:
            events.put(("done", work(lambda p: events.put(("progress", p)))))
        except BaseException as exc:  # handed to the caller's thread, raised there
            events.put(("error", exc))

    threading.Thread(target=run, daemon=True, name="txt2img-generation").start()
    while True:
        kind, value = events.get()
        if kind == "progress":
            assert isinstance(value, Progress)
            on_progress(value)
            if value.preview is not None:
                yield Preview(value.preview)
        elif kind == "done":
            yield Done(value)  # type: ignore[arg-type]
            return
        else:
            assert isinstance(value, BaseException)
            raise value
