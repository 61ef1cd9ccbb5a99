"""The served app: the A1111-compatible API and the Gradio UI on one FastAPI app, each behind
its own credentials, run by uvicorn."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_swagger import patch_fastapi
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from webui.api.auth import Credential, basic_header_matches
from webui.api.request_limits import BodySizeLimit, describe, validation_error_response
from webui.api.routes import api_router
from webui.engine.generate import APP_VERSION, Engine
from webui.settings import LIMITS, RequestLimits
from webui.ui import build_ui
from webui.ui.blocks import CSS

log = logging.getLogger(__name__)

DOCS_ASSETS = "/docs-assets"


@dataclass(frozen=True)
class Access:
    """Who may use what. The API falls back to the UI's credentials when it has none of its
    own, so `--auth` alone never leaves the API open."""

    ui: tuple[Credential, ...] = ()
    api: tuple[Credential, ...] = ()

    @property
    def api_credentials(self) -> tuple[Credential, ...]:
        return self.api or self.ui


def build_app(engine: Engine, access: Access = Access(), limits: RequestLimits = LIMITS) -> FastAPI:
    """API routes under `/sdapi/v1`, OpenAPI docs at `/docs`, the UI at `/`; every route behind
    its credentials, every body within `limits`."""
    app = FastAPI(
        title="LoRA WebUI",
        version=APP_VERSION,
        description="AUTOMATIC1111-compatible API: same routes, fields and JSON shapes. "
        + describe(limits),
        docs_url=None,  # see _add_offline_docs
        swagger_ui_oauth2_redirect_url=None,
        redoc_url=None,
    )
    _add_offline_docs(app)
    app.include_router(api_router(engine, access.api_credentials))
    app.add_exception_handler(RequestValidationError, validation_error_response)
    ui = build_ui(engine)
    ui.queue(default_concurrency_limit=1)
    auth = [(c.user, c.password) for c in access.ui] or None
    app = gr.mount_gradio_app(app, ui, path="/", auth=auth, css=CSS, footer_links=["api"])
    gradio_app = next(route.app for route in app.routes if isinstance(route, Mount))
    app.add_middleware(LoginGuard, access=access, ui_session=_gradio_session(gradio_app))
    app.add_middleware(BodySizeLimit, limit=limits.max_body_bytes)
    return app


# the docs are outside both the API router and Gradio; Gradio answers several of its routes
# (startup-events, reset, cancel, runs, ...) without its log-in: all of them take a session here,
# except those its log-in page calls before one exists (they report only the caller's own state)
_DOCS_PATHS = ("/docs", "/openapi.json", DOCS_ASSETS)
_GRADIO_API = "/gradio_api/"
_GRADIO_LOGIN_PAGE = ("user", "token", "app_id", "login_check")


def _gradio_session(gradio_app: Any) -> Callable[[Request], bool]:
    """Whether a request carries a session of Gradio's log-in (its access-token cookie)."""

    def logged_in(request: Request) -> bool:
        cookie_id = gradio_app.cookie_id
        token = request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(
            f"access-token-unsecure-{cookie_id}"
        )
        return gradio_app.tokens.get(token) is not None

    return logged_in


class LoginGuard:
    """ASGI middleware for what neither the API's basic auth nor Gradio's log-in covers: the API
    docs take the API's credentials, Gradio's open routes a logged-in session; 401 otherwise."""

    def __init__(self, app: ASGIApp, access: Access, ui_session: Callable[[Request], bool]) -> None:
        self.app = app
        self.access = access
        self.ui_session = ui_session

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        path = scope["path"].rstrip("/") or "/"
        request = Request(scope)
        credentials = self.access.api_credentials
        docs = any(path == p or path.startswith(p + "/") for p in _DOCS_PATHS)
        if (
            docs
            and credentials
            and not basic_header_matches(request.headers.get("authorization"), credentials)
        ):
            return JSONResponse(
                {"detail": "Incorrect username or password"},
                status_code=401,
                headers={"WWW-Authenticate": "Basic"},
            )
        gradio_api = path.startswith(_GRADIO_API) and (
            path.removeprefix(_GRADIO_API) not in _GRADIO_LOGIN_PAGE
        )
        if self.access.ui and gradio_api and not self.ui_session(request):
            return JSONResponse({"detail": "Not authenticated"}, status_code=401)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)


def _add_offline_docs(app: FastAPI) -> None:
    """Swagger UI at `/docs` from the assets of the pinned `fastapi-swagger` package (FastAPI's
    own page loads them from a CDN, blank on a machine without internet)."""
    patch_fastapi(
        app,
        docs_url="/docs",
        redirect_from_root_to_docs=False,  # `/` is the UI
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
    )


def serve(app: FastAPI, host: str, port: int, *, verbose: bool = False) -> None:
    """Serve until interrupted: one line saying where, no access log unless `verbose`."""
    log.info("serving on http://%s:%d", host, port)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info" if verbose else "warning",
        access_log=verbose,
        timeout_graceful_shutdown=5,  # an open page's event stream would hold Ctrl+C forever
    )
