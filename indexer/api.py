"""The query endpoint: an aiohttp app built by :func:`create_app`.

Routes: ``POST /search`` (an image, raw body or multipart field ``image``),
``GET /stats`` and ``GET /healthz``. Model inference and search run in the
node's executor so the event loop keeps answering while they work. With
``consume=True`` the app also runs the indexing consumer for its lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from indexer.config import Settings
from indexer.events import COLLECTIONS
from indexer.images import InvalidImage
from indexer.node import Node

log = logging.getLogger(__name__)

NODE = web.AppKey("node", Node)
RELOAD = web.AppKey("reload", object)
FLIP_CHECK_S = 0.5


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
    active, building = node.active, node.building
    return web.json_response(
        {
            "models": active.describe(),
            "backend": active.shards.backend,
            "records": {c: active.shards.records(c) for c in COLLECTIONS},
            "shards": active.shards.sizes(),
            "ingest": active.stats.snapshot(),
            "consumer": active.describe()["consumer"],
            # Both generations while a new one catches up (docs/architecture.md, "Generations").
            "generations": [
                {**g.describe(), "state": state, "ingest": g.stats.snapshot()}
                for g, state in ((active, "active"), (building, "catching-up"))
                if g is not None
            ],
        }
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(
    node: Node, *, consume: bool = True, reload_settings: Callable[[], Settings] | None = None
) -> web.Application:
    """The query app; ``consume`` runs the node's consumers for the app's lifetime.

    ``reload_settings`` (the CLI passes one that re-reads the config file) is
    called on SIGHUP: new model settings start a new generation.
    """
    app = web.Application(client_max_size=node.settings.api.max_request_bytes)
    app[NODE] = node
    app.router.add_post("/search", search)
    app.router.add_get("/stats", stats)
    app.router.add_get("/healthz", healthz)
    if consume:
        app.cleanup_ctx.append(_ingest)
    if reload_settings is not None:
        app[RELOAD] = reload_settings
        app.on_startup.append(_reload_on_sighup)
    app.on_cleanup.append(_close_node)
    return app


async def _ingest(app: web.Application) -> AsyncIterator[None]:
    """Run the consumers in their threads, and flip generations once a new one has caught up."""
    node = app[NODE]
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, node.start_ingest)
    watcher = asyncio.create_task(_flip_when_caught_up(node))
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await loop.run_in_executor(None, node.stop_ingest)


async def _flip_when_caught_up(node: Node) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(FLIP_CHECK_S)
        if node.building is not None:
            await loop.run_in_executor(None, node.flip_if_caught_up)


async def _reload_on_sighup(app: web.Application) -> None:
    loop = asyncio.get_running_loop()
    node = app[NODE]

    async def reload() -> None:
        try:
            settings = app[RELOAD]()
            await loop.run_in_executor(None, node.switch, settings.models)
        except Exception:  # a bad config keeps the running generation; the log says why
            log.exception("reloading the config failed; nothing changed")

    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))


async def _close_node(app: web.Application) -> None:
    """After the consumers (cleanup_ctx runs first): stop the query, build and checkpoint threads."""
    await asyncio.get_running_loop().run_in_executor(None, app[NODE].close)


__all__ = ["NODE", "create_app"]
