"""The HTTP API on a real aiohttp server, over a node with real models and shards (no Kafka)."""

import json
import threading

import aiohttp
import numpy as np
import pytest

from indexer.events import Event, decode_event, encode_event
from indexer.web.app import create_app
from tests.support.imagegen import JPEG, encoded, product_image


async def search(client, seed: int, query: str = "", fmt: str = "JPEG") -> dict:
    response = await client.post(f"/search{query}", data=encoded(product_image(seed), fmt), headers=JPEG)
    assert response.status == 200, await response.text()
    return await response.json()


async def test_raw_image_finds_its_product_first_with_items_and_stage_timings(client):
    body = await search(client, 4, "?k=3")
    assert [h["id"] for h in body["hits"]][:1] == ["p4"] and len(body["hits"]) == 3
    first = body["hits"][0]
    assert first["score"] == pytest.approx(1.0, abs=1e-4) and first["collection"] == "products"
    assert first["attrs"] == {"category": "top", "title": "item 4", "brand": "Acme", "price": 40.0}
    assert body["items"][0]["hits"][0]["id"] == "p4" and body["items"][0]["box"] == [0, 0, 160, 200]
    assert body["image"] == {"width": 160, "height": 200}
    assert set(body["timings_ms"]) == {"decode", "detect", "encode", "search", "total"}


async def test_multipart_field_and_category_filter(client):
    form = aiohttp.FormData()
    form.add_field("image", encoded(product_image(1), "PNG"), filename="q.png", content_type="image/png")
    response = await client.post("/search?category=bag&k=10", data=form)
    body = await response.json()
    assert body["hits"][0]["id"] == "p1" and {h["category"] for h in body["hits"]} == {"bag"}


async def test_brand_and_price_filters(client):
    body = await search(client, 3, "?k=10&brand=zeta")
    assert {h["id"] for h in body["hits"]} == {"p0", "p3"}
    body = await search(client, 3, "?k=10&price_min=15&price_max=35")
    assert {h["id"] for h in body["hits"]} == {"p2", "p3"}


async def test_any_of_filters_and_facets_over_the_hits(client, node):
    body = await search(client, 3, "?k=10&brand=zeta&brand=ACME&price_max=30&facets=brand,colour")
    assert {h["id"] for h in body["hits"]} == {"p0", "p1", "p2", "p3"}
    assert body["facets"] == {"brand": {"acme": 2, "zeta": 2}, "colour": {}}
    vector = node.active.shards.record_vectors("products", "p4")[0][1].tolist()
    response = await client.post(
        "/search/vector", json={"vector": vector, "k": 10, "brand": ["Zeta"], "price_min": 5, "facets": ["brand"]}
    )
    body = await response.json()
    assert [h["id"] for h in body["hits"]] == ["p3"] and body["facets"] == {"brand": {"zeta": 1}}


async def test_list_valued_attributes_match_by_any_value_and_facet_each_value(client, node):
    """Sizes and colours as a catalog lists them, sent through the event format as a producer would."""
    sizes = [["S", "M"], ["m", "L", "M"], "M", [], ["XL", "l"], ["S", None]]
    colours = [["Red", "white"], ["red"], "White", ["blue", "blue"], None, ["red", {"hex": "#f00"}]]
    events = []
    for i, (size, colour) in enumerate(zip(sizes, colours, strict=True)):
        attrs = {"category": ("top", "bag")[i % 2], "size": size, **({} if colour is None else {"colour": colour})}
        event = Event("product.upsert", f"p{i}", 100 + i, image=encoded(product_image(i)), attrs=attrs)
        events.append(decode_event(encode_event(event)))
    node.active.shards.apply(node.active.pipeline.process(events))

    body = await search(client, 3, "?k=10&size=M&facets=size,colour")
    assert {h["id"] for h in body["hits"]} == {"p0", "p1", "p2"}
    assert body["facets"] == {"size": {"m": 3, "s": 1, "l": 1}, "colour": {"red": 2, "white": 2}}
    assert next(h for h in body["hits"] if h["id"] == "p1")["attrs"]["size"] == ["m", "L", "M"]  # as sent
    body = await search(client, 3, "?k=10&size=xl&size=L")
    assert {h["id"] for h in body["hits"]} == {"p1", "p4"}
    body = await search(client, 3, "?k=10&size=S&colour=RED&facets=colour")
    assert {h["id"] for h in body["hits"]} == {"p0", "p5"} and body["facets"] == {"colour": {"red": 2, "white": 1}}
    vector = node.active.shards.record_vectors("products", "p4")[0][1].tolist()
    response = await client.post("/search/vector", json={"vector": vector, "k": 10, "size": ["l"], "facets": ["size"]})
    body = await response.json()
    assert [h["id"] for h in body["hits"]][:1] == ["p4"] and {h["id"] for h in body["hits"]} == {"p1", "p4"}
    assert body["facets"] == {"size": {"l": 2, "m": 1, "xl": 1}}


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?colour_min=3", "'colour_min' is not a search parameter nor an indexed attribute"),
        ("?title=x", "filters: brand, colour, size, gender, in_stock, price_min, price_max"),
        ("?facets=price", "facets ['price'] are not keyword attributes"),
    ],
)
async def test_filters_on_attributes_that_are_not_indexed_are_refused(client, query, message):
    response = await client.post(f"/search{query}", data=encoded(product_image(1)), headers=JPEG)
    assert response.status == 400 and message in (await response.json())["error"]


async def test_posts_and_both_collections(client):
    posts = await search(client, 3, "?collection=posts")
    assert [h["id"] for h in posts["hits"]] == ["look-1"] and posts["hits"][0]["box"] == [0, 0, 160, 200]
    both = await search(client, 3, "?collection=both&k=3")
    assert {(h["collection"], h["id"]) for h in both["hits"][:2]} == {("products", "p3"), ("posts", "look-1")}


@pytest.mark.parametrize(("recent_search_s", "thread"), [(0.0, "MainThread"), (1.0, "lookstream-query")])
async def test_vector_search_runs_fast_searches_inline_and_slow_ones_in_the_executor(
    client, node, monkeypatch, recent_search_s, thread
):
    from indexer import search as query_flow
    from indexer.web.keys import WORKERS

    threads = []
    search_vector = query_flow.search_vector

    def recording(*args):
        threads.append(threading.current_thread().name)
        return search_vector(*args)

    monkeypatch.setattr(query_flow, "search_vector", recording)
    client.server.app[WORKERS].vector_search_s = recent_search_s
    vector = node.active.pipeline.encode([product_image(5)])[0]
    response = await client.post("/search/vector", json={"vector": (vector * 3).tolist(), "k": 2})
    body = await response.json()
    assert response.status == 200 and body["hits"][0]["id"] == "p5" and len(body["hits"]) == 2
    assert threads[0].startswith(thread)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"vector": [1.0, 2.0]}, "must have 1280 numbers"),
        ({"vector": [0.0] * 1280}, "not all zeros"),
        ({"vector": ["a"] * 1280}, "list of numbers"),
        ({"vector": [1.0] * 1280, "k": 0}, "k must be between"),
        ({"vec": []}, "'vector' list"),
        ([1, 2], "'vector' list"),
    ],
)
async def test_vector_search_refuses_bad_bodies(client, payload, message):
    response = await client.post("/search/vector", json=payload)
    assert response.status == 400 and message in (await response.json())["error"]


async def test_vector_search_refuses_a_body_that_is_not_json(client):
    response = await client.post("/search/vector", data=b'{"vector": [1,', headers={"Content-Type": "application/json"})
    assert response.status == 400 and "not JSON" in (await response.json())["error"]


async def test_items_and_thumbnails(client):
    response = await client.get("/items/p2")
    body = await response.json()
    assert response.status == 200 and body["attrs"]["title"] == "item 2" and body["items"][0]["category"] == "top"
    thumbnail = await client.get(body["thumbnail"])
    assert thumbnail.status == 200 and thumbnail.content_type == "image/jpeg"
    assert (await thumbnail.read())[:2] == b"\xff\xd8"
    post = await client.get("/items/look-1?collection=posts")
    assert (await post.json())["items"][0]["box"] == [0, 0, 160, 200]
    for url in ("/items/nope", "/items/nope/thumbnail", "/items/look-1"):
        missing = await client.get(url)
        assert missing.status == 404 and "no " in (await missing.json())["error"]


@pytest.mark.parametrize(
    ("query", "headers", "data", "status", "message"),
    [
        ("?k=0", JPEG, b"x", 400, "k must be between 1 and 20"),
        ("?k=21", JPEG, b"x", 400, "k must be between"),
        ("?k=ten", JPEG, b"x", 400, "k must be an integer"),
        ("?collection=users", JPEG, b"x", 400, "collection must be products, posts or both"),
        ("?price_min=5&price_max=1", JPEG, b"x", 400, "price_min must not be above price_max"),
        ("?price_min=nan", JPEG, b"x", 400, "price_min must be between"),
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


async def test_stats_health_readiness(client):
    stats = await (await client.get("/stats")).json()
    assert stats["records"] == {"products": 6, "posts": 1}
    assert [(s["collection"], s["category"], s["vectors"]) for s in stats["shards"]] == [
        ("posts", "uncategorized", 1),
        ("products", "bag", 3),
        ("products", "top", 3),
    ]
    assert stats["models"]["encoder"] == "efficientnet-lite0" and stats["backend"] == "cpu"
    assert [g["state"] for g in stats["generations"]] == ["active"]
    assert (await (await client.get("/healthz")).json()) == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["ready"] is True


async def test_metrics_count_queries_and_shards(client):
    await search(client, 1)
    text = await (await client.get("/metrics")).text()
    assert 'lookstream_shard_vectors{category="top",collection="products"} 3.0' in text
    assert 'lookstream_query_stage_seconds_count{stage="encode"} 1.0' in text
    assert "lookstream_events_consumed_total 0.0" in text and "lookstream_freshness_seconds_bucket" in text


def test_vector_dimension_is_the_active_encoders(node):
    from indexer.search import Where, search_vector

    with pytest.raises(ValueError, match="1280"):
        search_vector(node.active.shards, np.ones(3, np.float32), 1, Where(("products",)))


async def test_search_command_prints_a_table(aiohttp_server, node, tmp_path):
    import asyncio

    from click.testing import CliRunner

    from indexer.cli import main

    server = await aiohttp_server(create_app(node, consume=False))
    (tmp_path / "q.jpg").write_bytes(encoded(product_image(2)))
    args = ["search", str(tmp_path / "q.jpg"), "--url", f"http://127.0.0.1:{server.port}", "-k", "2"]
    result = await asyncio.get_running_loop().run_in_executor(None, CliRunner().invoke, main, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "item 1: uncategorized [0, 0, 160, 200]"  # a query has no attrs to classify by
    assert lines[2].split()[:3] == ["1", "1.000", "p2"] and "item 2" in lines[2]
    assert "whole image" in result.output and result.output.rstrip().splitlines()[-1].startswith("timings (ms)")
    bad = await asyncio.get_running_loop().run_in_executor(None, CliRunner().invoke, main, [*args, "-k", "500"])
    assert bad.exit_code != 0 and "400: k must be between 1 and 20" in bad.output
    street_args = [*args, "--photo", "street"]
    street = await asyncio.get_running_loop().run_in_executor(None, CliRunner().invoke, main, street_args)
    assert street.exit_code == 0 and street.output.splitlines()[2].split()[:3] == ["1", "1.000", "p2"]


TOKEN = "s3cret-token-value"


@pytest.fixture
async def admin_client(aiohttp_client, node):
    from pydantic import SecretStr

    settings = node.settings.model_copy(
        update={"api": node.settings.api.model_copy(update={"admin_token": SecretStr(TOKEN)})}
    )
    node.settings = settings
    return await aiohttp_client(create_app(node, consume=False))


@pytest.mark.parametrize("route", ["/admin/snapshot", "/admin/rebuild", "/admin/swap"])
async def test_admin_routes_need_the_token(admin_client, route):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = await admin_client.post(route, headers=headers, json={})
        assert response.status == 401 and "Bearer" in response.headers["WWW-Authenticate"]


async def test_admin_routes_are_off_without_a_token(client):
    response = await client.post("/admin/rebuild", headers={"Authorization": "Bearer anything"})
    assert response.status == 403 and "set api.admin_token" in (await response.json())["error"]


async def test_admin_rebuild_swap_and_snapshot(admin_client, node, tiny_clip, caplog):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = await admin_client.post("/admin/rebuild", headers=auth)
    assert response.status == 202 and (await response.json())["scheduled"] == 3
    node.active.shards.wait_for_rebuilds(timeout=60)
    assert node.active.shards.rebuilds == 3 and (await search(admin_client, 2))["hits"][0]["id"] == "p2"

    response = await admin_client.post("/admin/snapshot", headers=auth)
    assert response.status == 409  # no consumer runs in this app

    bad = await admin_client.post("/admin/swap", headers=auth, json={"encoder": "nope"})
    assert bad.status == 400 and "no encoder named 'nope'" in (await bad.json())["error"]
    swap = {"encoder": "clip-vision", "options": {"clip-vision": {"name_or_path": str(tiny_clip)}}}
    response = await admin_client.post("/admin/swap", headers=auth, json=swap)
    assert response.status == 202 and node.building is not None
    stats = await (await admin_client.get("/stats")).json()
    assert [g["state"] for g in stats["generations"]] == ["active", "catching-up"]
    assert TOKEN not in json.dumps(stats) and TOKEN not in caplog.text and TOKEN not in repr(node.settings)


async def test_more_like_this_answers_from_the_stored_vector_and_leaves_the_record_out(client):
    async def similar(path: str) -> tuple[int, dict]:
        response = await client.get(path)
        return response.status, await response.json()

    status, body = await similar("/items/p3/similar?k=3")
    assert status == 200 and 0 < len(body["hits"]) <= 3 and "p3" not in [h["id"] for h in body["hits"]]
    # The post shows the same image as p3: found from either side, at a score of 1.
    _, body = await similar("/items/p3/similar?within=posts")
    assert body["hits"][0]["id"] == "look-1" and body["hits"][0]["score"] > 0.9999
    _, body = await similar("/items/look-1/similar?collection=posts&within=products&item=0")
    assert body["hits"][0]["id"] == "p3" and body["hits"][0]["score"] > 0.9999
    # Filters apply as on /search: only p0 and p3 are Zeta, and p0 is the record itself.
    _, body = await similar("/items/p0/similar?brand=zeta&k=5")
    assert [h["id"] for h in body["hits"]] == ["p3"]
    assert (await similar("/items/nope/similar"))[0] == 404
    status, body = await similar("/items/p3/similar?item=4")
    assert status == 404 and "has no item 4" in body["error"]
    assert (await similar("/items/p3/similar?collection=users"))[0] == 400


async def test_a_street_photo_is_detected_as_posts_are(aiohttp_client, default_models, tmp_path):
    from dataclasses import replace

    from indexer.config import Settings
    from indexer.events import Event
    from indexer.node import Node
    from tests.support.detectors import HalvesDetector

    models = replace(default_models, detectors={"posts": HalvesDetector()})
    node = Node.create(Settings(data_dir=tmp_path), models)
    node.active.shards.apply(
        node.active.pipeline.process([Event("post.upsert", "look", 1, image=encoded(product_image(2)))])
    )
    client = await aiohttp_client(create_app(node, consume=False))

    async def items(photo: str) -> list[dict]:
        response = await client.post(
            f"/search?collection=posts&photo={photo}", data=encoded(product_image(2)), headers=JPEG
        )
        assert response.status == 200
        return (await response.json())["items"]

    street = await items("street")
    assert [i["label"] for i in street] == ["top", "bottom"] and street[0]["hits"][0]["id"] == "look"
    assert [i["label"] for i in await items("product")] == [None]
    response = await client.post("/search?photo=selfie", data=encoded(product_image(2)), headers=JPEG)
    assert response.status == 400 and "photo must be product or street" in (await response.json())["error"]
