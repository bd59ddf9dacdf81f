"""Search and item routes: ``POST /search``, ``POST /search/vector``, ``GET /items/{id}`` and its thumbnail.

Parameters are validated here and turned into 400s with a message; the work
(models, FAISS) runs in the node's executor, off the event loop, except vector
searches that have recently been faster than ``api.inline_search_ms``: for
those the thread hop would cost more than the search (docs/benchmarks.md,
"Query latency"). JSON is parsed and written with orjson on these hot routes.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from indexer.events import COLLECTIONS
from indexer.images import InvalidImage
from indexer.node import Node
from indexer.store.segments import ItemMeta
from indexer.store.shards import Hit

NODE = web.AppKey("node", Node)
FLOAT32_MAX = float(np.finfo(np.float32).max)
METRICS = web.AppKey("metrics", object)


def json_body(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def error(status: type[web.HTTPError], message: str) -> web.HTTPError:
    return status(text=json.dumps({"error": message}), content_type="application/json")


@dataclass(frozen=True)
class Query:
    """What to search and how: shared by the image and the vector route."""

    k: int
    collections: tuple[str, ...]
    category: str | None
    brand: str | None
    price_min: float | None
    price_max: float | None

    def accept(self) -> Callable[[ItemMeta], bool] | None:
        """An attribute filter, or None when none was asked for."""
        if self.brand is None and self.price_min is None and self.price_max is None:
            return None
        brand = self.brand.casefold() if self.brand is not None else None

        def accept(meta: ItemMeta) -> bool:
            attrs = meta.attrs
            if brand is not None and str(attrs.get("brand", "")).casefold() != brand:
                return False
            if self.price_min is not None or self.price_max is not None:
                price = attrs.get("price")
                if isinstance(price, bool) or not isinstance(price, int | float):
                    return False
                if self.price_min is not None and price < self.price_min:
                    return False
                if self.price_max is not None and price > self.price_max:
                    return False
            return True

        return accept

    @classmethod
    def parse(cls, params: dict[str, Any], node: Node) -> Query:
        api = node.settings.api
        k = _number(params, "k", int, api.default_k, 1, api.max_k)
        collection = params.get("collection", "products")
        if collection not in (*COLLECTIONS, "both"):
            raise error(web.HTTPBadRequest, f"collection must be products, posts or both, got {collection!r}")
        collections = COLLECTIONS if collection == "both" else (collection,)
        category = params.get("category") or None
        brand = params.get("brand") or None
        for name, value in (("category", category), ("brand", brand)):
            if value is not None and not isinstance(value, str):
                raise error(web.HTTPBadRequest, f"{name} must be a string")
        price_min = _number(params, "price_min", float, None, 0, math.inf)
        price_max = _number(params, "price_max", float, None, 0, math.inf)
        if price_min is not None and price_max is not None and price_min > price_max:
            raise error(web.HTTPBadRequest, "price_min must not be above price_max")
        return cls(k, collections, category, brand, price_min, price_max)


def _number(params: dict[str, Any], name: str, kind: type, default, low: float, high: float):
    raw = params.get(name)
    if raw is None:
        return default
    try:
        if isinstance(raw, bool) or (kind is int and isinstance(raw, float)):
            raise ValueError
        value = kind(raw)
    except (TypeError, ValueError):
        raise error(
            web.HTTPBadRequest, f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}"
        ) from None
    if not (low <= value <= high) or (kind is float and not math.isfinite(value)):
        raise error(web.HTTPBadRequest, f"{name} must be between {low} and {high}, got {raw!r}")
    return value


def hit_json(hit: Hit) -> dict[str, Any]:
    return {
        "id": hit.id,
        "score": round(hit.score, 6),
        "collection": hit.collection,
        "category": hit.category,
        "item": hit.item,
        "box": list(hit.box),
        "attrs": hit.attrs,
    }


async def _read_image(request: web.Request) -> bytes:
    content_type = request.content_type
    if content_type.startswith("image/"):
        data = await request.read()
    elif content_type == "multipart/form-data":
        try:
            data = await _image_field(request)
        except (HttpProcessingError, ValueError, AssertionError) as e:  # aiohttp's parser on a broken body
            raise error(web.HTTPBadRequest, f"malformed multipart body: {e}") from e
    else:
        raise error(
            web.HTTPUnsupportedMediaType,
            "send the image as the body with an image/* content type, or as multipart field 'image'; "
            f"got {content_type!r}",
        )
    if not data:
        raise error(web.HTTPBadRequest, "the image is empty")
    return data


async def _image_field(request: web.Request) -> bytes:
    reader = await request.multipart()
    async for part in reader:
        if getattr(part, "name", None) == "image":
            return await part.read()
    raise error(web.HTTPBadRequest, "multipart body has no field named 'image'")


async def search(request: web.Request) -> web.Response:
    """Per detected item its box, category, score and hits; and hits for the whole image."""
    node = request.app[NODE]
    query = Query.parse(dict(request.query), node)
    data = await _read_image(request)
    loop = asyncio.get_running_loop()
    try:
        result = await loop.run_in_executor(
            node.executor, node.query, data, query.k, query.collections, query.category, query.accept()
        )
    except InvalidImage as e:
        raise error(web.HTTPBadRequest, str(e)) from e
    request.app[METRICS].observe_query(result.timings_ms)
    width, height = result.size
    return json_body(
        {
            "collections": list(query.collections),
            "image": {"width": width, "height": height},
            "items": [
                {
                    "box": list(item.box),
                    "label": item.label,
                    "category": item.category,
                    "score": item.score,
                    "hits": [hit_json(h) for h in item.hits],
                }
                for item in result.items
            ],
            "hits": [hit_json(h) for h in result.hits],
            "timings_ms": result.timings_ms,
        }
    )


async def search_vector(request: web.Request) -> web.Response:
    """Search with an embedding of the active encoder: JSON ``{"vector": [...], "k": 10, ...}``."""
    node = request.app[NODE]
    if request.content_type != "application/json":
        raise error(web.HTTPUnsupportedMediaType, f"send JSON (application/json), got {request.content_type!r}")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as e:
        raise error(web.HTTPBadRequest, f"the body is not JSON: {e}") from e
    if not isinstance(body, dict) or not isinstance(body.get("vector"), list):
        raise error(web.HTTPBadRequest, "the body must be an object with a 'vector' list of numbers")
    query = Query.parse(body, node)
    try:
        vector = np.asarray(body["vector"], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise error(web.HTTPBadRequest, "vector must be a list of numbers") from e
    if vector.ndim != 1 or not np.all(np.isfinite(vector)) or np.abs(vector).max(initial=0) > FLOAT32_MAX:
        raise error(web.HTTPBadRequest, "vector must be a flat list of finite float32 numbers")
    vector = vector.astype(np.float32)
    args = (vector, query.k, query.collections, query.category, query.accept())
    try:
        if node.vector_search_s * 1000 < node.settings.api.inline_search_ms:
            hits = node.search_vector(*args)
        else:
            hits = await asyncio.get_running_loop().run_in_executor(node.executor, node.search_vector, *args)
    except ValueError as e:
        raise error(web.HTTPBadRequest, str(e)) from e
    return json_body({"hits": [hit_json(h) for h in hits]})


def _collection(request: web.Request) -> str:
    collection = request.query.get("collection", "products")
    if collection not in COLLECTIONS:
        raise error(web.HTTPBadRequest, f"collection must be products or posts, got {collection!r}")
    return collection


async def item(request: web.Request) -> web.Response:
    node = request.app[NODE]
    collection, record_id = _collection(request), request.match_info["id"]
    metas = node.active.shards.record(collection, record_id)
    if metas is None:
        raise error(web.HTTPNotFound, f"no {collection} record with id {record_id!r}")
    first = metas[0] if metas else None
    return web.json_response(
        {
            "id": record_id,
            "collection": collection,
            "ts": first.ts if first else None,
            "attrs": first.attrs if first else {},
            "items": [
                {"item": m.item, "category": m.category, "label": m.label, "score": m.score, "box": list(m.box)}
                for m in metas
            ],
            "thumbnail": f"/items/{record_id}/thumbnail?collection={collection}",
        }
    )


async def recent(request: web.Request) -> web.Response:
    """Recently indexed records, newest first (``limit`` 1-200, default 24)."""
    node = request.app[NODE]
    limit = _number(dict(request.query), "limit", int, 24, 1, 200)
    records = node.active.shards.recent(limit)
    return web.json_response(
        {
            "records": [
                {
                    "id": items[0].record_id,
                    "collection": items[0].collection,
                    "category": items[0].category,
                    "ts": items[0].ts,
                    "attrs": items[0].attrs,
                    "thumbnail": f"/items/{items[0].record_id}/thumbnail?collection={items[0].collection}",
                }
                for items in records
            ]
        }
    )


async def thumbnail(request: web.Request) -> web.Response:
    node = request.app[NODE]
    collection, record_id = _collection(request), request.match_info["id"]
    jpeg = node.thumbnails.get(collection, record_id)
    if jpeg is None or node.active.shards.record(collection, record_id) is None:
        raise error(web.HTTPNotFound, f"no thumbnail for {collection} record {record_id!r}")
    return web.Response(body=jpeg, content_type="image/jpeg", headers={"Cache-Control": "max-age=60"})
