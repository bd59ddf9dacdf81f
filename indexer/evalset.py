"""A labelled evaluation set built only from photos that exist offline (scikit-image's data).

Layout on disk, the same that ``lookstream evaluate --set DIR`` reads::

    DIR/gallery/<category>/<product_id>.jpg     the catalog, as `produce products` reads it
    DIR/queries/<query>.jpg
    DIR/queries.jsonl                           {"image": "queries/q.jpg", "relevant": ["id", ...], "kind": "flip",
                                                 "photo": "product"}

``photo`` (optional, "product" where left out) is what the query is searched
as (the ``photo`` of ``GET /search``): the 'street' composites are "street".

The products are crops of real photos (several per photo, so neighbours are
genuinely alike); each is queried with a flip, a colour jitter, a scale jitter,
a low-quality JPEG, and a 'street' composite that pastes it small onto another
photo. It measures re-finding a product under photographic change, not fashion
similarity: no garment photos ship offline (docs/models.md says so).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from plugins.models import CATEGORIES

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "rocket",
    "retina",
    "stereo_motorcycle",
    "camera",
    "coins",
    "moon",
    "clock",
    "brick",
    "grass",
    "gravel",
)
QUERY_KINDS = ("flip", "colour", "scale", "jpeg", "street")


def _photo(name: str) -> Image.Image:
    from skimage import data

    array = getattr(data, name)()
    if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
        array = array[0]
    return Image.fromarray(np.asarray(array)).convert("RGB")


def _crops(photo: Image.Image, count: int, rng: random.Random) -> list[Image.Image]:
    """Overlap-free crops, each 35-50% of the photo's side, thumbnail-sized."""
    w, h = photo.size
    cols = 2
    rows = (count + cols - 1) // cols
    out = []
    for i in range(count):
        cell_w, cell_h = w // cols, h // rows
        x0, y0 = (i % cols) * cell_w, (i // cols) * cell_h
        cw, ch = int(cell_w * rng.uniform(0.7, 0.95)), int(cell_h * rng.uniform(0.7, 0.95))
        x, y = x0 + rng.randrange(cell_w - cw + 1), y0 + rng.randrange(cell_h - ch + 1)
        crop = photo.crop((x, y, x + cw, y + ch))
        crop.thumbnail((320, 320))
        out.append(crop)
    return out


def _query(kind: str, product: Image.Image, background: Image.Image, rng: random.Random) -> Image.Image:
    if kind == "flip":
        return ImageOps.mirror(product)
    if kind == "colour":
        image = ImageEnhance.Brightness(product).enhance(rng.uniform(0.7, 1.3))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.7, 1.3))
        return ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    if kind == "scale":
        w, h = product.size
        s = rng.uniform(0.75, 0.9)
        cw, ch = int(w * s), int(h * s)
        x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
        return product.crop((x, y, x + cw, y + ch)).resize((int(w * rng.uniform(0.6, 1.4)), int(h * 0.9)))
    if kind == "jpeg":
        buffer = io.BytesIO()
        product.save(buffer, format="JPEG", quality=rng.randint(15, 30))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "street":
        scene = background.resize((480, 480))
        scale = rng.uniform(0.45, 0.65)
        pasted = product.resize(
            (
                int(product.width * scale * 480 / max(product.size)),
                int(product.height * scale * 480 / max(product.size)),
            )
        )
        x, y = rng.randrange(480 - pasted.width + 1), rng.randrange(480 - pasted.height + 1)
        scene.paste(pasted, (x, y))
        return scene
    raise ValueError(f"unknown query kind {kind!r}")


def build_offline_set(out: Path, photos: int = len(PHOTOS), crops_per_photo: int = 4, seed: int = 0) -> Path:
    """Write the set under ``out`` (deterministic for a seed); return ``out``."""
    rng = random.Random(seed)
    names = PHOTOS[:photos]
    loaded = {name: _photo(name) for name in names}
    (out / "queries").mkdir(parents=True, exist_ok=True)
    lines = []
    for p, name in enumerate(names):
        for c, crop in enumerate(_crops(loaded[name], crops_per_photo, rng)):
            product_id = f"{name}-{c}"
            category = CATEGORIES[(p * crops_per_photo + c) % len(CATEGORIES)]
            (out / "gallery" / category).mkdir(parents=True, exist_ok=True)
            crop.save(out / "gallery" / category / f"{product_id}.jpg", quality=92)
            others = [n for n in names if n != name] or [name]
            background = loaded[rng.choice(others)]
            for kind in QUERY_KINDS:
                query = _query(kind, crop, background, rng)
                path = f"queries/{product_id}-{kind}.jpg"
                query.save(out / path, quality=92)
                photo = "street" if kind == "street" else "product"
                lines.append({"image": path, "relevant": [product_id], "kind": kind, "photo": photo})
    (out / "queries.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out
