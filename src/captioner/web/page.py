"""The demo page: ``/`` and ``/static``, and the security headers every response carries.

Nothing is loaded from elsewhere (no CDN: the interactive ``/docs`` page is off, the OpenAPI
description stays at ``/openapi.json``), every response forbids framing and sniffing, and a
redirect never names a host: its Location is made relative, so a forged Host header cannot
send a client elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.responses import Response

STATIC_DIR = Path(__file__).parent / "static"
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; base-uri 'none'; frame-ancestors 'none'"


def install_page(app: FastAPI) -> None:
    """Serve the page and its assets (no CDN: everything comes from this server)."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


class SecurityHeaders:
    """Plain ASGI middleware: nosniff, no framing and a CSP on every response (the page's allows
    its own scripts and styles, the API's nothing), and relative redirects."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        page = path == "/" or path.startswith("/static/")

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("Content-Security-Policy", PAGE_CSP if page else API_CSP)
                if "location" in headers:
                    headers["Location"] = relative_location(headers["location"])
            await send(message)

        await self.app(scope, receive, send_with_headers)


def relative_location(location: str) -> str:
    """``http://any.host/path?q`` -> ``/path?q``: Starlette builds redirects from the request's
    Host header, which the client chose."""
    parts = urlsplit(location)
    if not parts.scheme and not parts.netloc and not location.startswith("//"):
        return location
    path = "/" + parts.path.lstrip("/")  # never "//host": that is absolute again
    return path + (f"?{parts.query}" if parts.query else "")
