"""Augmentations for training pairs: a street crop changes more than a catalog thumbnail does.

As in the seeds (Street2Shop: more aggressive augmentation for street photos,
lighter for shop photos), each side has its own. Every view is a function of
the image and a seed, so a run is reproducible and its views can be cached.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

#: Part of the feature cache's key: change it whenever a view changes for the same seed.
VERSION = 1


def _jitter(image: Image.Image, rng: random.Random, amount: float) -> Image.Image:
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(1 - amount, 1 + amount))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(1 - amount, 1 + amount))
    return ImageEnhance.Color(image).enhance(rng.uniform(1 - amount, 1 + amount))


def _crop(image: Image.Image, rng: random.Random, least: float) -> Image.Image:
    w, h = image.size
    s = rng.uniform(least, 1.0)
    cw, ch = max(1, int(w * s)), max(1, int(h * rng.uniform(least, 1.0)))
    x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
    return image.crop((x, y, x + cw, y + ch))


def street(image: Image.Image, seed: int) -> Image.Image:
    """A garment crop from a post: crop, small rotation, flip, lighting, blur, JPEG."""
    rng = random.Random(seed)
    image = _crop(image, rng, 0.75)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = image.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR)
    image = _jitter(image, rng, 0.25)
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.5:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(35, 90))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def shop(image: Image.Image, seed: int) -> Image.Image:
    """A catalog thumbnail: flip, a light crop and light colour changes."""
    rng = random.Random(seed)
    image = _crop(image, rng, 0.88)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return _jitter(image, rng, 0.12)
