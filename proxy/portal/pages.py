"""The portal's HTML pages: files under ``pages/`` with ``{{name}}`` placeholders, each
value HTML-escaped, served with the admin dashboard's security headers (no inline script
or style, nothing remote): :func:`proxy.admin.pages.render` over this package's folder."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from ..admin import pages

PAGES = Path(__file__).parent / "pages"


def render(name: str, status: int = 200, **values: str) -> web.Response:
    """The page ``pages/<name>`` with its placeholders filled in."""
    return pages.render(PAGES, name, status, **values)
