"""The admin web page at ``/ui/``: three static files shipped in ``clients/ui/``.

The page is plain HTML, CSS and one JavaScript module, with no build step and nothing
fetched from elsewhere. It signs in with the master key (kept in the tab's
``sessionStorage``) and calls the bridge's own JSON endpoints with
``Authorization: Bearer <master key>``, so it can do exactly what the admin API allows.

Only the files named in :data:`FILES` are served, with a Content-Security-Policy that lets
the page load nothing but its own script and style and talk to nothing but this origin.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from aiohttp import web

FILES: Final = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}

SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files: always fresh, so an upgraded budgetd never runs yesterday's script.
    "Cache-Control": "no-store",
}


class AdminUI:
    """Serves the page's files from the installed package (read once, at start)."""

    def __init__(self) -> None:
        folder = resources.files("clients") / "ui"
        self._files = {name: (folder / name).read_bytes() for name in FILES}

    def routes(self) -> list[web.RouteDef]:
        """The routes to add to the bridge's application."""
        return [
            web.get("/ui", self.redirect),
            web.get("/ui/", self.index),
            web.get("/ui/{name}", self.file),
        ]

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    async def index(self, request: web.Request) -> web.Response:
        return self._answer("index.html")

    async def file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in FILES:
            raise web.HTTPNotFound()
        return self._answer(name)

    def _answer(self, name: str) -> web.Response:
        return web.Response(
            body=self._files[name],
            content_type=FILES[name],
            charset="utf-8",
            headers=SECURITY_HEADERS,
        )
