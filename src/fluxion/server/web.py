"""The web page at `/`: static files (page/, package data) that call the server's own API from the browser. They
need no key to load; the page sends the key the user enters (kept in the browser's localStorage) with each call."""

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from .errors import not_found

router = APIRouter()

FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "style.css": "text/css; charset=utf-8"}
# everything from this server: no CDN (it runs offline), no inline script, images only as data: URLs or ours
POLICY = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
          "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def _file(name: str) -> Response:
    if name not in FILES:
        raise not_found(f"no page file {name!r:.60}")
    data = resources.files(__package__).joinpath("page", name).read_bytes()
    return Response(data, media_type=FILES[name], headers={"Content-Security-Policy": POLICY,
                                                           "Cache-Control": "no-cache",
                                                           "X-Content-Type-Options": "nosniff"})


@router.get("/", include_in_schema=False)
async def index() -> Response:
    return _file("index.html")


@router.get("/page/{name}", include_in_schema=False)
async def page_file(name: str) -> Response:
    return _file(name)
