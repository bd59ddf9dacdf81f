"""Fault injection against the real broker: every codec, a hostile corpus, failing models.

Good events are published by librdkafka (confluent-kafka), a client that is not
kafka-python, with each compression codec Kafka defines; between them go more
than 30 hostile events. Every good event must become searchable, every bad one
must reach the dead-letter topic with its reason kind, the consumer must stay
alive and ``/readyz`` must tell the truth throughout (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import os
import threading

import msgpack
import pytest
from aiohttp import web

from consumers.indexing import DETAIL_HEADER, REASON_HEADER
from indexer.events import Event, encode_event
from indexer.failures import Reason
from indexer.kafka.topics import ensure_topics
from indexer.node import Node
from indexer.web.app import create_app
from plugins import hookimpl
from plugins.manager import build_plugin_manager, load_models
from plugins.models import ModelContext
from tests.integration.conftest import eventually, read_dead_letters
from tests.support.imagegen import encoded, product_image

pytestmark = pytest.mark.integration
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
#: A crop whose top-left pixel has this colour makes the test encoder raise: a model bug for one event.
POISON = (1, 2, 3)


class ExplodingEncoder:
    """The real default encoder, except that it raises on poisoned crops, or on everything while ``out_of_memory``."""

    name = "exploding"

    def __init__(self, context: ModelContext) -> None:
        from plugins.builtin.efficientnet import EfficientNetLite0Encoder

        self.inner = EfficientNetLite0Encoder(context)
        self.version, self.dim = "test-1", self.inner.dim

    def encode(self, crops):
        import torch

        if ExplodingEncoder.out_of_memory.is_set():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(crop.getpixel((0, 0)) == POISON for crop in crops):
            raise ValueError("index 7 is out of bounds for axis 0 with size 7")
        return self.inner.encode(crops)

    out_of_memory = threading.Event()


class ExplodingPlugin:
    @hookimpl
    def lookstream_register_encoders(self, registry):
        registry.add(ExplodingEncoder.name, ExplodingEncoder)


@pytest.fixture(scope="module")
def exploding_models():
    pm = build_plugin_manager()
    pm.register(ExplodingPlugin(), name="exploding")
    return load_models(pm, "whole-image", "exploding", "event-attrs", ModelContext("cpu"))


def poisoned() -> bytes:
    image = product_image(999)
    image.putpixel((0, 0), POISON)
    return encoded(image, "PNG")  # lossless: the pixel survives


def upsert(record_id: str, **fields) -> bytes:
    body = {"v": 1, "type": "product.upsert", "id": record_id, "ts": 1, "attrs": {"category": "top"}, **fields}
    return msgpack.packb({k: v for k, v in body.items() if v is not ...}, use_bin_type=True)


@pytest.fixture
async def image_host(aiohttp_server):
    """An image server with the misbehaviours remote image hosts have."""
    jpeg = encoded(product_image(500))

    async def good(request):
        return web.Response(body=jpeg, content_type="image/jpeg")

    async def truncated(request):
        response = web.StreamResponse(headers={"Content-Length": str(len(jpeg) * 2), "Content-Type": "image/jpeg"})
        await response.prepare(request)
        await response.write(jpeg[:500])
        request.transport.close()
        return response

    async def slow(request):
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        for byte in jpeg[:40]:
            await response.write(bytes([byte]))
            await asyncio.sleep(0.1)
        return response

    async def unavailable(request):
        return web.Response(status=503, text="try later")

    async def moved(request):
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data")

    async def huge(request):
        return web.Response(body=b"\xff" * 300_000, content_type="image/jpeg")

    async def text(request):
        return web.Response(text="<html>not an image</html>", content_type="text/html")

    app = web.Application()
    for path, handler in [
        ("/good.jpg", good),
        ("/truncated.jpg", truncated),
        ("/slow.jpg", slow),
        ("/unavailable.jpg", unavailable),
        ("/moved.jpg", moved),
        ("/huge.jpg", huge),
        ("/page.jpg", text),
    ]:
        app.router.add_get(path, handler)
    server = await aiohttp_server(app)
    return f"127.0.0.1:{server.port}"


def hostile_events(root, host: str) -> dict[str, tuple[bytes, Reason]]:
    """key -> (message value, expected reason kind): at least 30 ways to send a bad event."""
    from PIL import Image

    def png(image) -> bytes:
        return encoded(image, "PNG")

    root.mkdir(exist_ok=True)
    os.mkfifo(root / "fifo.jpg")
    (root / "folder.jpg").mkdir()
    (root / "escape.jpg").symlink_to("/etc/hostname")
    (root / "garbage.jpg").write_bytes(b"not an image at all")
    base = root.as_uri()
    port = int(host.rsplit(":", 1)[1])
    refused, failed = Reason.IMAGE_URI_REFUSED, Reason.IMAGE_FETCH_FAILED
    # A JPEG header that claims 65,000 x 65,000 pixels, in 600 bytes.
    claims_huge = bytearray(encoded(product_image(3, (16, 16))))
    sof = claims_huge.index(b"\xff\xc0")
    claims_huge[sof + 5 : sof + 9] = (65000).to_bytes(2, "big") * 2
    return {
        "port-out-of-range": (upsert("x", image_uri="http://a:99999/x.jpg"), refused),
        "broken-ipv6": (upsert("x", image_uri="https://[::1/x"), refused),
        "ipv6-literal": (upsert("x", image_uri="http://[::1]:8080/x.jpg"), refused),
        "ipv6-scoped": (upsert("x", image_uri="http://[fe80::1%25eth0]/x.jpg"), refused),
        "other-port": (upsert("x", image_uri=f"http://127.0.0.1:{port + 1}/good.jpg"), refused),
        "portless-entry": (upsert("x", image_uri=f"http://localhost:{port}/good.jpg"), refused),
        "ssrf-metadata": (upsert("x", image_uri="http://169.254.169.254/latest/meta-data"), refused),
        "gopher": (upsert("x", image_uri="gopher://example.com/x.jpg"), refused),
        "empty-uri": (upsert("x", image_uri=""), refused),
        "control-chars": (upsert("x", image_uri="http://exa\nmple.com/x.jpg"), refused),
        "null-byte": (upsert("x", image_uri=f"{base}/a%00.jpg"), refused),
        "fifo": (upsert("x", image_uri=f"{base}/fifo.jpg"), refused),
        "directory": (upsert("x", image_uri=f"{base}/folder.jpg"), refused),
        "etc-passwd": (upsert("x", image_uri="file:///etc/passwd"), refused),
        "traversal": (upsert("x", image_uri=f"{base}/../../../etc/passwd"), refused),
        "symlink-out": (upsert("x", image_uri=f"{base}/escape.jpg"), refused),
        "file-host": (upsert("x", image_uri="file://otherhost/a.jpg"), refused),
        "missing-file": (upsert("x", image_uri=f"{base}/missing.jpg"), failed),
        "http-truncated": (upsert("x", image_uri=f"http://{host}/truncated.jpg"), failed),
        "http-slow": (upsert("x", image_uri=f"http://{host}/slow.jpg"), failed),
        "http-503": (upsert("x", image_uri=f"http://{host}/unavailable.jpg"), failed),
        "http-404": (upsert("x", image_uri=f"http://{host}/missing.jpg"), failed),
        "http-redirect": (upsert("x", image_uri=f"http://{host}/moved.jpg"), refused),
        "http-too-big": (upsert("x", image_uri=f"http://{host}/huge.jpg"), failed),
        "http-not-image": (upsert("x", image_uri=f"http://{host}/page.jpg"), Reason.IMAGE_UNDECODABLE),
        "file-not-image": (upsert("x", image_uri=f"{base}/garbage.jpg"), Reason.IMAGE_UNDECODABLE),
        "model-bug": (upsert("x", image=poisoned()), Reason.MODEL_FAILED),
        "model-bug-2": (upsert("x", image=poisoned()), Reason.MODEL_FAILED),
        "png-bomb": (upsert("x", image=png(Image.new("L", (9000, 9000)))), Reason.IMAGE_TOO_LARGE),
        "header-claims-huge": (upsert("x", image=bytes(claims_huge)), Reason.IMAGE_TOO_LARGE),
        "truncated-jpeg": (upsert("x", image=encoded(product_image(1))[:400]), Reason.IMAGE_UNDECODABLE),
        "gif": (upsert("x", image=encoded(Image.new("RGB", (8, 8)), "GIF")), Reason.IMAGE_UNDECODABLE),
        "empty-image": (upsert("x", image=b""), Reason.IMAGE_UNDECODABLE),
        "not-msgpack": (b"\xc1\xc1", Reason.BAD_ENVELOPE),
        "missing-id": (upsert("x", id=...), Reason.BAD_ENVELOPE),
        "unknown-type": (upsert("x", type="product.move"), Reason.BAD_ENVELOPE),
        "wrong-topic": (
            encode_event(Event("post.upsert", "x", 1, image=encoded(product_image(1)))),
            Reason.WRONG_TOPIC,
        ),
    }


def librdkafka_producer(bootstrap: str, codec: str):
    from confluent_kafka import Producer

    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "compression.type": codec,
            "enable.idempotence": codec in ("lz4", "zstd"),  # idempotent and not, both
            "linger.ms": 20,
            "log_level": 0,
        }
    )


def publish_mixed(settings, good: dict[str, bytes], bad: dict[str, tuple[bytes, Reason]]) -> None:
    """Good events spread over every codec, hostile ones between them, all with headers."""
    topic = settings.kafka.topics.products
    good_items, bad_items = list(good.items()), list(bad.items())
    for n, codec in enumerate(CODECS):
        producer = librdkafka_producer(settings.kafka.bootstrap_servers, codec)
        for key, value in good_items[n :: len(CODECS)]:
            producer.produce(topic, key=key.encode(), value=value, headers=[("trace", codec.encode())])
        for key, (value, _) in bad_items[n :: len(CODECS)]:
            producer.produce(topic, key=key.encode(), value=value, headers=[("trace", codec.encode())])
        assert producer.flush(30) == 0


async def search_top(client, image_bytes: bytes) -> str | None:
    response = await client.post("/search", params={"k": 3}, data=image_bytes, headers={"Content-Type": "image/jpeg"})
    assert response.status == 200, await response.text()
    hits = (await response.json())["hits"]
    return hits[0]["id"] if hits else None


async def test_every_codec_and_a_hostile_corpus_leave_the_stream_running(
    aiohttp_client, kafka_settings, exploding_models, image_host, tmp_path
):
    root = tmp_path / "images"
    settings = kafka_settings.model_copy(
        update={
            "images": kafka_settings.images.model_copy(
                update={
                    "file_roots": (root,),
                    "http_hosts": (image_host, "localhost"),
                    "http_allow_private_addresses": True,  # the image host is on loopback
                    "http_timeout_s": 1.0,
                    "http_attempts": 2,
                    "max_image_bytes": 200_000,
                }
            ),
        }
    )
    ensure_topics(settings.kafka)
    bad = hostile_events(root, image_host)
    assert len(bad) >= 30
    good = {f"good-{i}": upsert(f"good-{i}", image=encoded(product_image(i))) for i in range(15)}
    good["good-remote"] = upsert("good-remote", image_uri=f"http://{image_host}/good.jpg")
    node = Node.create(settings, exploding_models)
    client = await aiohttp_client(create_app(node))
    await eventually(lambda: _ready(client), timeout=60)

    readiness: list[int] = []
    watching = asyncio.create_task(_watch_readiness(client, readiness))
    await asyncio.get_running_loop().run_in_executor(None, publish_mixed, settings, good, bad)

    async def all_consumed():
        return (await (await client.get("/stats")).json())["ingest"]["consumed"] == len(good) + len(bad)

    await eventually(all_consumed, timeout=120)
    watching.cancel()
    body = await (await client.get("/stats")).json()
    assert body["records"]["products"] == len(good)
    assert body["ingest"]["rejected"] == len(bad)
    assert node.active.consumer.running and node.active.consumer.health.consecutive_failures == 0
    assert set(readiness) == {200}, "per-event failures must not make the node unready"

    for i in range(15):
        assert await search_top(client, encoded(product_image(i))) == f"good-{i}"
    assert await search_top(client, encoded(product_image(500))) == "good-remote"

    letters = await asyncio.get_running_loop().run_in_executor(None, read_dead_letters, settings.kafka, len(bad))
    assert set(letters) == set(bad)
    for key, (_, headers) in letters.items():
        assert headers[REASON_HEADER].decode() == bad[key][1], (key, headers[DETAIL_HEADER])
        assert headers[DETAIL_HEADER]  # the words, apart from the kind
    metrics = await (await client.get("/metrics")).text()
    assert 'lookstream_events_rejected_total{reason="model-failed"} 2.0' in metrics


async def test_a_failure_that_is_not_the_events_fault_is_retried_and_dead_letters_nothing(
    aiohttp_client, kafka_settings, exploding_models
):
    """The GPU runs out of memory for a while: the batch waits, /readyz says why, then everything is indexed."""
    settings = kafka_settings.model_copy(
        update={
            "ingest": kafka_settings.ingest.model_copy(update={"retry_backoff_s": 0.2, "unready_after_failures": 2})
        }
    )
    ensure_topics(settings.kafka)
    node = Node.create(settings, exploding_models)
    client = await aiohttp_client(create_app(node))
    await eventually(lambda: _ready(client), timeout=60)
    ExplodingEncoder.out_of_memory.set()
    try:
        producer = librdkafka_producer(settings.kafka.bootstrap_servers, "zstd")
        for i in range(6):
            producer.produce(
                settings.kafka.topics.products,
                key=f"p{i}".encode(),
                value=upsert(f"p{i}", image=encoded(product_image(i))),
            )
        assert producer.flush(30) == 0

        async def unready_with_reason():
            response = await client.get("/readyz")
            return response.status == 503 and "out of memory" in " ".join((await response.json())["reasons"])

        await eventually(unready_with_reason, timeout=30)
    finally:
        ExplodingEncoder.out_of_memory.clear()

    async def all_indexed():
        return (await (await client.get("/stats")).json())["records"]["products"] == 6

    await eventually(all_indexed, timeout=60)
    body = await (await client.get("/stats")).json()
    assert body["ingest"]["rejected"] == 0
    await eventually(lambda: _ready(client), timeout=30)
    metrics = await (await client.get("/metrics")).text()
    assert 'lookstream_consumer_failures_total{what="batch"}' in metrics


async def _ready(client) -> bool:
    return (await client.get("/readyz")).status == 200


async def _watch_readiness(client, seen: list[int]) -> None:
    while True:
        seen.append((await client.get("/readyz")).status)
        await asyncio.sleep(0.2)
