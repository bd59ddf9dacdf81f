"""The HTTP app of a node, built by :func:`create_app`.

Search and item routes are in indexer/web/search.py; this module holds the
operational ones (``/stats``, ``/healthz``, ``/readyz``, ``/metrics``,
``/openapi.json``) and the app's lifecycle: with ``consume=True`` it runs the
node's consumers for its lifetime and flips generations once a new one has
caught up. Model inference and search run in the node's executor so the event
loop keeps answering while they work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from indexer.web import admin, openapi
from indexer.config import Settings
from indexer.events import COLLECTIONS
from indexer.web.metrics import CONTENT_TYPE, Metrics
from indexer.node import Node
from indexer.web.search import METRICS, NODE, error, item, recent, search, search_vector, thumbnail

log = logging.getLogger(__name__)

RELOAD = web.AppKey("reload", object)
CONSUMING = web.AppKey("consuming", bool)
#: Called once, on the event loop, with the reason when ingestion stops for good.
ON_FATAL = web.AppKey("on_fatal", Callable[[str], None])
FLIP_CHECK_S = 0.5


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error is JSON ``{"error": ...}``, also those aiohttp raises itself (404, 405, 413)."""
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


async def stats(request: web.Request) -> web.Response:
    node = request.app[NODE]
    active, building = node.active, node.building
    described = active.describe()
    return web.json_response(
        {
            "models": described,
            "backend": active.shards.backend,
            "records": {c: active.shards.records(c) for c in COLLECTIONS},
            "shards": active.shards.sizes(),
            "ingest": active.stats.snapshot(),
            "consumer": described["consumer"],
            # Both generations while a new one catches up (docs/architecture.md, "Generations").
            "generations": [
                {**g.describe(), "state": state, "ingest": g.stats.snapshot()}
                for g, state in ((active, "active"), (building, "catching-up"))
                if g is not None
            ],
        }
    )


async def healthz(request: web.Request) -> web.Response:
    """The process serves HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready once the consumer has its partitions, hears from the broker, and is within ``api.ready_max_lag``.

    The checkpoint is restored before the app exists, so a node that answers
    here has its shards. Without consumers (``consume=False``) it is ready at once.
    """
    node = request.app[NODE]
    consumer = node.active.consumer
    reasons = []
    if request.app[CONSUMING]:
        if consumer is None:
            reasons.append("the consumer has not started")
        else:
            reasons += consumer.health.problems(waiting=sum(consumer.lag.values()))
            if not consumer.running and not consumer.health.gave_up:
                reasons.append("the consumer thread has stopped")
            elif not consumer.assigned.is_set():
                reasons.append("the consumer has no partitions yet")
            elif (consumer.heartbeat_age_s or 0) * 1000 > node.settings.kafka.session_timeout_ms:
                age = consumer.heartbeat_age_s
                reasons.append(f"no heartbeat to the Kafka group for {age:.0f} s: broker unreachable?")
            elif consumer.lag and max(consumer.lag.values()) > node.settings.api.ready_max_lag:
                reasons.append(f"consumer lag {max(consumer.lag.values())} is above {node.settings.api.ready_max_lag}")
    if reasons:
        return web.json_response({"ready": False, "reasons": reasons}, status=503)
    return web.json_response({"ready": True, "reasons": []})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


PAGE = Path(__file__).parent / "static" / "index.html"


async def page(request: web.Request) -> web.FileResponse:
    """The search page: drop a photo, see its garments boxed and similar products under each."""
    return web.FileResponse(PAGE, headers={"Content-Type": "text/html; charset=utf-8"})


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(openapi.document(request.app[NODE].settings))


def create_app(
    node: Node,
    *,
    consume: bool = True,
    reload_settings: Callable[[], Settings] | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> web.Application:
    """The query app; ``consume`` runs the node's consumers for the app's lifetime.

    ``on_fatal`` is called if ingestion stops for good (the consumer gave up);
    by default it ends ``web.run_app``, and the CLI then exits non-zero.

    ``reload_settings`` (the CLI passes one that re-reads the config file) is
    called on SIGHUP: new model settings start a new generation.
    """
    app = web.Application(
        client_max_size=node.settings.api.max_request_bytes, middlewares=[json_errors, admin.require_token]
    )
    app[NODE] = node
    app[METRICS] = Metrics(node)
    app[CONSUMING] = consume
    app[ON_FATAL] = on_fatal or _stop_running_app
    app.router.add_post("/search", search)
    app.router.add_post("/search/vector", search_vector)
    app.router.add_get("/items/{id}", item)
    app.router.add_get("/items/{id}/thumbnail", thumbnail)
    app.router.add_get("/recent", recent)
    app.router.add_get("/", page)
    app.router.add_get("/stats", stats)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_document)
    admin.add_routes(app)
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
    node.observe_freshness(app[METRICS].observe_freshness)
    await loop.run_in_executor(None, node.start_ingest)
    watcher = asyncio.create_task(_watch_generations(node, app[ON_FATAL]))
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await loop.run_in_executor(None, node.stop_ingest)


async def _watch_generations(node: Node, on_fatal: Callable[[str], None]) -> None:
    """Flip to a generation that has caught up; report ingestion that gave up for good."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(FLIP_CHECK_S)
        if node.fatal is not None:
            log.error("ingestion stopped for good: %s", node.fatal)
            on_fatal(node.fatal)
            return
        if node.building is not None:
            await loop.run_in_executor(None, node.flip_if_caught_up)


def _stop_running_app(reason: str) -> None:
    """End ``web.run_app``: GracefulExit is a SystemExit, which a loop callback lets through."""

    def stop() -> None:
        raise web.GracefulExit()

    asyncio.get_running_loop().call_soon(stop)


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


__all__ = ["NODE", "create_app", "error"]
