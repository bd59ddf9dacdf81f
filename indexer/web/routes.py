"""Every route of the API in one table; the handlers live in modules of their own."""

from __future__ import annotations

from aiohttp import web

from indexer.web import items, ops, search
from indexer.web.admin import admin_app


def add_routes(app: web.Application) -> None:
    app.add_routes(
        [
            web.post("/search", search.search),
            web.post("/search/vector", search.search_vector),
            web.get("/items/{id}", items.item),
            web.get("/items/{id}/thumbnail", items.thumbnail),
            web.get("/items/{id}/similar", items.similar),
            web.get("/recent", items.recent),
            web.get("/", ops.page),
            web.get("/stats", ops.stats),
            web.get("/healthz", ops.healthz),
            web.get("/readyz", ops.readyz),
            web.get("/metrics", ops.metrics),
            web.get("/openapi.json", ops.openapi_document),
        ]
    )
    app.add_subapp("/admin/", admin_app())
