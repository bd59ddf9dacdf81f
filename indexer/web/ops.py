"""Operational routes: ``/stats``, ``/healthz``, ``/readyz``, ``/metrics``, ``/openapi.json`` and the page at ``/``."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from indexer.events import COLLECTIONS
from indexer.node import Node
from indexer.web import openapi
from indexer.web.keys import CONSUMING, METRICS, NODE
from indexer.web.metrics import CONTENT_TYPE


async def stats(request: web.Request) -> web.Response:
    node = request.app[NODE]
    active, building = node.active, node.building
    described = active.describe()
    return web.json_response(
        {
            "models": described,
            "backend": active.shards.backend.name,
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
    A serve replica also says which generation and records-topic partitions it
    serves (what it announces to routers; docs/deploy.md).
    """
    reasons = problems(request.app)
    body = {"ready": not reasons, "reasons": reasons, **serving(request.app[NODE])}
    return web.json_response(body, status=503 if reasons else 200)


def serving(node: Node) -> dict:
    """The generation this node answers from and, on a serve replica, the partitions it serves."""
    described: dict = {"generation": node.active.id}
    consumer = node.active.consumer
    if node.replica is not None:
        described["retiring"] = node.retiring.id if node.retiring is not None else None
        described["partitions"] = list(getattr(consumer, "partitions", ()))
        described["total_partitions"] = getattr(consumer, "total_partitions", None)
    return described


def problems(app: web.Application) -> list[str]:
    """Why the node is not ready now (empty when it is)."""
    node = app[NODE]
    consumer = node.active.consumer
    reasons = []
    if app[CONSUMING]:
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
    return reasons


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


PAGE = Path(__file__).parent / "static" / "index.html"


async def page(request: web.Request) -> web.FileResponse:
    """The search page: drop a photo, see its garments boxed and similar products under each."""
    return web.FileResponse(PAGE, headers={"Content-Type": "text/html; charset=utf-8"})


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(openapi.document(request.app[NODE].settings))
