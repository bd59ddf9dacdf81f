"""/openapi.json is kept true: every route is in it, and every answer the API gives validates against it."""

import jsonschema
import pytest

from tests.support.imagegen import JPEG, encoded, product_image

REQUESTS = [
    ("post", "/search?k=2", {"data": encoded(product_image(1)), "headers": JPEG}, "/search"),
    ("post", "/search?collection=both&brand=acme", {"data": encoded(product_image(1)), "headers": JPEG}, "/search"),
    ("post", "/search?k=0", {"data": b"x", "headers": JPEG}, "/search"),
    ("post", "/search", {"data": b"x", "headers": {"Content-Type": "text/plain"}}, "/search"),
    ("post", "/search", {"data": b"x" * 300_000, "headers": JPEG}, "/search"),
    ("post", "/search/vector", {"json": {"vector": [1.0] * 1280, "k": 3}}, "/search/vector"),
    ("post", "/search/vector", {"json": {"vector": [1.0]}}, "/search/vector"),
    ("post", "/search/vector", {"data": b"{}", "headers": {"Content-Type": "text/plain"}}, "/search/vector"),
    ("get", "/items/p1", {}, "/items/{id}"),
    ("get", "/items/nope", {}, "/items/{id}"),
    ("get", "/items/p1?collection=users", {}, "/items/{id}"),
    ("get", "/items/nope/thumbnail", {}, "/items/{id}/thumbnail"),
    ("get", "/items/p1/similar?k=2&within=both&brand=acme", {}, "/items/{id}/similar"),
    ("get", "/items/nope/similar", {}, "/items/{id}/similar"),
    ("get", "/items/p1/similar?item=-1", {}, "/items/{id}/similar"),
    ("get", "/stats", {}, "/stats"),
    ("get", "/healthz", {}, "/healthz"),
    ("get", "/readyz", {}, "/readyz"),
    ("get", "/openapi.json", {}, "/openapi.json"),
    ("get", "/recent?limit=3", {}, "/recent"),
    ("get", "/recent?limit=0", {}, "/recent"),
    ("post", "/admin/rebuild", {}, "/admin/rebuild"),
    ("post", "/admin/snapshot", {}, "/admin/snapshot"),
    ("post", "/admin/swap", {"json": {}}, "/admin/swap"),
]


async def test_every_route_is_documented(client):
    doc = await (await client.get("/openapi.json")).json()
    routes = {(r.method.lower(), r.resource.canonical) for r in client.app.router.routes() if r.method != "HEAD"}
    documented = {(method, path) for path, operations in doc["paths"].items() for method in operations}
    assert routes == documented
    # Every JSON route has answers checked below; /metrics, the thumbnail and the page are not JSON.
    assert {path for _, _, _, path in REQUESTS} | {"/metrics", "/items/{id}/thumbnail", "/"} >= set(doc["paths"])


@pytest.mark.parametrize(("method", "url", "kwargs", "path"), REQUESTS, ids=[f"{r[0]} {r[1]}" for r in REQUESTS])
async def test_answers_validate_against_the_document(client, method, url, kwargs, path):
    doc = await (await client.get("/openapi.json")).json()
    response = await getattr(client, method)(url, **kwargs)
    spec = doc["paths"][path][method]["responses"]
    assert str(response.status) in spec, f"{response.status} is not documented for {method} {path}"
    schema = spec[str(response.status)]["content"]["application/json"]["schema"]
    jsonschema.validate(await response.json(), {**schema, "components": doc["components"]})
