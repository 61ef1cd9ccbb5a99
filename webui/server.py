"""The served app: the A1111-compatible API and the Gradio UI on one FastAPI app, each behind
its own credentials, run by uvicorn."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import gradio as gr
import uvicorn
from fastapi import FastAPI
from fastapi_swagger import patch_fastapi

from webui.api.auth import Credential
from webui.api.routes import api_router
from webui.engine.generate import APP_VERSION, Engine
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


def build_app(engine: Engine, access: Access = Access()) -> FastAPI:
    """API routes under `/sdapi/v1`, OpenAPI docs at `/docs`, the UI at `/`."""
    app = FastAPI(
        title="LoRA WebUI",
        version=APP_VERSION,
        description="AUTOMATIC1111-compatible API: same routes, fields and JSON shapes.",
        docs_url=None,  # see _add_offline_docs
        swagger_ui_oauth2_redirect_url=None,
        redoc_url=None,
    )
    _add_offline_docs(app)
    app.include_router(api_router(engine, access.api_credentials))
    ui = build_ui(engine)
    ui.queue(default_concurrency_limit=1)
    auth = [(c.user, c.password) for c in access.ui] or None
    return gr.mount_gradio_app(app, ui, path="/", auth=auth, css=CSS, footer_links=["api"])


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
