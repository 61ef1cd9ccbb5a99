"""Turning exceptions into the short messages a user sees: never a stack trace in the UI."""

from __future__ import annotations

import html
import logging

from webui.engine.checkpoints import CheckpointError
from webui.engine.generate import NoModelError, RequestError

log = logging.getLogger(__name__)

EXPECTED_ERRORS = (CheckpointError, RequestError, NoModelError, FileNotFoundError)


def user_message(exc: BaseException) -> str:
    """One line for the user. Expected errors already say what is wrong; anything else is
    logged with its traceback for the developer and summarised for the user."""
    if isinstance(exc, EXPECTED_ERRORS):
        return str(exc)
    log.exception("unexpected error", exc_info=exc)
    return f"Something went wrong ({type(exc).__name__}: {exc}). The details are in the server log."


def warnings_html(warnings: list[str]) -> str:
    """A compact list of warnings for the panel under the image; empty when there are none."""
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return f"<div class='lw-warnings'><ul>{items}</ul></div>"
