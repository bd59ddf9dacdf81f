"""Augmentations for training pairs: a street crop changes more than a catalog thumbnail does.

As in the seeds (Street2Shop: more aggressive augmentation for street photos,
lighter for shop photos), each side has its own. A third kind, ``photo``, is
a catalog thumbnail as a camera and a re-encoder leave it (a tighter frame,
lost resolution, heavy JPEG, other light, a mirror): paired with a ``shop``
view of the same thumbnail it makes a *self pair* (``lookstream train
--self-pairs``). Every view is a function of the image and a seed, so a run
is reproducible and its views can be cached.
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
        image = _jpeg(image, rng.randint(35, 90))
    return image


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def shop(image: Image.Image, seed: int) -> Image.Image:
    """A catalog thumbnail: flip, a light crop and light colour changes."""
    rng = random.Random(seed)
    image = _crop(image, rng, 0.88)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return _jitter(image, rng, 0.12)


def photo(image: Image.Image, seed: int) -> Image.Image:
    """A catalog thumbnail photographed or re-encoded: tighter frame, lost resolution, colour, flip, heavy JPEG.

    It covers the changes ``lookstream evaluate``'s offline queries make
    (indexer/evalset.py: mirror, colour jitter, a 75-90% crop resized to
    another aspect, JPEG at quality 15-30), with wider ranges, and is drawn
    only on the training catalog's thumbnails, never on the evaluation photos.
    """
    rng = random.Random(seed)
    w, h = image.size
    if rng.random() < 0.7:  # a tighter frame, then down- and up-sampled (lost resolution) to another aspect
        image = _crop(image, rng, 0.7)
        small = rng.uniform(0.35, 1.0)
        image = image.resize((max(8, int(w * small * rng.uniform(0.7, 1.3))), max(8, int(h * small))))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = _jitter(image, rng, 0.4)
    if rng.random() < 0.7:
        image = _jpeg(image, rng.randint(12, 60))
    return image
