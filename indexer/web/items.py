"""Records by id: ``GET /items/{id}``, its thumbnail, more like it, and ``GET /recent``."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from aiohttp import web
from multidict import MultiDict

from indexer import search as query_flow
from indexer.web.errors import error, json_body
from indexer.web.keys import NODE, WORKERS
from indexer.web.params import SearchParams, collection, number
from indexer.web.search import facets_json, hit_json


def thumbnail_url(collection_name: str, record_id: str) -> str:
    """Where a record's thumbnail is served; any id is safe in it (quoted)."""
    return f"/items/{quote(record_id, safe='')}/thumbnail?{urlencode({'collection': collection_name})}"


async def item(request: web.Request) -> web.Response:
    node = request.app[NODE]
    name, record_id = collection(request), request.match_info["id"]
    generation = node.active
    if request.query.get("generation"):  # a router's "more like this" names the generation it searches
        generation = node.answering(request.query["generation"])
        if generation is None:
            raise error(web.HTTPConflict, f"generation {request.query['generation']!r} is not answered here")
    shards = generation.shards
    metas = shards.record(name, record_id)
    if metas is None:
        raise error(web.HTTPNotFound, f"no {name} record with id {record_id!r}")
    first = metas[0] if metas else None
    items = [
        {"item": m.item, "category": m.category, "label": m.label, "score": m.score, "box": list(m.box)} for m in metas
    ]
    if request.query.get("vectors") in ("1", "true"):  # a router's "more like this" (indexer/web/router.py)
        stored = shards.record_vectors(name, record_id) or []
        vectors = {meta.item: vector for meta, vector in stored}
        for entry in items:
            vector = vectors.get(entry["item"])
            entry["vector"] = None if vector is None else [float(x) for x in vector]
    return web.json_response(
        {
            "id": record_id,
            "collection": name,
            "ts": first.ts if first else None,
            "attrs": first.attrs if first else {},
            "items": items,
            "thumbnail": thumbnail_url(name, record_id),
        }
    )


async def similar(request: web.Request) -> web.Response:
    """More like this: records near one of this record's stored items, without uploading an image."""
    node = request.app[NODE]
    name, record_id = collection(request), request.match_info["id"]
    params = MultiDict(request.query)
    params["collection"] = params.pop("within", name)
    search = SearchParams.parse(params, node.settings.api, node.settings.shards)
    item = number(params, "item", int, None, 0, 10_000)
    try:
        hits = await request.app[WORKERS].run_search(
            query_flow.similar, node.active.shards, name, record_id, item, search.k, search.where
        )
    except query_flow.NotIndexed as e:
        raise error(web.HTTPNotFound, str(e)) from e
    found = [hit_json(h) for h in hits]
    return json_body({"hits": found, **facets_json(found, search)})


async def recent(request: web.Request) -> web.Response:
    """Recently indexed records, newest first (``limit`` 1-200, default 24)."""
    node = request.app[NODE]
    limit = number(dict(request.query), "limit", int, 24, 1, 200)
    return web.json_response(
        {
            "records": [
                {
                    "id": first.record_id,
                    "collection": first.collection,
                    "category": first.category,
                    "ts": first.ts,
                    "attrs": first.attrs,
                    "thumbnail": thumbnail_url(first.collection, first.record_id),
                }
                for first, *_ in node.active.shards.recent(limit)
            ]
        }
    )


async def thumbnail(request: web.Request) -> web.Response:
    node = request.app[NODE]
    name, record_id = collection(request), request.match_info["id"]
    jpeg = node.thumbnails.get(name, record_id)
    if jpeg is None or node.active.shards.record(name, record_id) is None:
        raise error(web.HTTPNotFound, f"no thumbnail for {name} record {record_id!r}")
    return web.Response(body=jpeg, content_type="image/jpeg", headers={"Cache-Control": "max-age=60"})
