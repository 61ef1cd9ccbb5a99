"""The system Chromium for the browser tests (never a Playwright download), a page context
that is closed before the app server stops: an open page's event stream holds the server's
graceful shutdown for its whole timeout; and typing into a number box."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def browser_context(browser: Any, **options: Any) -> Iterator[Any]:
    """A fresh context (cookies, storage, permissions of its own) on the shared browser, closed on
    exit: use it inside the app's `with`, so the pages go before the server does."""
    context = browser.new_context(**options)
    try:
        yield context
    finally:
        context.close()


def set_number(page: Any, elem: str, value: str) -> None:
    """Type `value` into the number box of the control with id `elem`, as a user would."""
    box = page.locator(f"#{elem} input[type='number']")
    box.fill(value)
    box.press("Enter")
