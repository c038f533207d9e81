"""API docs that work offline: Swagger UI at ``/docs`` and ReDoc at ``/redoc``, their scripts and styles
served by this server from the ``fastapi-offline`` wheel (Swagger UI 5.32.6, ReDoc 2.5.3; FastAPI's own
pages load them from a CDN). The pages are FastAPI's, with two changes: Swagger UI's online validator is
off (it sends the schema's URL to validator.swagger.io when the server is not on localhost), and both
carry a Content-Security-Policy that lets them load nothing from another host (ReDoc's side menu always
shows the Redocly logo from cdn.redoc.ly; the policy stops that request before it is made)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
# this server only; inline scripts and styles (FastAPI's page starts Swagger UI inline, ReDoc styles inline),
# data: images, and blob: workers (ReDoc's search)
POLICY = "default-src 'self' 'unsafe-inline' 'unsafe-eval' data: blob:"


def mount_docs(app: FastAPI) -> None:
    """Add ``/docs``, ``/redoc`` and their assets under ``/docs-assets`` (none of them in the schema)."""
    assert app.openapi_url is not None
    schema_url = app.openapi_url
    app.mount(ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=schema_url, title=f"{app.title} - Swagger UI", swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css", swagger_favicon_url=f"{ASSETS}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},
        )
        return _offline(page)

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        page = get_redoc_html(openapi_url=schema_url, title=f"{app.title} - ReDoc", redoc_js_url=f"{ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS}/favicon.png", with_google_fonts=False)
        return _offline(page)


def _offline(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = POLICY
    return page
