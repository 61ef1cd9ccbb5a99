"""What the server refuses before a route runs: bodies over `RequestLimits.max_body_bytes` get
413 (checked on Content-Length and on the bytes actually streamed), and validation errors are
answered as JSON even when the rejected input is NaN or infinity (which JSON cannot hold)."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from webui.settings import RequestLimits


class _BodyTooLarge(HTTPException):
    """The streamed body passed the limit; an HTTPException, since FastAPI's body reader turns
    any other error into a 400."""

    def __init__(self, detail: str) -> None:
        super().__init__(status.HTTP_413_CONTENT_TOO_LARGE, detail)


class BodySizeLimit:
    """ASGI middleware: a body over `limit` bytes gets 413 with a JSON message, before the app
    parses it (announced by Content-Length) or as soon as the streamed bytes pass it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _detail(self) -> str:
        mib = self.limit / (1024 * 1024)
        return f"request body too large: at most {self.limit} bytes ({mib:g} MiB)"

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": self._detail()}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await self._refuse(send)
                return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge(self._detail())
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)


def _finite_for_json(value: Any) -> Any:
    """`value` with NaN and infinities written as strings, so that JSON can carry it."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite_for_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_for_json(item) for item in value]
    return value


async def validation_error_response(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 body (`detail`: the errors), safe for inputs such as NaN."""
    assert isinstance(exc, RequestValidationError)
    detail = _finite_for_json(jsonable_encoder(exc.errors()))
    return JSONResponse(status_code=422, content={"detail": detail})


def describe(limits: RequestLimits) -> str:
    """The limits in one line, for the API docs."""
    return (
        f"Limits: request body {limits.max_body_bytes} bytes (413 over it), prompt and "
        f"negative prompt {limits.max_prompt_chars} characters each, PNG Info images "
        f"{limits.max_image_pixels} pixels (422 over them)."
    )
