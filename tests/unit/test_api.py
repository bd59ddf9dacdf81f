import aiohttp
import pytest

from indexer.api import create_app
from indexer.config import Settings
from indexer.events import Event
from indexer.node import Node
from tests.imagegen import encoded, product_image

JPEG = {"Content-Type": "image/jpeg"}


@pytest.fixture
def node(default_models):
    settings = Settings.model_validate({"api": {"max_request_bytes": 200_000, "max_k": 20}})
    node = Node.create(settings, default_models)
    events = [
        Event(
            "product.upsert",
            f"p{i}",
            i,
            image=encoded(product_image(i)),
            attrs={"category": ("top", "bag")[i % 2], "title": f"item {i}"},
        )
        for i in range(6)
    ]
    node.shards.apply(node.pipeline.process(events))
    return node


@pytest.fixture
async def client(aiohttp_client, node):
    return await aiohttp_client(create_app(node, consume=False))


async def test_raw_image_finds_its_product_first(client):
    response = await client.post("/search?k=3", data=encoded(product_image(4)), headers=JPEG)
    assert response.status == 200
    body = await response.json()
    assert [h["id"] for h in body["hits"]][:1] == ["p4"] and len(body["hits"]) == 3
    assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert body["hits"][0]["attrs"] == {"category": "top", "title": "item 4"}
    assert body["items"][0]["hits"][0]["id"] == "p4"
    assert set(body["timings_ms"]) == {"decode", "models", "search", "total"}


async def test_multipart_field_and_category_filter(client):
    form = aiohttp.FormData()
    form.add_field("image", encoded(product_image(1), "PNG"), filename="q.png", content_type="image/png")
    response = await client.post("/search?category=bag&k=10", data=form)
    body = await response.json()
    assert body["hits"][0]["id"] == "p1" and {h["category"] for h in body["hits"]} == {"bag"}


async def test_posts_collection_is_separate(client):
    response = await client.post("/search?collection=posts", data=encoded(product_image(1)), headers=JPEG)
    assert (await response.json())["hits"] == []


@pytest.mark.parametrize(
    ("query", "headers", "data", "status", "message"),
    [
        ("?k=0", JPEG, b"x", 400, "k must be between 1 and 20"),
        ("?k=21", JPEG, b"x", 400, "k must be between"),
        ("?k=ten", JPEG, b"x", 400, "k must be an integer"),
        ("?collection=users", JPEG, b"x", 400, "collection must be one of"),
        ("", {"Content-Type": "text/plain"}, b"x", 415, "image/* content type"),
        ("", JPEG, b"", 400, "the image is empty"),
        ("", JPEG, b"not a jpeg", 400, "not a JPEG, PNG or WebP"),
        ("", JPEG, b"x" * 300_000, 413, None),
    ],
)
async def test_bad_requests_get_a_4xx_with_a_message(client, query, headers, data, status, message):
    response = await client.post(f"/search{query}", data=data, headers=headers)
    assert response.status == status
    if message:
        assert message in (await response.json())["error"]


async def test_multipart_without_image_field(client):
    form = aiohttp.FormData()
    form.add_field("photo", b"x", filename="q.jpg", content_type="image/jpeg")
    response = await client.post("/search", data=form)
    assert response.status == 400 and "no field named 'image'" in (await response.json())["error"]


async def test_stats_and_healthz(client):
    stats = await (await client.get("/stats")).json()
    assert stats["records"] == {"products": 6, "posts": 0}
    assert [(s["collection"], s["category"], s["vectors"], s["sealed"]) for s in stats["shards"]] == [
        ("products", "bag", 3, None),
        ("products", "top", 3, None),
    ]
    assert stats["models"]["encoder"] == "efficientnet-lite0" and stats["consumer"]["running"] is False
    assert (await (await client.get("/healthz")).json()) == {"status": "ok"}
