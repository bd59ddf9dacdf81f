"""The query endpoint: an aiohttp app built by :func:`create_app`.

Routes: ``POST /search`` (an image, raw body or multipart field ``image``),
``GET /stats`` and ``GET /healthz``. Model inference and search run in the
node's executor so the event loop keeps answering while they work. With
``consume=True`` the app also runs the indexing consumer for its lifetime.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from consumers.indexing import IndexingConsumer
from indexer.events import COLLECTIONS
from indexer.images import InvalidImage
from indexer.node import Node

log = logging.getLogger(__name__)

NODE = web.AppKey("node", Node)
CONSUMER = web.AppKey("consumer", IndexingConsumer)


def error(status: type[web.HTTPError], message: str) -> web.HTTPError:
    return status(text=web.json_response({"error": message}).text, content_type="application/json")


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise error(web.HTTPBadRequest, f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise error(web.HTTPBadRequest, f"{name} must be between {low} and {high}, got {value}")
    return value


async def _read_image(request: web.Request) -> bytes:
    content_type = request.content_type
    if content_type.startswith("image/"):
        data = await request.read()
    elif content_type == "multipart/form-data":
        data = b""
        reader = await request.multipart()
        async for part in reader:
            if getattr(part, "name", None) == "image":
                data = await part.read()
                break
        else:
            raise error(web.HTTPBadRequest, "multipart body has no field named 'image'")
    else:
        raise error(
            web.HTTPUnsupportedMediaType,
            "send the image as the body with an image/* content type, or as multipart field 'image'; "
            f"got {content_type!r}",
        )
    if not data:
        raise error(web.HTTPBadRequest, "the image is empty")
    return data


async def search(request: web.Request) -> web.Response:
    node = request.app[NODE]
    api = node.settings.api
    k = _int_param(request, "k", api.default_k, 1, api.max_k)
    collection = request.query.get("collection", "products")
    if collection not in COLLECTIONS:
        raise error(web.HTTPBadRequest, f"collection must be one of {list(COLLECTIONS)}, got {collection!r}")
    category = request.query.get("category") or None
    data = await _read_image(request)
    loop = asyncio.get_running_loop()
    try:
        result = await loop.run_in_executor(node.executor, node.query, data, k, collection, category)
    except InvalidImage as e:
        raise error(web.HTTPBadRequest, str(e)) from e
    return web.json_response(
        {
            "collection": collection,
            "category": category,
            "hits": [_hit(h) for h in result.hits],
            "items": [
                {
                    "box": list(item.box),
                    "label": item.label,
                    "category": item.category,
                    "score": item.score,
                    "hits": [_hit(h) for h in item.hits],
                }
                for item in result.items
            ],
            "timings_ms": result.timings_ms,
        }
    )


def _hit(hit) -> dict:
    return {"id": hit.id, "score": round(hit.score, 6), "category": hit.category, "attrs": hit.attrs}


async def stats(request: web.Request) -> web.Response:
    node = request.app[NODE]
    consumer = request.app.get(CONSUMER)
    running = consumer is not None and consumer.running
    return web.json_response(
        {
            "models": node.describe(),
            "backend": node.shards.backend,
            "records": {c: node.shards.records(c) for c in COLLECTIONS},
            "shards": node.shards.sizes(),
            "ingest": node.stats.snapshot(),
            "consumer": {
                "running": running,
                "assigned": consumer is not None and consumer.assigned.is_set(),
            },
        }
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(node: Node, *, consume: bool = True) -> web.Application:
    app = web.Application(client_max_size=node.settings.api.max_request_bytes)
    app[NODE] = node
    app.router.add_post("/search", search)
    app.router.add_get("/stats", stats)
    app.router.add_get("/healthz", healthz)
    if consume:
        app[CONSUMER] = IndexingConsumer(
            node.settings.kafka, node.pipeline, node.shards, node.stats, node.checkpointer, node.restored_offsets
        )
        app.cleanup_ctx.append(_run_consumer)
    app.on_cleanup.append(_close_node)
    return app


async def _run_consumer(app: web.Application) -> AsyncIterator[None]:
    """Run the indexing consumer in a thread for the app's lifetime."""
    consumer = app[CONSUMER]
    consumer.start()
    yield
    await asyncio.get_running_loop().run_in_executor(None, consumer.stop)


async def _close_node(app: web.Application) -> None:
    """After the consumer (cleanup_ctx runs first): stop the query, build and checkpoint threads."""
    await asyncio.get_running_loop().run_in_executor(None, app[NODE].close)


__all__ = ["NODE", "create_app"]
