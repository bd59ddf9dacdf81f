"""Scale-out on the real broker: encoders -> records topic -> serve replicas -> router, against one node.

Everything runs in this process (threads and aiohttp servers on loopback
ports) with the default models: two encoders in one group, two full replicas,
two replicas of half the partitions each, a router that finds them on the
membership topic, and a single node indexing the same events the usual way.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
from kafka import KafkaProducer
from kafka.partitioner.default import murmur2

from consumers.encoding import EncodingConsumer, encoder_group
from consumers.records_topic import record_key
from indexer import generations
from indexer.config import Settings
from indexer.events import Event
from indexer.generations import Generation, Replica
from indexer.kafka.membership import Member, now_ms
from indexer.kafka.topics import ensure_topic
from indexer.node import Node
from indexer.web.app import create_app
from indexer.web.router import ROUTER, Router, create_router_app
from producers.publisher import make_producer, publish
from tests.integration.conftest import eventually
from tests.support.imagegen import JPEG, encoded, product_image
from tests.support.processes import free_port

pytestmark = pytest.mark.integration

PRODUCTS = 24


def events() -> tuple[list[Event], list[Event]]:
    """Products and posts, then an update and a delete; what the index should hold at the end."""
    products = [
        Event(
            "product.upsert",
            f"p{i}",
            1000 + i,
            image=encoded(product_image(i)),
            attrs={"category": ("top", "bag", "shoes")[i % 3], "title": f"item {i}", "brand": ("Acme", "Zeta")[i % 2]},
        )
        for i in range(PRODUCTS)
    ]
    products.append(Event("product.upsert", "p3", 5000, image=encoded(product_image(103)), attrs={"title": "new"}))
    products.append(Event("product.delete", "p5", 5001))
    posts = [
        Event("post.upsert", f"look-{i}", 2000 + i, image=encoded(product_image(50 + i)), attrs={"user": f"u{i}"})
        for i in range(4)
    ]
    return products, posts


@pytest.fixture
def cluster_settings(topics, unique, tmp_path) -> Settings:
    return Settings.model_validate(
        {
            **topics.model_dump(),
            "data_dir": tmp_path / "data",
            "shards": {"checkpoint_interval_s": 0.5},
            "cluster": {
                "records_topic_prefix": f"records-{unique}",
                "records_partitions": 4,
                "membership_topic": f"members-{unique}",
                "announce_interval_s": 0.3,
                "member_ttl_s": 3,
                "replica_timeout_s": 5,
            },
        }
    )


class Cluster:
    """Encoders, replicas and a router in this process; stops what it started."""

    def __init__(self, settings: Settings, models, aiohttp_server, aiohttp_client) -> None:
        self.settings = settings
        self.models = models
        self.aiohttp_server = aiohttp_server
        self.aiohttp_client = aiohttp_client
        self.encoders: list[EncodingConsumer] = []
        self.started = 0
        self.generation = Generation.create(settings, models)
        self.topic = self.generation.records_topic(settings)
        ensure_topic(settings.kafka, self.topic, settings.cluster.records_partitions)
        ensure_topic(settings.kafka, settings.cluster.membership_topic, 1)

    def start_encoder(self) -> EncodingConsumer:
        s = self.settings
        kafka = s.kafka.model_copy(update={"group_id": encoder_group(s.kafka.group_id, self.generation.id)})
        generation = Generation.create(s, self.models)
        encoder = EncodingConsumer(kafka, s.cluster, generation.pipeline, generation.stats, generation.id, self.topic)
        encoder.start()
        self.encoders.append(encoder)
        return encoder

    async def start_replica(self, partitions=None, data_dir=None):
        """A serve replica (durable under ``data_dir`` if given) announcing itself; its node and a client."""
        durable = data_dir is not None
        self.started += 1
        data_dir = data_dir or self.settings.data_dir.parent / f"replica-{self.started}"
        settings = self.settings.model_copy(update={"data_dir": data_dir})
        generation = await asyncio.get_running_loop().run_in_executor(
            None, lambda: Generation.create(settings, self.models, durable=durable, replica=Replica(partitions))
        )
        node = Node(settings, generation)
        port = free_port()
        server = await self.aiohttp_server(create_app(node, announce_url=f"http://127.0.0.1:{port}"), port=port)
        return node, await self.aiohttp_client(server)

    async def router(self):
        router = Router(self.settings, Generation.create(self.settings, self.models))
        return await self.aiohttp_client(create_router_app(router)), router

    def stop_encoders(self) -> None:
        for encoder in self.encoders:
            encoder.stop()


@pytest.fixture
async def cluster(cluster_settings, default_models, aiohttp_server, aiohttp_client):
    cluster = Cluster(cluster_settings, default_models, aiohttp_server, aiohttp_client)
    yield cluster
    cluster.stop_encoders()


async def json_of(response):
    assert response.status == 200, await response.text()
    return await response.json()


async def records(client) -> dict:
    return (await json_of(await client.get("/stats")))["records"]


def ranked(hits) -> list[tuple[str, str]]:
    return [(h["collection"], h["id"]) for h in hits]


def assert_same_hits(got, expected) -> None:
    assert ranked(got) == ranked(expected)
    for a, b in zip(got, expected, strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert (a["attrs"], a["item"], a["box"], a["category"]) == (b["attrs"], b["item"], b["box"], b["category"])


QUERIES = [
    {"k": 5},
    {"k": 8, "collection": "both"},
    {"k": 4, "brand": "acme"},
    {"k": 3, "category": "bag"},
    [("k", "6"), ("brand", "zeta"), ("brand", "ACME"), ("facets", "brand,colour")],  # any-of, and facets
]
SEEDS = (0, 3, 7, 103, 51)


async def image_answers(client) -> list[dict]:
    return [
        await json_of(await client.post("/search", params=params, data=encoded(product_image(seed)), headers=JPEG))
        for seed in SEEDS
        for params in QUERIES
    ]


def assert_same_answers(got: list[dict], expected: list[dict]) -> None:
    for a, b in zip(got, expected, strict=True):
        assert_same_hits(a["hits"], b["hits"])
        assert a.get("facets") == b.get("facets")
        assert len(a["items"]) == len(b["items"])
        for item_a, item_b in zip(a["items"], b["items"], strict=True):
            assert item_a["box"] == item_b["box"]
            assert_same_hits(item_a["hits"], item_b["hits"])


EXPECTED = {"products": PRODUCTS - 1, "posts": 4}


async def holds_everything(client) -> bool:
    """Every event applied: the counts, the update of p3 and the delete of p5."""
    if await records(client) != EXPECTED:
        return False
    item = await client.get("/items/p3")
    return item.status == 200 and (await item.json())["attrs"] == {"title": "new"}


def publish_all(settings: Settings, products: list[Event], posts: list[Event]) -> None:
    producer = make_producer(settings.kafka)
    publish(products, settings.kafka.topics.products, producer, progress=False)
    publish(posts, settings.kafka.topics.posts, producer, progress=False)
    producer.close()


async def test_replicas_and_the_router_answer_as_a_single_node(
    cluster, cluster_settings, default_models, aiohttp_client
):
    single = await aiohttp_client(create_app(Node.create(cluster_settings, default_models)))
    cluster.start_encoder()
    cluster.start_encoder()
    full = [await cluster.start_replica() for _ in range(2)]
    halves = [await cluster.start_replica((0, 1)), await cluster.start_replica((2, 3))]
    router, _ = await cluster.router()
    publish_all(cluster_settings, *events())

    await eventually(lambda: holds_everything(single), timeout=120)
    for _, client in full:
        await eventually(lambda client=client: holds_everything(client), timeout=120)

    async def halves_hold_everything() -> bool:
        counts = [await records(client) for _, client in halves]
        return {c: sum(r[c] for r in counts) for c in EXPECTED} == EXPECTED

    await eventually(halves_hold_everything, timeout=60)
    await eventually(lambda: router_ready(router), timeout=30)

    expected = await image_answers(single)
    assert all(answer["hits"] for answer in expected)
    for _, client in full:
        assert_same_answers(await image_answers(client), expected)
    routed = await image_answers(router)
    assert_same_answers(routed, expected)
    assert all(answer["missing_partitions"] == [] for answer in routed)
    assert {answer["generation"] for answer in routed} == {cluster.generation.id}

    # The halves' answers merged are the single node's: nothing of a partition is anywhere else.
    vector = {"vector": [0.5] * default_models.encoder.dim, "k": 10, "collection": "both"}
    one = (await json_of(await single.post("/search/vector", json=vector)))["hits"]
    parts = [(await json_of(await client.post("/search/vector", json=vector)))["hits"] for _, client in halves]
    assert not set(ranked(parts[0])) & set(ranked(parts[1]))
    merged = sorted(parts[0] + parts[1], key=lambda h: -h["score"])[:10]
    assert_same_hits(merged, one)
    assert_same_hits((await json_of(await router.post("/search/vector", json=vector)))["hits"], one)

    # A router given the replicas by URL instead of the membership topic answers the same.
    urls = [{"url": str(c.make_url("")).rstrip("/")} for _, c in halves]
    listed = {**cluster_settings.cluster.model_dump(), "discover": False, "replicas": urls}
    static = Settings.model_validate({**cluster_settings.model_dump(), "cluster": listed})
    static_router = await aiohttp_client(create_router_app(Router(static, Generation.create(static, default_models))))
    await eventually(lambda: router_ready(static_router), timeout=30)
    assert_same_hits((await json_of(await static_router.post("/search/vector", json=vector)))["hits"], one)

    # Record routes go to a replica holding the record.
    for path in ("/items/p3", "/items/look-2?collection=posts"):
        assert await json_of(await router.get(path)) == await json_of(await single.get(path))
    similar = await json_of(await router.get("/items/p3/similar?k=4&within=both"))
    assert_same_hits(similar["hits"], (await json_of(await single.get("/items/p3/similar?k=4&within=both")))["hits"])
    assert len(similar["hits"]) == 4
    # At the largest k (one more is asked for, the record itself left out), and a request a replica refuses:
    # a 4xx is the client's, not a replica failure that would bench every replica.
    most = await json_of(await router.get("/items/p3/similar?k=100&within=both"))
    assert most["missing_partitions"] == [] and "p3" not in [h["id"] for h in most["hits"]]
    wrong_size = await router.post("/search/vector", json={"vector": [0.5, 0.5], "k": 3})
    assert wrong_size.status == 400 and "a replica refused the query" in (await wrong_size.json())["error"]
    assert not router.app[ROUTER].benched_now()
    assert (await router.get("/items/p5")).status == 404
    thumbnail = await router.get("/items/p3/thumbnail")
    assert thumbnail.status == 200 and thumbnail.content_type == "image/jpeg"


async def router_ready(router) -> bool:
    return (await router.get("/readyz")).status == 200


def partition_of(hit: dict, total: int = 4) -> int:
    return (murmur2(record_key(hit["collection"], hit["id"])) & 0x7FFFFFFF) % total


async def test_a_failed_replica_is_retried_on_another_and_missing_partitions_are_named(
    cluster, cluster_settings, default_models, aiohttp_client
):
    single = await aiohttp_client(create_app(Node.create(cluster_settings, default_models)))
    cluster.start_encoder()
    _, full = await cluster.start_replica()
    _, half_a = await cluster.start_replica((0, 1))
    _, half_b = await cluster.start_replica((2, 3))
    router, routing = await cluster.router()
    publish_all(cluster_settings, *events())
    for client in (single, full):
        await eventually(lambda client=client: holds_everything(client), timeout=120)
    await eventually(lambda: router_ready(router), timeout=60)

    # A replica that is announced as ready for everything but does not answer: queries that pick it are retried.
    dead = Member(f"http://127.0.0.1:{free_port()}", cluster.generation.id, (0, 1, 2, 3), 4, True, now_ms(), 600_000)
    producer = KafkaProducer(bootstrap_servers=cluster_settings.kafka.bootstrap_servers)
    producer.send(cluster_settings.cluster.membership_topic, key=dead.url.encode(), value=dead.encode()).get(10)
    producer.close()
    await eventually(lambda: _knows(router, dead.url), timeout=30)

    vector = {"vector": [0.5] * default_models.encoder.dim, "k": 10, "collection": "both"}
    expected = (await json_of(await single.post("/search/vector", json=vector)))["hits"]
    failures, answers = [], 0

    async def query_loop(stop: asyncio.Event) -> None:
        nonlocal answers
        while not stop.is_set():
            response = await router.post("/search/vector", json=vector)
            if response.status != 200:
                failures.append(await response.text())
                continue
            body = await response.json()
            if body["missing_partitions"] or ranked(body["hits"]) != ranked(expected):
                failures.append(body)
            answers += 1

    stop = asyncio.Event()
    querying = asyncio.create_task(query_loop(stop))
    await asyncio.sleep(1.5)
    await half_a.close()  # a replica goes away while queries run
    await asyncio.sleep(1.5)
    stop.set()
    await querying
    assert failures == [] and answers > 10
    assert routing.counts["replica_failures"] > 0
    scraped = await (await router.get("/metrics")).text()
    assert f"lookstream_router_replica_failures_total {routing.counts['replica_failures']}.0" in scraped

    # No replica left for partitions 0 and 1: the answer says so, with the hits of partitions 2 and 3.
    full_url = str(full.make_url("")).rstrip("/")
    await full.close()
    await eventually(lambda: _forgot(router, full_url), timeout=30)
    body = await json_of(await router.post("/search/vector", json=vector))
    assert body["missing_partitions"] == [0, 1]
    kept = [h for h in expected if partition_of(h) in (2, 3)]
    assert kept and ranked(body["hits"][: len(kept)]) == ranked(kept)
    assert {partition_of(h) for h in body["hits"]} <= {2, 3}
    assert (await router.get("/readyz")).status == 503

    strict = cluster_settings.model_copy(
        update={"cluster": cluster_settings.cluster.model_copy(update={"allow_partial": False})}
    )
    refusing = await aiohttp_client(create_router_app(Router(strict, Generation.create(strict, default_models))))
    await eventually(lambda: _knows(refusing, str(half_b.make_url("")).rstrip("/")), timeout=30)
    response = await refusing.post("/search/vector", json=vector)
    assert response.status == 503 and "partitions [0, 1]" in (await response.json())["error"]


async def _knows(router, url: str) -> bool:
    stats = await json_of(await router.get("/stats"))
    return any(r["url"] == url and r["ready"] for r in stats["replicas"])


async def _forgot(router, url: str) -> bool:
    return not await _knows(router, url)


async def test_a_late_replica_restores_a_checkpoint_catches_up_and_becomes_ready(cluster, cluster_settings, tmp_path):
    products, posts = events()
    cluster.start_encoder()
    _, first_client = await cluster.start_replica(data_dir=tmp_path / "first")
    publish_all(cluster_settings, products[:12], [])

    async def has(client, count: int) -> bool:
        return (await records(client))["products"] == count

    await eventually(lambda: has(first_client, 12), timeout=120)
    await first_client.close()  # stopping writes a checkpoint of what it applied
    checkpoints = tmp_path / "first" / "checkpoints"
    assert any(checkpoints.rglob("manifest.json"))

    publish_all(cluster_settings, products[12:], posts)
    shutil.copytree(tmp_path / "first", tmp_path / "late")  # as a new machine would get it from shared storage
    late, late_client = await cluster.start_replica(data_dir=tmp_path / "late")
    assert late.active.restored_from is not None
    assert late.active.restored_offsets  # it resumes there, not from the beginning
    await eventually(lambda: holds_everything(late_client), timeout=120)
    await eventually(lambda: router_ready(late_client), timeout=30)  # /readyz, the same check as the router's
    stats = await json_of(await late_client.get("/stats"))
    assert stats["models"]["checkpoint"]["restored_from"] == late.active.restored_from


async def test_a_generation_flip_across_the_cluster_fails_no_query_and_mixes_no_generations(
    cluster, cluster_settings, tiny_clip
):
    cluster.start_encoder()
    halves = [await cluster.start_replica((0, 1)), await cluster.start_replica((2, 3))]
    router, routing = await cluster.router()
    publish_all(cluster_settings, [product(i) for i in range(12)], [])
    old = cluster.generation.id

    async def all_found() -> bool:
        return all([await found(router, i) for i in range(12)])

    await eventually(lambda: router_ready(router), timeout=60)
    await eventually(all_found, timeout=120)

    # The new generation's encoders, and the router able to encode for it.
    clip = cluster_settings.models.model_copy(
        update={"encoder": "clip-vision", "options": {"clip-vision": {"name_or_path": str(tiny_clip)}}}
    )
    clip_settings = cluster_settings.model_copy(update={"models": clip})
    loop = asyncio.get_running_loop()
    clip_models = await loop.run_in_executor(None, generations.load, clip_settings, clip)
    new_encoder = Generation.create(clip_settings, clip_models, clip)
    new_topic = new_encoder.records_topic(clip_settings)
    ensure_topic(clip_settings.kafka, new_topic, clip_settings.cluster.records_partitions)
    kafka = clip_settings.kafka.model_copy(
        update={"group_id": encoder_group(clip_settings.kafka.group_id, new_encoder.id)}
    )
    encoder = EncodingConsumer(
        kafka, clip_settings.cluster, new_encoder.pipeline, new_encoder.stats, new_encoder.id, new_topic
    )
    encoder.start()
    cluster.encoders.append(encoder)
    await loop.run_in_executor(None, routing.reload, clip_settings)

    failures, seen = [], []
    stop = asyncio.Event()

    async def client_loop() -> None:
        i = 0
        while not stop.is_set():
            response = await router.post("/search?k=1", data=encoded(product_image(i % 12)), headers=JPEG)
            body = await response.json()
            if response.status != 200 or body["missing_partitions"]:
                failures.append(body)
            elif [h["id"] for h in body["hits"]] != [f"p{i % 12}"]:
                failures.append(body["hits"])
            else:
                seen.append(body["generation"])
            i += 1

    querying = asyncio.create_task(client_loop())
    # One replica flips first; the router keeps the old generation, which the flipped one still answers.
    (first, _), (second, _) = halves
    assert await loop.run_in_executor(None, first.switch, clip) is not None
    await eventually(lambda: _active(first, new_encoder.id), timeout=120)
    await asyncio.sleep(1.5)
    assert seen[-1] == old
    assert await loop.run_in_executor(None, second.switch, clip) is not None
    await eventually(lambda: _active(second, new_encoder.id), timeout=120)
    await eventually(lambda: _answered_by(seen, new_encoder.id), timeout=30)
    stop.set()
    await querying
    assert failures == []
    assert seen[0] == old and seen[-1] == new_encoder.id
    switched = seen.index(new_encoder.id)
    assert set(seen[:switched]) == {old} and set(seen[switched:]) == {new_encoder.id}  # one flip, no flapping


def product(i: int) -> Event:
    return Event("product.upsert", f"p{i}", 1000 + i, image=encoded(product_image(i)), attrs={"category": "top"})


async def found(client, i: int) -> bool:
    response = await client.post("/search?k=1", data=encoded(product_image(i)), headers=JPEG)
    if response.status != 200:
        return False
    hits = (await response.json())["hits"]
    return bool(hits) and hits[0]["id"] == f"p{i}"


async def _active(node: Node, generation: str) -> bool:
    return node.active.id == generation


async def _answered_by(seen: list[str], generation: str) -> bool:
    return bool(seen) and seen[-1] == generation
