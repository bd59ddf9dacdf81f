"""Distinct synthetic product photos for tests: seeded shapes on a coloured background."""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw

#: Headers of a raw JPEG request body.
JPEG = {"Content-Type": "image/jpeg"}


def product_image(seed: int, size: tuple[int, int] = (160, 200)) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 7)):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        x1, y1 = x0 + rng.randint(15, 90), y0 + rng.randint(15, 90)
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = rng.choice((draw.rectangle, draw.ellipse))
        shape((x0, y0, x1, y1), fill=colour)
    return image


def encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_catalog(root, count: int, categories=("top", "bottom", "shoes", "bag", "dress")) -> dict[str, str]:
    """Write ``root/<category>/p<i>.jpg`` files; return product id -> category."""
    products = {}
    for i in range(count):
        category = categories[i % len(categories)]
        folder = root / category
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"p{i:03d}.jpg").write_bytes(encoded(product_image(i)))
        products[f"p{i:03d}"] = category
    return products
