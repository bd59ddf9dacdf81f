"""The router role (``lookstream route``): the node's HTTP API over serve replicas that each hold some partitions.

A query image is decoded, detected and encoded here, once (indexer/search.py,
``analyse_image``); each vector goes to ``POST /search/vector`` of one ready
replica per partition set, and the hits are merged (indexer/web/fanout.py).
Replicas are found on the membership topic (indexer/kafka/membership.py) and
in ``[[cluster.replicas]]``, whose ``/readyz`` says the same things an
announcement does. A replica that fails or is late (``cluster.replica_timeout_s``)
is left out and its partitions are asked of another (and it is asked only
when no other replica can answer for ``cluster.bench_s``); partitions no replica
could answer are named in the answer (``missing_partitions``), or the query is
refused with 503 when ``cluster.allow_partial`` is off. Every answer comes from
one generation, named in it (``generation``).

Record routes (``/items/{id}``, its thumbnail, ``/similar``) go to a replica of
the partition the record's key hashes to, as the encoders' producer placed it
(Kafka's murmur2 partitioner).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import numpy as np
import orjson
from aiohttp import web
from kafka.partitioner.default import murmur2
from multidict import MultiDict

from consumers.records_topic import record_key
from indexer import generations
from indexer import search as query_flow
from indexer.config import Settings
from indexer.generations import Generation
from indexer.images import InvalidImage
from indexer.kafka.membership import Directory, Member, now_ms
from indexer.web import fanout, ops
from indexer.web.errors import error, json_body, json_errors
from indexer.web.params import SearchParams, collection, number
from indexer.web.search import FLOAT32_MAX, _read_image, facets_json, image_answer

log = logging.getLogger(__name__)

#: Parameters a search passes on to the replicas as they came.


class ReplicaFailed(Exception):
    """A replica did not answer in time, or answered with an error of its own (5xx), or not for this generation."""

    def __init__(self, message: str, bench: bool = True) -> None:
        super().__init__(message)
        #: ask it again only as a last resort for ``cluster.bench_s``: not for a 409 (it answers another generation)
        self.bench = bench


class NoReplica(Exception):
    """No ready replica answers the generation for the partitions asked."""


class Router:
    """Generations the router can encode for, the replicas it knows, and how it asks them."""

    def __init__(self, settings: Settings, generation: Generation) -> None:
        self.settings = settings
        #: generations whose models are loaded here, the configured one first (at most two: see reload)
        self.generations: list[Generation] = [generation]
        self.directory = Directory(settings.kafka, settings.cluster) if settings.cluster.discover else None
        #: statically listed replicas, as their /readyz last described them
        self.static: dict[str, Member] = {}
        self.session: aiohttp.ClientSession | None = None
        self.counts = {"queries": 0, "replica_failures": 0, "partial_answers": 0, "refused": 0}
        #: replicas that failed lately -> until when (monotonic s) they are asked only if no other one can answer
        self.benched: dict[str, float] = {}

    def members(self) -> list[Member]:
        announced = self.directory.members() if self.directory is not None else []
        at = now_ms()
        listed = [m for m in self.static.values() if m.alive(at) and m.url not in {a.url for a in announced}]
        return [*announced, *listed]

    def choice(self, generation: str | None = None) -> fanout.Choice:
        usable = [generation] if generation is not None else [g.id for g in self.generations]
        return fanout.choose_generation(self.members(), usable)

    def pipeline_of(self, generation_id: str):
        for generation in self.generations:
            if generation.id == generation_id:
                return generation.pipeline
        raise NoReplica(f"no models for generation {generation_id} here")

    async def _post(self, url: str, path: str, body: dict[str, Any]) -> Any:
        timeout = aiohttp.ClientTimeout(total=self.settings.cluster.replica_timeout_s)
        try:
            async with self.session.post(
                url.rstrip("/") + path, data=orjson.dumps(body), headers=JSON, timeout=timeout
            ) as response:
                payload = await response.read()
                text = payload[:200].decode(errors="replace")
                if response.status == 409:  # not this generation (any more): another replica may answer it
                    raise ReplicaFailed(f"{url}: 409 {text}", bench=False)
                if 400 <= response.status < 500:  # the request is at fault, not the replica: tell the client
                    raise error(web.HTTPBadRequest, f"a replica refused the query: {response.status} {text}")
                if response.status != 200:
                    raise ReplicaFailed(f"{url}: {response.status} {text}")
                return orjson.loads(payload)
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as e:
            raise ReplicaFailed(f"{url}: {type(e).__name__}: {e}") from e

    async def _get(self, url: str, path: str) -> tuple[int, bytes, str]:
        timeout = aiohttp.ClientTimeout(total=self.settings.cluster.replica_timeout_s)
        try:
            async with self.session.get(url.rstrip("/") + path, timeout=timeout) as response:
                return response.status, await response.read(), response.content_type
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ReplicaFailed(f"{url}: {type(e).__name__}: {e}") from e

    async def search_vectors(
        self, vectors: list[list[float]], body: dict[str, Any], k: int, choice: fanout.Choice
    ) -> tuple[list[list[dict]], list[int]]:
        """Each vector's merged top k over a cover of the partitions, and the partitions no replica answered."""
        if not choice.candidates:
            raise NoReplica("no ready replica")
        self.counts["queries"] += 1
        uncovered = set(range(choice.total)) if choice.total is not None else set(choice.covered)
        failed: set[str] = set()
        answers: list[list[list[dict]]] = [[] for _ in vectors]
        while uncovered:
            left = [c for c in choice.candidates if c.url not in failed]
            benched = self.benched_now()
            chosen = fanout.plan([c for c in left if c.url not in benched], uncovered)
            still = uncovered - set().union(*(c.partitions for c in chosen))
            if still:  # a replica that failed lately is better than none
                chosen += fanout.plan([c for c in left if c.url in benched], still)
            if not chosen:
                break

            async def ask(candidate: fanout.Candidate) -> list[list[dict]]:
                asked = [{**body, "vector": v, "generation": choice.generation} for v in vectors]
                replies = await asyncio.gather(*(self._post(candidate.url, "/search/vector", b) for b in asked))
                return [reply["hits"] for reply in replies]

            results = await asyncio.gather(*(ask(c) for c in chosen), return_exceptions=True)
            for candidate, result in zip(chosen, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, ReplicaFailed):
                        raise result
                    failed.add(candidate.url)
                    if result.bench:
                        self.benched[candidate.url] = time.monotonic() + self.settings.cluster.bench_s
                    self.counts["replica_failures"] += 1
                    log.warning(
                        "replica failed; asking another for partitions %s: %s", sorted(candidate.partitions), result
                    )
                    continue
                for i, hits in enumerate(result):
                    answers[i].append(hits)
                uncovered -= candidate.partitions
        missing = sorted(uncovered)
        if missing:
            if not self.settings.cluster.allow_partial:
                self.counts["refused"] += 1
                raise NoReplica(f"no replica answered partitions {missing}")
            self.counts["partial_answers"] += 1
        return [fanout.merge(a, k) for a in answers], missing

    def benched_now(self) -> set[str]:
        now = time.monotonic()
        for url in [url for url, until in self.benched.items() if until <= now]:
            del self.benched[url]
        return set(self.benched)

    def owner_candidates(self, collection_name: str, record_id: str) -> list[fanout.Candidate]:
        """Ready replicas holding the partition a record's key hashes to, in a random order."""
        choice = self.choice()
        if choice.total is None:
            return list(choice.candidates)
        partition = (murmur2(record_key(collection_name, record_id)) & 0x7FFFFFFF) % choice.total
        holders = [c for c in choice.candidates if partition in c.partitions]
        random.shuffle(holders)
        benched = self.benched_now()
        return sorted(holders, key=lambda c: c.url in benched)  # lately failed ones last

    async def ask_owner(self, collection_name: str, record_id: str, path: str) -> tuple[int, bytes, str]:
        """GET ``path`` from a replica holding the record, trying the next one on failure."""
        for candidate in self.owner_candidates(collection_name, record_id):
            try:
                return await self._get(candidate.url, path)
            except ReplicaFailed as e:
                self.benched[candidate.url] = time.monotonic() + self.settings.cluster.bench_s
                self.counts["replica_failures"] += 1
                log.warning("replica failed; trying another: %s", e)
        raise NoReplica(f"no ready replica holds {collection_name} record {record_id!r}")

    async def poll_static(self) -> None:
        """Refresh what each listed replica's /readyz says, every announce interval."""
        cluster = self.settings.cluster
        while True:
            for replica in cluster.replicas:
                self.static[replica.url] = await self._describe(replica.url)
            await asyncio.sleep(cluster.announce_interval_s)

    async def _describe(self, url: str) -> Member:
        ttl = int(self.settings.cluster.member_ttl_s * 1000)
        try:
            status, payload, _ = await self._get(url, "/readyz")
            body = orjson.loads(payload)
            return Member(
                url,
                body.get("generation"),
                tuple(body.get("partitions") or ()),
                body.get("total_partitions"),
                status == 200,
                now_ms(),
                ttl,
                body.get("retiring"),
            )
        except (ReplicaFailed, orjson.JSONDecodeError, AttributeError) as e:
            log.warning("replica %s does not answer /readyz: %s", url, e)
            return Member(url, None, (), None, False, now_ms(), ttl)

    def reload(self, settings: Settings) -> None:
        """New model settings (SIGHUP): load them beside the current ones; replicas decide when they answer."""
        if any(generations.same_models(g.selection, settings.models) for g in self.generations[:1]):
            return
        new = Generation.create(self.settings, generations.load(self.settings, settings.models), settings.models)
        kept = [g for g in self.generations if g.id != new.id][:1]
        for dropped in self.generations[1:]:
            if dropped not in kept:
                dropped.close()
        self.generations = [new, *kept]
        log.info("router encodes for generations %s", [g.id for g in self.generations])

    def close(self) -> None:
        for generation in self.generations:
            generation.close()


JSON = {"Content-Type": "application/json"}
ROUTER = web.AppKey("router", Router)


def _params(source: Mapping[str, Any], settings: Settings) -> tuple[SearchParams, dict[str, Any]]:
    """The search parameters, checked here, and the ``/search/vector`` body that passes them on."""
    params = SearchParams.parse(source, settings.api, settings.shards)
    return params, params.as_json()


def _answer_info(choice: fanout.Choice, missing: list[int]) -> dict[str, Any]:
    return {"generation": choice.generation, "missing_partitions": missing, "partitions_total": choice.total}


async def search(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    params, body = _params(request.query, router.settings)
    photo = request.query.get("photo", "product")
    if photo not in query_flow.PHOTO_KINDS:
        raise error(web.HTTPBadRequest, f"photo must be product or street, got {photo!r}")
    data = await _read_image(request)
    choice = router.choice()
    loop = asyncio.get_running_loop()
    try:
        pipeline = router.pipeline_of(choice.generation)
        query = await loop.run_in_executor(
            None, query_flow.analyse_image, pipeline, router.settings.images, data, photo
        )
    except InvalidImage as e:
        raise error(web.HTTPBadRequest, str(e)) from e
    except NoReplica as e:
        raise error(web.HTTPServiceUnavailable, str(e)) from e
    vectors = [[float(x) for x in item.vector] for item in query.items] + [[float(x) for x in query.whole]]
    try:
        with query.clock.stage("search"):
            results, missing = await router.search_vectors(vectors, body, params.k, choice)
    except NoReplica as e:
        raise error(web.HTTPServiceUnavailable, str(e)) from e
    answer = image_answer(params, query.size, query.items, results[:-1], results[-1], query.clock.total())
    return json_body({**answer, **_answer_info(choice, missing)})


async def search_vector(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    if request.content_type != "application/json":
        raise error(web.HTTPUnsupportedMediaType, f"send JSON (application/json), got {request.content_type!r}")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as e:
        raise error(web.HTTPBadRequest, f"the body is not JSON: {e}") from e
    if not isinstance(body, dict) or not isinstance(body.get("vector"), list):
        raise error(web.HTTPBadRequest, "the body must be an object with a 'vector' list of numbers")
    params, passed = _params(body, router.settings)
    try:
        vector = np.asarray(body["vector"], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise error(web.HTTPBadRequest, "vector must be a list of numbers") from e
    if vector.ndim != 1 or not np.all(np.isfinite(vector)) or np.abs(vector).max(initial=0) > FLOAT32_MAX:
        raise error(web.HTTPBadRequest, "vector must be a flat list of finite float32 numbers")
    choice = router.choice(str(body["generation"]) if body.get("generation") is not None else None)
    try:
        (hits,), missing = await router.search_vectors([vector.tolist()], passed, params.k, choice)
    except NoReplica as e:
        raise error(web.HTTPServiceUnavailable, str(e)) from e
    return json_body({"hits": hits, **facets_json(hits, params), **_answer_info(choice, missing)})


async def item(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    name, record_id = collection(request), request.match_info["id"]
    return await _relay(router, name, record_id, request.path_qs)


async def thumbnail(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    name, record_id = collection(request), request.match_info["id"]
    return await _relay(router, name, record_id, request.path_qs)


async def _relay(router: Router, name: str, record_id: str, path: str) -> web.Response:
    try:
        status, payload, content_type = await router.ask_owner(name, record_id, path)
    except NoReplica as e:
        raise error(web.HTTPServiceUnavailable, str(e)) from e
    return web.Response(status=status, body=payload, content_type=content_type)


async def similar(request: web.Request) -> web.Response:
    """More like this: the record's stored vector from a replica holding it, then searched everywhere."""
    router = request.app[ROUTER]
    name, record_id = collection(request), request.match_info["id"]
    query = MultiDict(request.query)
    query["collection"] = query.pop("within", name)
    params, body = _params(query, router.settings)
    wanted = number(query, "item", int, None, 0, 10_000)
    choice = router.choice()  # the stored vector and the search come from one generation
    try:
        asked = {"collection": name, "vectors": 1}
        if choice.generation is not None:
            asked["generation"] = choice.generation
        path = f"/items/{quote(record_id, safe='')}?{urlencode(asked)}"
        status, payload, _ = await router.ask_owner(name, record_id, path)
    except NoReplica as e:
        raise error(web.HTTPServiceUnavailable, str(e)) from e
    if status != 200:
        raise error(web.HTTPNotFound, f"no {name} record with id {record_id!r}")
    items = [i for i in orjson.loads(payload)["items"] if i.get("vector") is not None]
    if not items:
        raise error(web.HTTPNotFound, f"no {name} record with id {record_id!r}")
    if wanted is None:
        chosen = max(items, key=lambda i: i["score"])
    else:
        chosen = next((i for i in items if i["item"] == wanted), None)
        if chosen is None:
            raise error(web.HTTPNotFound, f"{name} record {record_id!r} has no item {wanted} (it has {len(items)})")
    body["k"] = min(params.k + 1, router.settings.api.max_k)  # one more: the record itself is left out
    try:
        (hits,), missing = await router.search_vectors([chosen["vector"]], body, body["k"], choice)
    except NoReplica as e:
        raise error(web.HTTPServiceUnavailable, str(e)) from e
    hits = [h for h in hits if (h["collection"], h["id"]) != (name, record_id)][: params.k]
    return json_body({"hits": hits, **facets_json(hits, params), **_answer_info(choice, missing)})


async def recent(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    limit = number(dict(request.query), "limit", int, 24, 1, 200)
    choice = router.choice()
    chosen = fanout.plan(choice.candidates, set(range(choice.total or 0)))
    replies = await asyncio.gather(
        *(router._get(c.url, f"/recent?limit={limit}") for c in chosen), return_exceptions=True
    )
    records = []
    for reply in replies:
        if isinstance(reply, tuple) and reply[0] == 200:
            records += orjson.loads(reply[1])["records"]
    records.sort(key=lambda r: -(r["ts"] or 0))
    return json_body({"records": records[:limit]})


async def stats(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    choice = router.choice()
    benched = router.benched_now()
    return web.json_response(
        {
            "role": "route",
            "generation": choice.generation,
            "generations": [g.id for g in router.generations],
            "partitions_total": choice.total,
            "missing_partitions": choice.missing,
            "replicas": [
                {
                    "url": m.url,
                    "generation": m.generation,
                    "retiring": m.retiring,
                    "partitions": list(m.partitions),
                    "ready": m.ready,
                    "benched": m.url in benched,
                    "age_s": round((now_ms() - m.ts) / 1000, 1),
                }
                for m in sorted(router.members(), key=lambda m: m.url)
            ],
            "counts": dict(router.counts),
        }
    )


class _RouterCollector:
    """Read at scrape time: what the router counted, and the replicas it would ask now."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        help_texts = {
            "queries": "searches fanned out to replicas",
            "replica_failures": "replica answers that failed or came late (asked again elsewhere)",
            "partial_answers": "answers with missing partitions",
            "refused": "searches refused because partitions were missing (allow_partial off)",
        }
        for name, value in dict(self.router.counts).items():
            yield CounterMetricFamily(f"lookstream_router_{name}", help_texts[name], value=value)
        choice = self.router.choice()
        yield GaugeMetricFamily("lookstream_router_ready_replicas", "ready replicas of the answering generation",
                                value=len(choice.candidates))  # fmt: skip
        yield GaugeMetricFamily(
            "lookstream_router_missing_partitions", "partitions no ready replica serves", value=len(choice.missing)
        )


async def metrics(request: web.Request) -> web.Response:
    from prometheus_client import CollectorRegistry, generate_latest

    from indexer.web.metrics import CONTENT_TYPE

    registry = CollectorRegistry()
    registry.register(_RouterCollector(request.app[ROUTER]))
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE})


async def readyz(request: web.Request) -> web.Response:
    """Ready when one generation's ready replicas, leaving out those that failed lately, cover every partition."""
    router = request.app[ROUTER]
    choice = router.choice()
    benched = router.benched_now()
    answering = tuple(c for c in choice.candidates if c.url not in benched)
    healthy = fanout.Choice(choice.generation, choice.total, answering)
    reasons = []
    if not healthy.candidates:
        reasons.append("no ready replica of a generation this router can encode for")
    elif healthy.missing:
        reasons.append(f"no ready replica serves partitions {healthy.missing}")
    return web.json_response(
        {"ready": not reasons, "reasons": reasons, "generation": choice.generation}, status=503 if reasons else 200
    )


async def openapi_document(request: web.Request) -> web.Response:
    from indexer.web import openapi

    return web.json_response(openapi.document(request.app[ROUTER].settings))


def create_router_app(router: Router, *, reload_settings: Callable[[], Settings] | None = None) -> web.Application:
    """The router's HTTP app: the node's routes, answered by fanning out to replicas. Owns the router."""
    app = web.Application(client_max_size=router.settings.api.max_request_bytes, middlewares=[json_errors])
    app[ROUTER] = router
    app.add_routes(
        [
            web.post("/search", search),
            web.post("/search/vector", search_vector),
            web.get("/items/{id}", item),
            web.get("/items/{id}/thumbnail", thumbnail),
            web.get("/items/{id}/similar", similar),
            web.get("/recent", recent),
            web.get("/", ops.page),
            web.get("/stats", stats),
            web.get("/healthz", ops.healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
            web.get("/openapi.json", openapi_document),
        ]
    )
    app.cleanup_ctx.append(_lifecycle)
    if reload_settings is not None:

        async def on_startup(app: web.Application) -> None:
            loop = asyncio.get_running_loop()

            async def reload() -> None:
                try:
                    await loop.run_in_executor(None, router.reload, reload_settings())
                except Exception:
                    log.exception("reloading the config failed; nothing changed")

            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))

        app.on_startup.append(on_startup)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    router = app[ROUTER]
    router.session = aiohttp.ClientSession()
    if router.directory is not None:
        router.directory.start()
    poller = asyncio.create_task(router.poll_static()) if router.settings.cluster.replicas else None
    yield
    if poller is not None:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
    loop = asyncio.get_running_loop()
    if router.directory is not None:
        await loop.run_in_executor(None, router.directory.stop)
    await router.session.close()
    await loop.run_in_executor(None, router.close)
