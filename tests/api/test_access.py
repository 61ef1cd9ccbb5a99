"""Access control: HTTP basic auth on the API, Gradio's log-in on the UI; wrong or missing
credentials get 401 and nothing else, before the request is even validated."""

from __future__ import annotations

import pytest
import requests
from conftest import RunningServer, folders

from app import build_parser, settings_from
from webui.api.auth import Credential, parse_credentials
from webui.server import Access

DENIED = {"detail": "Incorrect username or password"}


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory) -> RunningServer:
    access = Access(ui=parse_credentials("admin:pw"), api=parse_credentials("bot:key,ci:t0k:en"))
    return start_server(folders(tmp_path_factory.mktemp("access")), access)


@pytest.mark.parametrize(
    "auth", [None, ("bot", "wrong"), ("nobody", "key"), ("admin", "pw"), ("bot", "")]
)
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/sdapi/v1/sd-models", None),
        ("GET", "/sdapi/v1/loras", None),
        ("GET", "/sdapi/v1/progress", None),
        ("POST", "/sdapi/v1/txt2img", {"prompt": "x", "steps": -1}),  # 401 before the 422
        ("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "nope"}),
    ],
)
def test_api_refuses_wrong_credentials(
    server: RunningServer, auth: tuple[str, str] | None, method: str, path: str, body: object
) -> None:
    response = requests.request(method, server.url + path, json=body, auth=auth, timeout=30)
    assert response.status_code == 401
    assert response.json() == DENIED
    assert response.headers["www-authenticate"] == "Basic"


@pytest.mark.parametrize("auth", [("bot", "key"), ("ci", "t0k:en")])
def test_api_accepts_each_user(server: RunningServer, auth: tuple[str, str]) -> None:
    response = requests.get(server.url + "/sdapi/v1/samplers", auth=auth, timeout=30)
    assert response.status_code == 200 and response.json()[0]["name"] == "Euler a"


def test_ui_needs_its_own_log_in(server: RunningServer) -> None:
    for path in ("/config", "/gradio_api/info"):
        assert requests.get(server.url + path, timeout=30).status_code == 401
    session = requests.Session()
    assert (
        session.post(server.url + "/login", data={"username": "bot", "password": "key"}).ok is False
    )
    assert session.get(server.url + "/config", timeout=30).status_code == 401
    assert session.post(server.url + "/login", data={"username": "admin", "password": "pw"}).ok
    assert session.get(server.url + "/config", timeout=30).status_code == 200


def test_docs_describe_the_api(server: RunningServer) -> None:
    auth = ("bot", "key")
    schema = requests.get(server.url + "/openapi.json", auth=auth, timeout=30).json()
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/loras", "/sdapi/v1/png-info"} <= set(schema["paths"])
    page = requests.get(server.url + "/docs", auth=auth, timeout=30)
    assert page.status_code == 200
    # served from this app, not a CDN: the docs work on a machine without internet
    assert "cdn" not in page.text and "/docs-assets/swagger-ui-bundle.js" in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        response = requests.get(f"{server.url}/docs-assets/{asset}", auth=auth, timeout=30)
        assert response.status_code == 200 and len(response.content) > 10_000


# what Gradio's log-in page itself loads, or answers about the caller's own session
LOGIN_PAGE_PATHS = {
    "/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/robots.txt",
    "/manifest.json", "/pwa_icon", "/gradio_api/user", "/gradio_api/user/", "/gradio_api/token",
    "/gradio_api/token/", "/gradio_api/app_id", "/gradio_api/app_id/",
}  # fmt: skip


def _routes(routes: list, prefix: str = "") -> list[tuple[str, str]]:
    """(method, path) of every route, walking included routers and mounted apps."""
    found = []
    for route in routes:
        if type(route).__name__ == "_IncludedRouter":
            found += _routes(route.original_router.routes, prefix + route.include_context.prefix)
        elif not hasattr(route, "methods") and hasattr(getattr(route, "app", None), "routes"):
            found += _routes(route.app.routes, prefix + route.path.rstrip("/"))
        elif getattr(route, "methods", None):
            found += [(method, prefix + route.path) for method in route.methods]
    return found


def test_every_route_needs_credentials(server: RunningServer) -> None:
    import re

    app = server.app
    checked = 0
    for method, path in _routes(app.routes):
        if method not in ("GET", "POST") or path in LOGIN_PAGE_PATHS:
            continue
        if "{" in path:  # parameterised: Gradio's assets and streams answer 4xx without a match
            continue
        url = server.url + re.sub(r"\{[^}]+\}", "x", path)
        response = requests.request(method, url, json={}, timeout=30, allow_redirects=False)
        assert response.status_code == 401, (method, path, response.status_code)
        checked += 1
    assert checked > 30


def test_auth_alone_also_guards_the_api(start_server, tmp_path_factory) -> None:
    ui_only = Access(ui=(Credential("admin", "pw"),))
    assert ui_only.api_credentials == (Credential("admin", "pw"),)
    both = Access(ui=(Credential("admin", "pw"),), api=(Credential("bot", "key"),))
    assert both.api_credentials == (Credential("bot", "key"),)
    # and the served app really guards its API with them
    server = start_server(folders(tmp_path_factory.mktemp("ui-only")), ui_only)
    samplers = server.url + "/sdapi/v1/samplers"
    assert requests.get(samplers, timeout=30).status_code == 401
    assert requests.get(samplers, auth=("admin", "pw"), timeout=30).status_code == 200


def test_credentials_parse_and_bad_ones_are_refused() -> None:
    assert parse_credentials("a:b, c:d:e") == (Credential("a", "b"), Credential("c", "d:e"))
    for bad in ("nopass", "user:", ":pw", "a:b,"):
        with pytest.raises(ValueError, match="is not user:password"):
            parse_credentials(bad)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--api-auth", "nopass"])


def test_listens_on_localhost_unless_told() -> None:
    assert settings_from(build_parser().parse_args([])).host == "127.0.0.1"
    args = build_parser().parse_args(["--listen", "--auth", "u:p", "--api-auth", "b:k"])
    assert settings_from(args).host == "0.0.0.0"
    assert args.auth == (Credential("u", "p"),) and args.api_auth == (Credential("b", "k"),)
