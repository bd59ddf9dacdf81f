"""Search parameters from a query string or a JSON body, checked into a :class:`~indexer.search.Where`.

A bad parameter is a 400 that names it and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from indexer.config import ApiSettings
from indexer.events import COLLECTIONS
from indexer.search import Accept, Where
from indexer.store.segments import ItemMeta
from indexer.web.errors import error


@dataclass(frozen=True)
class SearchParams:
    """What to search and how: shared by the image and the vector route."""

    k: int
    collections: tuple[str, ...]
    category: str | None
    brand: str | None
    price_min: float | None
    price_max: float | None

    @property
    def where(self) -> Where:
        return Where(self.collections, self.category, self.accept())

    def accept(self) -> Accept | None:
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
    def parse(cls, params: dict[str, Any], api: ApiSettings) -> SearchParams:
        k = number(params, "k", int, api.default_k, 1, api.max_k)
        collection = params.get("collection", "products")
        if collection not in (*COLLECTIONS, "both"):
            raise error(web.HTTPBadRequest, f"collection must be products, posts or both, got {collection!r}")
        collections = COLLECTIONS if collection == "both" else (collection,)
        category = params.get("category") or None
        brand = params.get("brand") or None
        for name, value in (("category", category), ("brand", brand)):
            if value is not None and not isinstance(value, str):
                raise error(web.HTTPBadRequest, f"{name} must be a string")
        price_min = number(params, "price_min", float, None, 0, math.inf)
        price_max = number(params, "price_max", float, None, 0, math.inf)
        if price_min is not None and price_max is not None and price_min > price_max:
            raise error(web.HTTPBadRequest, "price_min must not be above price_max")
        return cls(k, collections, category, brand, price_min, price_max)


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
