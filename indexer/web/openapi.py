"""The OpenAPI 3.1 document of the HTTP API, served at ``/openapi.json``.

Written by hand next to the routes it describes; tests/unit/test_openapi.py
keeps it true (every route listed, every answer the tests get valid against it).
"""

from __future__ import annotations

from typing import Any

from indexer.config import Settings

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Schema]:
    text = {
        400: "bad parameters or image",
        401: "no or wrong bearer token",
        403: "admin routes are disabled",
        404: "not found",
        409: "not possible now",
        413: "request too large",
        415: "unsupported content type",
        503: "not ready",
    }
    return {str(code): _json(_ref("Error"), text[code]) for code in codes}


_KEYWORD: Schema = {"type": ["string", "number", "boolean"]}


def _filter_params(settings: Settings) -> list[Schema]:
    """A query parameter per indexed attribute (``shards.keyword_attributes`` / ``numeric_attributes``)."""
    keyword = [
        {
            "name": name,
            "in": "query",
            "schema": {"type": "array", "items": {"type": "string"}},
            "style": "form",
            "explode": True,
            "description": (
                f"attrs.{name} is one of these values, or a list holding one (case-folded; true/false for booleans)"
            ),
        }
        for name in settings.shards.keyword_attributes
    ]
    numeric = [
        {
            "name": f"{name}_{end}",
            "in": "query",
            "schema": {"type": "number"},
            "description": f"attrs.{name} {'at least' if end == 'min' else 'at most'} this",
        }
        for name in settings.shards.numeric_attributes
        for end in ("min", "max")
    ]
    return keyword + numeric


def document(settings: Settings) -> Schema:
    api = settings.api
    box = {
        "type": "array",
        "items": {"type": "integer"},
        "minItems": 4,
        "maxItems": 4,
        "description": "x0, y0, x1, y1 in pixels of the record's (or query's) image",
    }
    query_params = [
        {
            "name": "k",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": api.max_k, "default": api.default_k},
        },
        {
            "name": "collection",
            "in": "query",
            "schema": {"type": "string", "enum": ["products", "posts", "both"], "default": "products"},
        },
        {"name": "category", "in": "query", "schema": {"type": "string"}},
        *_filter_params(settings),
        {
            "name": "facets",
            "in": "query",
            "schema": {"type": "string"},
            "description": "comma-separated keyword attributes: counts of their values over the hits",
        },
    ]
    collection_param = {
        "name": "collection",
        "in": "query",
        "schema": {"type": "string", "enum": ["products", "posts"], "default": "products"},
    }
    id_param = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    routed: dict[str, Schema] = {
        "generation": {"type": "string", "description": "through a router: the model generation that answered"},
        "missing_partitions": {
            "type": "array",
            "items": {"type": "integer"},
            "description": "through a router: records-topic partitions no replica answered for (their hits are absent)",
        },
        "partitions_total": {"type": ["integer", "null"]},
    }
    schemas: dict[str, Schema] = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Hit": {
            "type": "object",
            "required": ["id", "score", "collection", "category", "item", "box", "attrs"],
            "properties": {
                "id": {"type": "string"},
                "score": {"type": "number"},
                "collection": {"type": "string", "enum": ["products", "posts"]},
                "category": {"type": "string"},
                "item": {"type": "integer", "description": "which item of the record matched"},
                "box": box,
                "attrs": {"type": "object"},
            },
        },
        "SearchResponse": {
            "type": "object",
            "required": ["collections", "image", "items", "hits", "timings_ms"],
            "properties": {
                "collections": {"type": "array", "items": {"type": "string"}},
                "image": {
                    "type": "object",
                    "required": ["width", "height"],
                    "properties": {"width": {"type": "integer"}, "height": {"type": "integer"}},
                },
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["box", "label", "category", "score", "hits"],
                        "properties": {
                            "box": box,
                            "label": {"type": ["string", "null"]},
                            "category": {"type": "string"},
                            "score": {"type": "number"},
                            "hits": {"type": "array", "items": _ref("Hit")},
                        },
                    },
                },
                "hits": {"type": "array", "items": _ref("Hit"), "description": "for the whole image"},
                "facets": _ref("Facets"),
                "timings_ms": {
                    "type": "object",
                    "required": ["decode", "detect", "encode", "search", "total"],
                    "additionalProperties": {"type": "number"},
                },
                **routed,
            },
        },
        "VectorSearchRequest": {
            "type": "object",
            "required": ["vector"],
            "properties": {
                "vector": {"type": "array", "items": {"type": "number"}, "minItems": 1},
                "k": {"type": "integer", "minimum": 1, "maximum": api.max_k},
                "collection": {"type": "string", "enum": ["products", "posts", "both"]},
                "category": {"type": "string"},
                **{
                    name: {"oneOf": [_KEYWORD, {"type": "array", "items": _KEYWORD, "minItems": 1, "maxItems": 100}]}
                    for name in settings.shards.keyword_attributes
                },
                **{
                    f"{name}_{end}": {"type": "number"}
                    for name in settings.shards.numeric_attributes
                    for end in ("min", "max")
                },
                "facets": {
                    "type": "array",
                    "items": {"type": "string", "enum": list(settings.shards.keyword_attributes)},
                },
                "generation": {
                    "type": "string",
                    "description": "answer from this model generation or not at all (409); routers send it",
                },
            },
        },
        "RecentList": {
            "type": "object",
            "required": ["records"],
            "properties": {
                "records": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "collection", "category", "ts", "attrs", "thumbnail"],
                    },
                }
            },
        },
        "Facets": {
            "type": "object",
            "description": "with facets=...: per keyword attribute, how many of the hits have each value",
            "additionalProperties": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
        "HitList": {
            "type": "object",
            "required": ["hits"],
            "properties": {"hits": {"type": "array", "items": _ref("Hit")}, "facets": _ref("Facets"), **routed},
        },
        "Item": {
            "type": "object",
            "required": ["id", "collection", "ts", "attrs", "items", "thumbnail"],
            "properties": {
                "id": {"type": "string"},
                "collection": {"type": "string"},
                "ts": {"type": ["integer", "null"]},
                "attrs": {"type": "object"},
                "thumbnail": {"type": "string"},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["item", "category", "label", "score", "box"],
                        "properties": {
                            "item": {"type": "integer"},
                            "category": {"type": "string"},
                            "label": {"type": ["string", "null"]},
                            "score": {"type": "number"},
                            "box": box,
                        },
                    },
                },
            },
        },
        "Stats": {"type": "object", "required": ["models", "backend", "records", "shards", "ingest", "generations"]},
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
        "Ready": {
            "type": "object",
            "required": ["ready", "reasons"],
            "properties": {
                "ready": {"type": "boolean"},
                "reasons": {"type": "array", "items": {"type": "string"}},
                "generation": {"type": "string", "description": "the generation this node answers from"},
                "retiring": {"type": ["string", "null"], "description": "a serve replica's previous generation"},
                "partitions": {"type": "array", "items": {"type": "integer"}, "description": "a replica's partitions"},
                "total_partitions": {"type": ["integer", "null"]},
            },
        },
    }
    image_body = {
        "required": True,
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
    paths = {
        "/search": {
            "post": {
                "summary": "Search with a photo: hits per detected garment and for the whole image",
                "parameters": [
                    *query_params,
                    {
                        "name": "photo",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["product", "street"], "default": "product"},
                        "description": "what the photo is: detected with the products' or the posts' detector",
                    },
                ],
                "requestBody": image_body,
                "responses": {"200": _json(_ref("SearchResponse"), "results"), **_errors(400, 413, 415)},
            }
        },
        "/search/vector": {
            "post": {
                "summary": "Search with an embedding of the active encoder",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("VectorSearchRequest")}},
                },
                "responses": {"200": _json(_ref("HitList"), "results"), **_errors(400, 409, 413, 415)},
            }
        },
        "/items/{id}": {
            "get": {
                "summary": "One indexed record: attrs and items",
                "parameters": [
                    id_param,
                    collection_param,
                    {
                        "name": "vectors",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["0", "1", "false", "true"]},
                        "description": "also each item's stored vector (a router's more-like-this)",
                    },
                    {
                        "name": "generation",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "answer from this model generation or not at all (409); routers send it",
                    },
                ],
                "responses": {"200": _json(_ref("Item"), "the record"), **_errors(400, 404, 409)},
            }
        },
        "/items/{id}/similar": {
            "get": {
                "summary": "More like this: records near one of this record's stored items, the record itself left out",
                "parameters": [
                    id_param,
                    collection_param,
                    {
                        "name": "item",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0},
                        "description": "which item of the record; default: its best-scoring one",
                    },
                    {
                        "name": "within",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["products", "posts", "both"]},
                        "description": "where to look; default: the record's own collection",
                    },
                    *(p for p in query_params if p["name"] != "collection"),
                ],
                "responses": {"200": _json(_ref("HitList"), "results"), **_errors(400, 404)},
            }
        },
        "/items/{id}/thumbnail": {
            "get": {
                "summary": "The small JPEG kept at index time",
                "parameters": [id_param, collection_param],
                "responses": {
                    "200": {
                        "description": "JPEG",
                        "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    **_errors(400, 404),
                },
            }
        },
        "/recent": {
            "get": {
                "summary": "Recently indexed records, newest first",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 24},
                    }
                ],
                "responses": {"200": _json(_ref("RecentList"), "records"), **_errors(400)},
            }
        },
        "/": {
            "get": {
                "summary": "The search page",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
            }
        },
        "/admin/snapshot": {
            "post": {
                "summary": "Write a checkpoint now",
                "security": [{"admin": []}],
                "responses": {
                    "200": _json({"type": "object", "required": ["checkpoint", "seq", "offsets"]}, "written"),
                    **_errors(401, 403, 409),
                },
            }
        },
        "/admin/rebuild": {
            "post": {
                "summary": "Rebuild every shard in the background",
                "security": [{"admin": []}],
                "responses": {
                    "202": _json({"type": "object", "required": ["scheduled"]}, "scheduled"),
                    **_errors(401, 403),
                },
            }
        },
        "/admin/swap": {
            "post": {
                "summary": "Start a model generation; it takes over once caught up",
                "security": [{"admin": []}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {
                    "200": _json({"type": "object"}, "already active or building"),
                    "202": _json({"type": "object", "required": ["generation", "state"]}, "started"),
                    **_errors(400, 401, 403),
                },
            }
        },
        "/stats": {
            "get": {
                "summary": "Shards, generations, ingest counters and offsets",
                "responses": {"200": _json(_ref("Stats"), "statistics")},
            }
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json(_ref("Health"), "alive")}}},
        "/readyz": {
            "get": {
                "summary": "Readiness: partitions assigned and lag under the threshold",
                "responses": {"200": _json(_ref("Ready"), "ready"), "503": _json(_ref("Ready"), "not ready")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")}}
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "lookstream", "version": "1", "description": "Visual search over live fashion indexes."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}}},
    }
