"""`python app.py ARGS` run inside the test process through `app.main`: what a user sees (exit
code, stdout, stderr, files written) without paying the torch/diffusers/gradio imports again.
The global state `main` sets (logging, environment, warnings filters, the libraries' progress
bars) is put back afterwards, so later tests in the same worker see none of it."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
# loggers whose level or handlers `app.setup_logging` sets
_LOGGERS = ("", "app", "webui")


@contextlib.contextmanager
def _logging_kept() -> Iterator[None]:
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in _LOGGERS]
    handlers = logging.getLogger().handlers[:]  # basicConfig(force=True) drops pytest's own
    try:
        yield
    finally:
        root = logging.getLogger()
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        for logger, level in saved:
            logger.setLevel(level)


_LIBRARIES = ("diffusers", "transformers")  # whose progress bars `app.quiet_progress_bars` hides


def _progress_bars_enabled() -> dict[str, bool]:
    """Whether each library's bars are on (on when it is not imported yet)."""
    return {
        name: importlib.import_module(f"{name}.utils.logging").is_progress_bar_enabled()
        for name in _LIBRARIES
        if name in sys.modules
    }


def _restore_progress_bars(before: dict[str, bool]) -> None:
    for name in _LIBRARIES:
        if before.get(name, True) and name in sys.modules:
            importlib.import_module(f"{name}.utils.logging").enable_progress_bar()


def run_app(capfd: pytest.CaptureFixture[str], *argv: str) -> subprocess.CompletedProcess[str]:
    """`app.main(argv)` from the repository root, as `python app.py ARGV` there: its exit code
    (argparse's SystemExit included) and what it wrote to stdout and stderr. An uncaught
    exception propagates: the test fails, as a traceback in a subprocess's stderr would."""
    import app

    capfd.readouterr()  # what the test printed before is not the command's
    bars = _progress_bars_enabled()
    with (
        _logging_kept(),
        mock.patch.dict(os.environ),
        warnings.catch_warnings(),
        mock.patch.object(sys, "argv", ["app.py", *argv]),
        contextlib.chdir(ROOT),
    ):
        try:
            code = app.main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        finally:
            _restore_progress_bars(bars)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["app.py", *argv], code, out, err)
