"""A street-to-shop set: generated garments as catalog thumbnails, and street posts that wear them.

No garment photos ship offline, so the garments are drawn: a top, a bottom or
a bag, each a silhouette with its own shape parameters, base colour, pattern
(solid, stripes, checks, dots, colour block) and print. Thousands of them are
distinct, and neighbours differ in details as real catalog items do.

A post is a street scene (gradient and clutter) with an outfit of 1-3 of them
at their places on a figure: the top in the upper region, the bottom in the
lower region, a bag at the side (:data:`REGIONS`). Each garment is shown under
scale, rotation, a perspective warp, lighting (brightness, contrast, a colour
cast, a shade across the scene), occlusion (an arm or a passing object) and
JPEG compression. The post names what it shows in ``attrs.products``, as a
social feed that tags products does; those tags are what the pair miner learns
from (indexer/training/pairs.py).

Layout under ``DIR`` (the catalog folder as ``lookstream produce products`` reads it)::

    DIR/<split>/catalog/<category>/<product_id>.jpg
    DIR/<split>/posts/<post_id>.jpg
    DIR/<split>/posts/<post_id>.json     {"products": [...]}: `lookstream produce posts` puts it in attrs
    DIR/<split>/posts.jsonl      {"id": ..., "image": "posts/x.jpg", "products": [...], "boxes": {id: [x0, y0, x1, y1]}}

The ``train`` and ``heldout`` splits hold disjoint products: figures on the
held-out split measure products the encoder never saw in training.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from indexer.events import Event

#: The categories drawn, and where on a post's figure each is worn (fractions of width, height).
REGIONS: dict[str, tuple[float, float, float, float]] = {
    "top": (0.05, 0.04, 0.72, 0.52),
    "bottom": (0.05, 0.50, 0.72, 0.98),
    "bag": (0.68, 0.28, 1.0, 0.76),
}
GARMENTS = tuple(REGIONS)
POST_SIZE = (384, 512)
THUMBNAIL_SIDE = 256
PATTERNS = ("solid", "stripes", "checks", "dots", "block")


@dataclass(frozen=True)
class Garment:
    """Everything that makes one product look as it does; :func:`render` draws it."""

    id: str
    category: str
    seed: int


def _colour(rng: random.Random) -> tuple[int, int, int]:
    import colorsys

    h, s, v = rng.random(), rng.uniform(0.25, 1.0), rng.uniform(0.25, 0.95)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _silhouette(category: str, size: int, rng: random.Random) -> Image.Image:
    """The garment's mask ("L", 255 inside) on a square canvas of ``size``."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    s = size
    if category == "top":
        body_w, sleeve = rng.uniform(0.42, 0.6), rng.uniform(0.12, 0.34)
        length, neck = rng.uniform(0.6, 0.82), rng.uniform(0.06, 0.14)
        x0, x1 = (0.5 - body_w / 2) * s, (0.5 + body_w / 2) * s
        y0, y1 = 0.12 * s, (0.12 + length) * s
        draw.rectangle((x0, y0, x1, y1), fill=255)
        drop = rng.uniform(0.2, 0.5) * length * s
        draw.polygon(
            [(x0, y0), (x0 - sleeve * s, y0 + drop), (x0 - sleeve * s * 0.6, y0 + drop * 1.25), (x0, y0 + drop * 0.8)],
            fill=255,
        )
        draw.polygon(
            [(x1, y0), (x1 + sleeve * s, y0 + drop), (x1 + sleeve * s * 0.6, y0 + drop * 1.25), (x1, y0 + drop * 0.8)],
            fill=255,
        )
        draw.ellipse((0.5 * s - neck * s, y0 - neck * s * 0.6, 0.5 * s + neck * s, y0 + neck * s), fill=0)
    elif category == "bottom":
        top_w, length = rng.uniform(0.4, 0.56), rng.uniform(0.55, 0.85)
        x0, x1, y0, y1 = (0.5 - top_w / 2) * s, (0.5 + top_w / 2) * s, 0.08 * s, (0.08 + length) * s
        if rng.random() < 0.4:  # a skirt
            flare = rng.uniform(0.0, 0.18) * s
            draw.polygon([(x0, y0), (x1, y0), (x1 + flare, y1), (x0 - flare, y1)], fill=255)
        else:  # trousers
            gap, flare = rng.uniform(0.02, 0.06) * s, rng.uniform(-0.04, 0.08) * s
            mid = 0.5 * s
            draw.rectangle((x0, y0, x1, y0 + 0.18 * s), fill=255)
            draw.polygon([(x0, y0), (mid - gap / 2, y0 + 0.18 * s), (mid - gap, y1), (x0 - flare, y1)], fill=255)
            draw.polygon([(x1, y0), (mid + gap / 2, y0 + 0.18 * s), (mid + gap, y1), (x1 + flare, y1)], fill=255)
    else:  # bag
        w, h = rng.uniform(0.45, 0.75), rng.uniform(0.35, 0.55)
        x0, x1, y0, y1 = (0.5 - w / 2) * s, (0.5 + w / 2) * s, 0.92 * s - h * s, 0.92 * s
        draw.rounded_rectangle((x0, y0, x1, y1), radius=rng.uniform(0.01, 0.12) * s, fill=255)
        handle = rng.uniform(0.12, 0.3) * s
        width = max(2, int(rng.uniform(0.02, 0.05) * s))
        inset = rng.uniform(0.1, 0.3) * (x1 - x0)
        draw.arc((x0 + inset, y0 - handle, x1 - inset, y0 + handle), 180, 360, fill=255, width=width)
    return mask


def _surface(size: int, rng: random.Random) -> Image.Image:
    """The fabric: a base colour with a pattern and a print."""
    base, second = _colour(rng), _colour(rng)
    image = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(image)
    pattern = rng.choice(PATTERNS)
    step = rng.randint(max(6, size // 24), max(8, size // 6))
    if pattern == "stripes":
        width = rng.randint(2, max(3, step // 2))
        angle = rng.choice((0, 90, 45, -45))
        for k in range(-size, 2 * size, step):
            if angle == 0:
                draw.rectangle((0, k, size, k + width), fill=second)
            elif angle == 90:
                draw.rectangle((k, 0, k + width, size), fill=second)
            else:
                sign = 1 if angle == 45 else -1
                draw.line((k, 0, k + sign * size, size), fill=second, width=width)
    elif pattern == "checks":
        for i, x in enumerate(range(0, size, step)):
            for j, y in enumerate(range(0, size, step)):
                if (i + j) % 2:
                    draw.rectangle((x, y, x + step, y + step), fill=second)
    elif pattern == "dots":
        r = rng.randint(2, max(3, step // 3))
        for x in range(step // 2, size, step):
            for y in range(step // 2, size, step):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=second)
    elif pattern == "block":
        cut = rng.uniform(0.3, 0.7) * size
        if rng.random() < 0.5:
            draw.rectangle((0, cut, size, size), fill=second)
        else:
            draw.rectangle((cut, 0, size, size), fill=second)
    if rng.random() < 0.6:  # a print: a few shapes in a third colour near the middle
        third = _colour(rng)
        cx, cy = rng.uniform(0.35, 0.65) * size, rng.uniform(0.35, 0.6) * size
        for _ in range(rng.randint(1, 4)):
            w, h = rng.uniform(0.04, 0.16) * size, rng.uniform(0.04, 0.16) * size
            x, y = cx + rng.uniform(-0.1, 0.1) * size, cy + rng.uniform(-0.1, 0.1) * size
            rng.choice((draw.rectangle, draw.ellipse))((x - w, y - h, x + w, y + h), fill=third)
    return image


def render(garment: Garment, size: int = THUMBNAIL_SIDE) -> Image.Image:
    """The garment as RGBA on a transparent square: the same product every time."""
    rng = random.Random(garment.seed)
    mask = _silhouette(garment.category, size, rng)
    image = _surface(size, rng).convert("RGBA")
    image.putalpha(mask)
    return image


def thumbnail(garment: Garment) -> Image.Image:
    """The catalog photo: the garment on a plain light background."""
    rng = random.Random(garment.seed ^ 0x5EED)
    shade = rng.randint(225, 255)
    canvas = Image.new("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE), (shade, shade, shade))
    drawn = render(garment)
    canvas.paste(drawn, (0, 0), drawn)
    return canvas


def _scene(rng: random.Random) -> Image.Image:
    """A street background: a vertical gradient and clutter (buildings, signs, leaves)."""
    w, h = POST_SIZE
    top, bottom = _colour(rng), _colour(rng)
    scene = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(scene)
    for y in range(h):
        t = y / (h - 1)
        draw.line((0, y, w, y), fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(rng.randint(8, 25)):
        x, y = rng.randrange(w), rng.randrange(h)
        bw, bh = rng.randint(10, 140), rng.randint(10, 140)
        rng.choice((draw.rectangle, draw.ellipse))((x, y, x + bw, y + bh), fill=_colour(rng))
    # a figure: head and limbs in a skin tone, behind the garments
    skin = rng.choice(((224, 172, 140), (198, 134, 66), (141, 85, 36), (241, 194, 160)))
    draw.ellipse((w * 0.28, -h * 0.06, w * 0.48, h * 0.08), fill=skin)
    return scene


def _perspective(image: Image.Image, rng: random.Random, strength: float) -> Image.Image:
    w, h = image.size
    d = [rng.uniform(-strength, strength) * s for s in (w, h, w, h, w, h, w, h)]
    quad = (d[0], d[1], d[2], h + d[3], w + d[4], h + d[5], w + d[6], d[7])
    return image.transform((w, h), Image.Transform.QUAD, quad, Image.Resampling.BILINEAR)


def _wear(scene: Image.Image, garment: Garment, rng: random.Random) -> tuple[int, int, int, int]:
    """Put the garment on the figure in its region, changed as a street photo changes it; return its box."""
    w, h = POST_SIZE
    rx0, ry0, rx1, ry1 = REGIONS[garment.category]
    region_w, region_h = (rx1 - rx0) * w, (ry1 - ry0) * h
    side = int(min(region_w, region_h) * rng.uniform(0.85, 1.2))
    drawn = render(garment, side)
    drawn = _perspective(drawn, rng, 0.12)
    drawn = drawn.rotate(rng.uniform(-18, 18), resample=Image.Resampling.BILINEAR, expand=True)
    rgb, alpha = drawn.convert("RGB"), drawn.getchannel("A")
    rgb = ImageEnhance.Brightness(rgb).enhance(rng.uniform(0.6, 1.3))
    rgb = ImageEnhance.Contrast(rgb).enhance(rng.uniform(0.7, 1.2))
    x = int(rx0 * w + rng.uniform(-0.1, 0.1) * region_w + (region_w - drawn.width) / 2)
    y = int(ry0 * h + rng.uniform(-0.08, 0.08) * region_h + (region_h - drawn.height) / 2)
    scene.paste(rgb, (x, y), alpha)
    return (max(0, x), max(0, y), min(w, x + drawn.width), min(h, y + drawn.height))


def _occlude(scene: Image.Image, box: tuple[int, int, int, int], rng: random.Random) -> None:
    """An arm across the garment, or something passing in front of it: 5-30% of it hidden."""
    draw = ImageDraw.Draw(scene)
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    if rng.random() < 0.5:
        width = int(rng.uniform(0.1, 0.22) * bw)
        ax = x0 + rng.uniform(0.0, 1.0) * bw
        draw.line(
            (ax, y0 + rng.uniform(0, 0.3) * bh, ax + rng.uniform(-0.3, 0.3) * bw, y1), fill=_colour(rng), width=width
        )
    else:
        cw, ch = rng.uniform(0.2, 0.45) * bw, rng.uniform(0.2, 0.45) * bh
        cx, cy = x0 + rng.uniform(0, bw - cw), y0 + rng.uniform(0, bh - ch)
        rng.choice((draw.rectangle, draw.ellipse))((cx, cy, cx + cw, cy + ch), fill=_colour(rng))


def post(garments: list[Garment], seed: int) -> tuple[Image.Image, dict[str, tuple[int, int, int, int]]]:
    """A street photo wearing ``garments`` (distinct categories); return it and each garment's box."""
    rng = random.Random(seed)
    scene = _scene(rng)
    boxes = {}
    for garment in sorted(garments, key=lambda g: GARMENTS.index(g.category)):
        boxes[garment.id] = _wear(scene, garment, rng)
    for box in boxes.values():
        if rng.random() < 0.7:
            _occlude(scene, box, rng)
    # lighting across the scene: a colour cast and a shade from one side
    cast = Image.new("RGB", POST_SIZE, _colour(rng))
    scene = Image.blend(scene, cast, rng.uniform(0.0, 0.18))
    shade = Image.linear_gradient("L").rotate(rng.choice((0, 90, 180, 270))).resize(POST_SIZE)
    dark = ImageEnhance.Brightness(scene).enhance(rng.uniform(0.5, 0.9))
    scene = Image.composite(scene, dark, shade)
    if rng.random() < 0.3:
        scene = scene.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2)))
    buffer = io.BytesIO()
    scene.save(buffer, format="JPEG", quality=rng.randint(45, 90))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), boxes


def garments(count: int, seed: int, prefix: str) -> list[Garment]:
    """``count`` distinct products, categories in turn."""
    rng = random.Random(seed)
    return [Garment(f"{prefix}{i:05d}", GARMENTS[i % len(GARMENTS)], rng.getrandbits(48)) for i in range(count)]


def outfits(products: list[Garment], posts_per_product: float, seed: int) -> Iterator[list[Garment]]:
    """Outfits of 1-3 products of distinct categories, until each product was worn about ``posts_per_product`` times."""
    rng = random.Random(seed)
    by_category = {c: [g for g in products if g.category == c] for c in GARMENTS}
    wanted = round(len(products) * posts_per_product)
    worn = 0
    while worn < wanted:
        categories = rng.sample(GARMENTS, rng.choice((1, 2, 2, 3)))
        outfit = [rng.choice(by_category[c]) for c in categories if by_category[c]]
        worn += len(outfit)
        yield outfit


def write_split(out: Path, products: list[Garment], posts_per_product: float, seed: int, prefix: str) -> Path:
    """Write one split's catalog, posts and posts.jsonl under ``out``."""
    for garment in products:
        folder = out / "catalog" / garment.category
        folder.mkdir(parents=True, exist_ok=True)
        thumbnail(garment).save(folder / f"{garment.id}.jpg", quality=92)
    (out / "posts").mkdir(parents=True, exist_ok=True)
    lines = []
    for n, outfit in enumerate(outfits(products, posts_per_product, seed)):
        post_id = f"{prefix}{n:05d}"
        image, boxes = post(outfit, seed * 1_000_003 + n)
        image.save(out / "posts" / f"{post_id}.jpg", quality=92)
        (out / "posts" / f"{post_id}.json").write_text(json.dumps({"products": [g.id for g in outfit]}))
        lines.append(
            {"id": post_id, "image": f"posts/{post_id}.jpg", "products": [g.id for g in outfit], "boxes": boxes}
        )
    (out / "posts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


def build_street_set(
    out: Path, products: int = 1500, heldout: int = 300, posts_per_product: float = 2.0, seed: int = 0
) -> Path:
    """Write ``out/train`` and ``out/heldout`` (disjoint products), deterministic for a seed; return ``out``."""
    write_split(out / "train", garments(products, seed, "g"), posts_per_product, seed + 1, "s")
    write_split(out / "heldout", garments(heldout, seed + 7919, "h"), posts_per_product, seed + 2, "t")
    return out


def read_posts(split: Path) -> list[dict]:
    return [json.loads(line) for line in (split / "posts.jsonl").read_text().splitlines() if line.strip()]


def split_events(split: Path, ts: int = 1) -> tuple[list[Event], list[Event]]:
    """A split as events: its products (category in attrs) and its posts (naming products in attrs.products)."""
    products = [
        Event("product.upsert", path.stem, ts, image=path.read_bytes(), attrs={"category": path.parent.name})
        for path in sorted((split / "catalog").glob("*/*.jpg"))
    ]
    posts = [
        Event(
            "post.upsert",
            line["id"],
            ts,
            image=(split / line["image"]).read_bytes(),
            attrs={"products": line["products"]},
        )
        for line in read_posts(split)
    ]
    return products, posts
