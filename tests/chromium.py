"""The system Chromium for the browser tests (never a Playwright download), a page context
that is closed before the app server stops: an open page's event stream holds the server's
graceful shutdown for its whole timeout; the app's page opened in one (`app_page`); and typing
into a number box."""

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


@contextmanager
def app_page(
    browser: Any,
    url: str,
    *,
    timeout_s: float,
    ready: str | None = None,
    permissions: tuple[str, ...] = (),
    **options: Any,
) -> Iterator[Any]:
    """The app's page at `url` in a fresh `browser_context` (`options`: viewport, ...), closed on
    exit. Every wait, the page's and `expect`'s, is `timeout_s` (a shared 2-core machine); with
    `ready`, the page is handed over once the model status shows that text."""
    from playwright.sync_api import expect

    expect.set_options(timeout=timeout_s * 1000)
    with browser_context(browser, **options) as context:
        if permissions:
            context.grant_permissions(list(permissions), origin=url)
        page = context.new_page()
        page.set_default_timeout(timeout_s * 1000)
        page.goto(url)
        if ready is not None:
            expect(page.locator("#model-status")).to_contain_text(ready)
        yield page


def set_number(page: Any, elem: str, value: str) -> None:
    """Type `value` into the number box of the control with id `elem`, as a user would."""
    box = page.locator(f"#{elem} input[type='number']")
    box.fill(value)
    box.press("Enter")
