"""Read a catalog or posts folder into events, naming every file that is skipped and why.

Products: ``PATH/<category>/<product_id>.<jpg|png|webp>``, or
``PATH/<category>/<product_id>/<image>`` where the first image by name is the
product's thumbnail (one event carries one image; the others are reported as
skipped). Posts: ``PATH/<post_id>.<ext>``, with optional attributes in
``PATH/<post_id>.json`` (a JSON object merged into ``attrs``, e.g.
``{"products": ["p1", "p2"]}`` for the products the post shows).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from indexer.events import Event, now_ms
from indexer.images import InvalidImage, decode_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _read_checked(path: Path, max_bytes: int, max_pixels: int) -> bytes | Skipped:
    """The file's bytes if a consumer would accept them, else why not."""
    data = path.read_bytes()
    if len(data) > max_bytes:
        return Skipped(path, f"larger than the {max_bytes} byte message limit")
    try:
        decode_image(data, max_pixels)
    except InvalidImage as e:
        return Skipped(path, str(e))
    return data


def product_events(root: Path, max_bytes: int, max_pixels: int) -> Iterator[Event | Skipped]:
    for category_dir in sorted(root.iterdir()):
        if not category_dir.is_dir():
            yield Skipped(category_dir, "not inside a category folder")
            continue
        for entry in sorted(category_dir.iterdir()):
            if entry.is_dir():
                images = sorted(p for p in entry.iterdir() if p.is_file() and _is_image_name(p))
                for extra in images[1:]:
                    yield Skipped(extra, "not the product's first image; one image per product is published")
                if not images:
                    yield Skipped(entry, "product folder holds no image")
                    continue
                path, product_id = images[0], entry.name
            elif _is_image_name(entry):
                path, product_id = entry, entry.stem
            else:
                yield Skipped(entry, "not a .jpg, .jpeg, .png or .webp file")
                continue
            data = _read_checked(path, max_bytes, max_pixels)
            if isinstance(data, Skipped):
                yield data
                continue
            yield Event(
                "product.upsert",
                product_id,
                now_ms(),
                image=data,
                attrs={"category": category_dir.name, "source": path.name},
            )


def _sidecar(image: Path) -> dict | Skipped:
    """The attributes in ``<post_id>.json`` beside a post's image, if there is one."""
    path = image.with_suffix(".json")
    if not path.exists():
        return {}
    try:
        attrs = json.loads(path.read_text())
    except ValueError as e:
        return Skipped(path, f"not JSON: {e}")
    return attrs if isinstance(attrs, dict) else Skipped(path, "not a JSON object")


def post_events(root: Path, max_bytes: int, max_pixels: int) -> Iterator[Event | Skipped]:
    for entry in sorted(root.iterdir()):
        if entry.is_file() and entry.suffix.lower() == ".json":
            continue  # a post's attributes, read with its image
        if not (entry.is_file() and _is_image_name(entry)):
            yield Skipped(entry, "not a .jpg, .jpeg, .png or .webp file")
            continue
        data = _read_checked(entry, max_bytes, max_pixels)
        attrs = _sidecar(entry)
        if isinstance(data, Skipped) or isinstance(attrs, Skipped):
            yield data if isinstance(data, Skipped) else attrs
            continue
        yield Event("post.upsert", entry.stem, now_ms(), image=data, attrs={"source": entry.name, **attrs})
