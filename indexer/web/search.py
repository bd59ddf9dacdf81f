"""``POST /search`` (an image) and ``POST /search/vector`` (an embedding).

The handlers check the request, take the active generation once, and hand the
work to indexer/search.py in the app's search workers (indexer/web/workers.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from indexer import search as query_flow
from indexer.images import InvalidImage
from indexer.store.shards import Hit
from indexer.web.errors import error, json_body
from indexer.web.keys import METRICS, NODE, WORKERS
from indexer.web.params import SearchParams

FLOAT32_MAX = float(np.finfo(np.float32).max)


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


async def search(request: web.Request) -> web.Response:
    """Per detected item its box, category, score and hits; and hits for the whole image."""
    node = request.app[NODE]
    params = SearchParams.parse(request.query, node.settings.api, node.settings.shards)
    photo = request.query.get("photo", "product")
    if photo not in query_flow.PHOTO_KINDS:
        raise error(web.HTTPBadRequest, f"photo must be product or street, got {photo!r}")
    data = await _read_image(request)
    generation = node.active  # one generation for the whole query, even across a flip
    try:
        result = await request.app[WORKERS].run(
            query_flow.search_image,
            generation.pipeline,
            generation.shards,
            node.settings.images,
            data,
            params.k,
            params.where,
            photo,
        )
    except InvalidImage as e:
        raise error(web.HTTPBadRequest, str(e)) from e
    request.app[METRICS].observe_query(result.timings_ms)
    item_hits = [[hit_json(h) for h in item.hits] for item in result.items]
    return json_body(
        image_answer(
            params, result.size, result.items, item_hits, [hit_json(h) for h in result.hits], result.timings_ms
        )
    )


def image_answer(
    params: SearchParams,
    size: tuple[int, int],
    items: list[Any],
    item_hits: list[list[dict[str, Any]]],
    hits: list[dict[str, Any]],
    timings_ms: dict[str, float],
) -> dict[str, Any]:
    """The body of ``POST /search``: per detected item (box, label, category, score) its hits, and the image's.

    A node and a router (indexer/web/router.py) answer with it alike.
    """
    width, height = size
    return {
        "collections": list(params.collections),
        "image": {"width": width, "height": height},
        "items": [
            {"box": list(item.box), "label": item.label, "category": item.category, "score": item.score, "hits": found}
            for item, found in zip(items, item_hits, strict=True)
        ],
        "hits": hits,
        **facets_json(hits, params),
        "timings_ms": timings_ms,
    }


def facets_json(hits: list[dict[str, Any]], params: SearchParams) -> dict[str, Any]:
    """``{"facets": {attribute: {value: count}}}`` over these hits (as answered) when asked for, else nothing."""
    return {"facets": query_flow.facets((h["attrs"] for h in hits), params.facets)} if params.facets else {}


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
    params = SearchParams.parse(body, node.settings.api, node.settings.shards)
    try:
        vector = np.asarray(body["vector"], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise error(web.HTTPBadRequest, "vector must be a list of numbers") from e
    if vector.ndim != 1 or not np.all(np.isfinite(vector)) or np.abs(vector).max(initial=0) > FLOAT32_MAX:
        raise error(web.HTTPBadRequest, "vector must be a flat list of finite float32 numbers")
    generation = node.active
    if body.get("generation") is not None:  # a router asks for the generation it merges (indexer/web/router.py)
        generation = node.answering(str(body["generation"]))
        if generation is None:
            raise error(web.HTTPConflict, f"generation {body['generation']!r} is not answered here")
    shards = generation.shards
    try:
        hits = await request.app[WORKERS].run_search(
            query_flow.search_vector, shards, vector.astype(np.float32), params.k, params.where
        )
    except ValueError as e:
        raise error(web.HTTPBadRequest, str(e)) from e
    found = [hit_json(h) for h in hits]
    return json_body({"hits": found, **facets_json(found, params)})


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
