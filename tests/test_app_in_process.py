"""`app.main` can run twice in one process, and `tests/app_in_process.run_app` puts back what it
sets (logging, environment, warnings filters), so the converted CLI tests leak nothing."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from app_in_process import run_app


def _state() -> tuple:
    root = logging.getLogger()
    return (
        tuple(root.handlers),
        root.level,
        logging.getLogger("app").level,
        logging.getLogger("webui").level,
        dict(os.environ),
        list(warnings.filters),
    )


def test_main_runs_twice_and_leaves_no_global_state(tmp_path: Path, capfd, caplog) -> None:
    missing = tmp_path / "missing.safetensors"
    before = _state()

    runs = [run_app(capfd, "inspect-lora", str(missing)) for _ in range(2)]

    for done in runs:  # the same answer both times, as from two shells
        assert done.returncode == 2
        assert done.stderr == f"error: {missing}: no such LoRA file\n" and done.stdout == ""
    assert _state() == before
    logging.getLogger("webui.test").warning("still captured")  # pytest's handler is back
    assert "still captured" in caplog.text


def test_argparse_errors_are_exit_codes(capfd) -> None:
    done = run_app(capfd, "merge", "--model", "m")  # --lora and --out missing
    assert done.returncode == 2
    assert done.stderr.startswith("usage: app.py ") and "required" in done.stderr
