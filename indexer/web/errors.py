"""Every error the API answers is JSON ``{"error": "..."}`` with a 4xx (or 5xx) status."""

from __future__ import annotations

import json
from typing import Any

import orjson
from aiohttp import web


def error(status: type[web.HTTPError], message: str) -> web.HTTPError:
    """An HTTP error to raise, with the JSON body every error has."""
    return status(text=json.dumps({"error": message}), content_type="application/json")


def json_body(data: Any) -> web.Response:
    """A JSON answer written with orjson (the search routes are hot)."""
    return web.Response(body=orjson.dumps(data), content_type="application/json")


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Also the errors aiohttp raises itself (404, 405, 413) become JSON."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        return web.json_response(
            {"error": message},
            status=e.status,
            headers={k: v for k, v in e.headers.items() if k.lower() not in ("content-type", "content-length")},
        )
