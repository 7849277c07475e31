"""The browser console: ``GET /`` and its assets under ``/console/``, plain HTML, CSS and JavaScript.

The page holds no data and needs no key: its script asks for one when the server has tenants, keeps it
in the page's memory only and sends it as a bearer token with the API calls it makes (``/v1/status``,
``/v1/models``, the generation endpoints, ``/v1/tenants``, ``/v1/usage``), so it shows exactly what that
key may read. A strict Content-Security-Policy allows nothing but this origin's own scripts and styles.
Off with ``console = false``: then ``/`` is a 404 again.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

from llmserve.api.openapi import Operation, documented
from llmserve.auth import CONSOLE_ASSETS, CONSOLE_PATH

ASSETS = Path(__file__).resolve().parent.parent / "console"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

blueprint = Blueprint("console", __name__)


def _asset(name: str) -> Response:
    response = send_from_directory(ASSETS, name, max_age=0)  # revalidated by ETag: a new release shows at once
    response.headers.update(SECURITY_HEADERS)
    return response


@blueprint.get(CONSOLE_PATH)
@documented(Operation("The browser console (HTML)", media=("text/html",), public=True))
def console_page() -> Response:
    return _asset("index.html")


@blueprint.get(f"{CONSOLE_ASSETS}<path:name>")
@documented(
    Operation("The console's scripts and styles", media=("text/javascript", "text/css"), errors=(404,), public=True)
)
def console_asset(name: str) -> Response:
    return _asset(name)
