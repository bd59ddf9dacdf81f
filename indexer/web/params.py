"""Search parameters from a query string or a JSON body, checked into a :class:`~indexer.search.Where`.

A bad parameter is a 400 that names it and the allowed range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from indexer.config import ApiSettings, ShardSettings
from indexer.events import COLLECTIONS
from indexer.search import Where
from indexer.web.errors import error

#: query parameters that are not filters (the routes that take search parameters read them)
NOT_FILTERS = frozenset({"k", "collection", "category", "photo", "facets", "within", "item", "vector", "generation"})


@dataclass(frozen=True)
class SearchParams:
    """What to search and how: shared by the image, the vector and the more-like-this route."""

    k: int
    where: Where
    #: keyword attributes to count the values of over the hits (``facets=brand,colour``)
    facets: tuple[str, ...] = ()

    @property
    def collections(self) -> tuple[str, ...]:
        return self.where.collections

    @classmethod
    def parse(cls, params: Mapping[str, Any], api: ApiSettings, shards: ShardSettings) -> SearchParams:
        """Check the parameters; filters name indexed attributes (``shards.keyword_attributes`` / ``numeric_...``).

        A keyword attribute takes one value or several (``brand=a&brand=b`` in a
        query string, a list in JSON): any of them matches. A numeric one takes
        ``<name>_min`` and/or ``<name>_max``. Any other name is a 400 that lists
        the indexed attributes, rather than a filter silently ignored.
        """
        k = number(params, "k", int, api.default_k, 1, api.max_k)
        collection = params.get("collection", "products")
        if collection not in (*COLLECTIONS, "both"):
            raise error(web.HTTPBadRequest, f"collection must be products, posts or both, got {collection!r}")
        collections = COLLECTIONS if collection == "both" else (collection,)
        category = params.get("category") or None
        if category is not None and not isinstance(category, str):
            raise error(web.HTTPBadRequest, "category must be a string")
        keyword: dict[str, tuple[Any, ...]] = {}
        ranges: dict[str, tuple[float, float]] = {}
        bounds = {f"{name}_{end}": (name, end) for name in shards.numeric_attributes for end in ("min", "max")}
        for name in params:
            if name in NOT_FILTERS:
                continue
            if name in shards.keyword_attributes:
                keyword[name] = _values(params, name)
            elif name in bounds:
                attribute, end = bounds[name]
                value = number(params, name, float, None, -math.inf, math.inf)
                if value is None:  # null in JSON: no bound
                    continue
                low, high = ranges.get(attribute, (-math.inf, math.inf))
                ranges[attribute] = (value, high) if end == "min" else (low, value)
            else:
                indexed = [*shards.keyword_attributes, *bounds]
                raise error(
                    web.HTTPBadRequest,
                    f"{name!r} is not a search parameter nor an indexed attribute; filters: {', '.join(indexed)}",
                )
        for attribute, (low, high) in ranges.items():
            if low > high:
                raise error(web.HTTPBadRequest, f"{attribute}_min must not be above {attribute}_max")
        facets = _facets(params.get("facets"), shards)
        return cls(k, Where(collections, category, keyword, ranges), facets)

    def as_json(self) -> dict[str, Any]:
        """The parameters as a ``/search/vector`` body takes them (a router passes them on to replicas)."""
        where = self.where
        body: dict[str, Any] = {
            "k": self.k,
            "collection": "both" if len(where.collections) > 1 else where.collections[0],
        }
        if where.category is not None:
            body["category"] = where.category
        body.update({name: list(values) for name, values in where.keyword.items()})
        for name, (low, high) in where.ranges.items():
            body.update({f"{name}_{end}": v for end, v in (("min", low), ("max", high)) if math.isfinite(v)})
        return body


def _values(params: Mapping[str, Any], name: str) -> tuple[Any, ...]:
    """A keyword filter's values: repeated in a query string, a string or a list of them in JSON."""
    raw = params.getall(name) if isinstance(params, MultiMapping) else params[name]
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(isinstance(v, str | int | float | bool) for v in values) or len(values) > 100:
        raise error(web.HTTPBadRequest, f"{name} must be a value or a list of 1-100 values")
    return tuple(values)  # matched as indexed: indexer/store/columns.py keyword_value


def _facets(raw: Any, shards: ShardSettings) -> tuple[str, ...]:
    if raw is None or raw == "":
        return ()
    names = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise error(web.HTTPBadRequest, "facets must be a comma-separated list of keyword attributes")
    unknown = [n for n in names if n not in shards.keyword_attributes]
    if unknown:
        raise error(
            web.HTTPBadRequest,
            f"facets {unknown} are not keyword attributes; indexed: {', '.join(shards.keyword_attributes)}",
        )
    return tuple(dict.fromkeys(names))


def number(params: dict[str, Any], name: str, kind: type, default, low: float, high: float):
    """``params[name]`` as an int or a float within [low, high], ``default`` when absent."""
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


def collection(request: web.Request) -> str:
    """The one collection a record route names (``?collection=``, products by default)."""
    name = request.query.get("collection", "products")
    if name not in COLLECTIONS:
        raise error(web.HTTPBadRequest, f"collection must be products or posts, got {name!r}")
    return name
