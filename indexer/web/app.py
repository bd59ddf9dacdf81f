"""The HTTP app of a node: :func:`create_app` and its lifecycle.

Routes are listed in indexer/web/routes.py and handled in modules of their own
(search, items, ops, admin). Here: the app's state (indexer/web/keys.py), and
its lifecycle: with ``consume=True`` it runs the node's consumers for its
lifetime, flips generations once a new one has caught up, reports ingestion
that gave up for good, reloads the config on SIGHUP, and closes the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from indexer.config import Settings
from indexer.kafka.membership import Announcer, Member, now_ms
from indexer.node import Node
from indexer.web import ops
from indexer.web.errors import json_errors
from indexer.web.keys import CONSUMING, METRICS, NODE, ON_FATAL, RELOAD, WORKERS
from indexer.web.metrics import Metrics
from indexer.web.routes import add_routes
from indexer.web.workers import SearchWorkers

log = logging.getLogger(__name__)

FLIP_CHECK_S = 0.5


def create_app(
    node: Node,
    *,
    consume: bool = True,
    reload_settings: Callable[[], Settings] | None = None,
    on_fatal: Callable[[str], None] | None = None,
    announce_url: str | None = None,
) -> web.Application:
    """The HTTP app of ``node``; ``consume`` runs the node's consumers for the app's lifetime.

    The app owns the node from here on: it closes it at cleanup.

    ``on_fatal`` is called if ingestion stops for good (the consumer gave up);
    by default it ends ``web.run_app``, and the CLI then exits non-zero.

    ``reload_settings`` (the CLI passes one that re-reads the config file) is
    called on SIGHUP: new model settings start a new generation.

    ``announce_url``: a serve replica announces itself under this URL on the
    membership topic for the app's lifetime (indexer/kafka/membership.py).
    """
    app = web.Application(client_max_size=node.settings.api.max_request_bytes, middlewares=[json_errors])
    app[NODE] = node
    app[METRICS] = Metrics(node)
    app[WORKERS] = SearchWorkers(node.settings.api.inline_search_ms)
    app[CONSUMING] = consume
    app[ON_FATAL] = on_fatal or _stop_running_app
    add_routes(app)
    if consume:
        app.cleanup_ctx.append(_ingest)
    if announce_url is not None:
        app.cleanup_ctx.append(functools.partial(_announce, url=announce_url))
    if reload_settings is not None:
        app[RELOAD] = reload_settings
        app.on_startup.append(_reload_on_sighup)
    app.on_cleanup.append(_close)
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
        if node.retiring is not None:
            await loop.run_in_executor(None, node.retire_if_due)


async def _announce(app: web.Application, url: str) -> AsyncIterator[None]:
    """Tell routers about this replica while it runs; say goodbye at shutdown, before the consumers stop."""
    node = app[NODE]
    cluster = node.settings.cluster

    def describe() -> Member:
        served = ops.serving(node)
        return Member(
            url,
            served["generation"],
            tuple(served.get("partitions", ())),
            served.get("total_partitions"),
            not ops.problems(app),
            now_ms(),
            int(cluster.member_ttl_s * 1000),
            served.get("retiring"),
        )

    announcer = Announcer(node.settings.kafka, cluster, describe)
    announcer.start()
    yield
    await asyncio.get_running_loop().run_in_executor(None, announcer.stop)


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


async def _close(app: web.Application) -> None:
    """After the consumers (cleanup_ctx runs first): stop the search workers, then the node's threads."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, app[WORKERS].close)
    await loop.run_in_executor(None, app[NODE].close)
