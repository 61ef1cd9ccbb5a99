"""The live-preview stream: previews come out in the order the engine reported them, progress
is reported on the caller's thread (where Gradio's progress lives), and a failing generation
raises there, not on the worker."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from webui.engine.generate import Progress
from webui.ui.generation_stream import Done, Preview, stream_previews
from webui.ui.txt2img_options import SAME_SAMPLER, hires_fix


def test_previews_in_order_then_the_result() -> None:
    images = [Image.new("RGB", (4, 4), (n, 0, 0)) for n in range(2)]

    def work(report):
        report(Progress(1, 3, preview=images[0]))
        report(Progress(2, 3))
        report(Progress(3, 3, preview=images[1]))
        return "result"

    threads = []
    events = list(stream_previews(work, lambda p: threads.append(threading.get_ident())))
    assert events == [Preview(images[0]), Preview(images[1]), Done("result")]
    assert threads == [threading.get_ident()] * 3


def test_an_error_is_raised_on_the_callers_thread() -> None:
    def work(report):
        raise ValueError("bad sampler")

    with pytest.raises(ValueError, match="bad sampler"):
        list(stream_previews(work, lambda p: None))


def test_hires_fix_from_the_accordion() -> None:
    values = (True, "Lanczos", 1.5, 0, 0, 4, 0.5, 7.0, SAME_SAMPLER, "", "")
    fix = hires_fix(*values, first_cfg=7.0)
    assert fix is not None
    assert (fix.upscaler, fix.scale, fix.steps, fix.denoising_strength) == ("Lanczos", 1.5, 4, 0.5)
    assert (fix.sampler, fix.cfg_scale) == ("", None)  # the first pass's
    assert hires_fix(*values[:7], 4.5, "Euler", "", "", first_cfg=7.0).cfg_scale == 4.5
    assert hires_fix(False, *values[1:], first_cfg=7.0) is None
