"""Turn image bytes into an RGB PIL image of bounded size, or say why not.

Every image that reaches a model went through :func:`decode_image`, so models
can rely on 8-bit RGB. Odd but valid inputs (CMYK, 16-bit, alpha, palette,
animation) are converted; broken or hostile ones raise :class:`InvalidImage`.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from indexer.failures import Reason, Rejection

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")


class InvalidImage(Rejection):
    """The image cannot be used; the message is the reason shown to the sender."""

    def __init__(self, detail: str, kind: Reason = Reason.IMAGE_UNDECODABLE) -> None:
        super().__init__(kind, detail)


@dataclass(frozen=True)
class Decoded:
    """An image ready for the models, and the size it had before it was scaled down."""

    image: Image.Image  # 8-bit RGB, at most ``max_side`` pixels on the longer side
    original_size: tuple[int, int]  # width, height after EXIF orientation

    def to_original(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """A box in the decoded image's pixels, in the original image's pixels."""
        if self.image.size == self.original_size:
            return box
        sx = self.original_size[0] / self.image.width
        sy = self.original_size[1] / self.image.height
        x0, y0, x1, y1 = box
        return (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy))


def decode(data: bytes, max_pixels: int, max_side: int | None = None) -> Decoded:
    """Decode JPEG/PNG/WebP bytes into RGB, refusing more than ``max_pixels`` before decoding.

    With ``max_side``, a JPEG is decoded at the smallest DCT scale (1/2, 1/4,
    1/8) that still covers it (draft mode: a 24 Mpx photo never exists at full
    size in memory) and any image is then scaled down to fit, so the memory a
    decoded image holds is bounded by ``max_side`` rather than by what a
    producer sent. Raises :class:`InvalidImage` with the reason.
    """
    if not data:
        raise InvalidImage("empty image", Reason.IMAGE_UNDECODABLE)
    try:
        with warnings.catch_warnings():
            # PIL warns between max_pixels and 2x; we refuse at max_pixels instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidImage(
                f"image of {width}x{height} pixels is over the limit of {max_pixels}", Reason.IMAGE_TOO_LARGE
            )
        if max_side is not None and image.format == "JPEG" and max(width, height) > max_side:
            scale = max_side / max(width, height)
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        image.load()
        before = image.size
        image = ImageOps.exif_transpose(image) or image
        if image.size != before:  # EXIF turned it a quarter: the original's width and height swap too
            width, height = height, width
    except InvalidImage:
        raise
    except Image.DecompressionBombError as e:  # over twice PIL's own limit, refused by Image.open
        raise InvalidImage(f"image is over the pixel limit: {e}", Reason.IMAGE_TOO_LARGE) from e
    except UnidentifiedImageError as e:
        raise InvalidImage(f"not a JPEG, PNG or WebP image: {e}", Reason.IMAGE_UNDECODABLE) from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        # Truncated or corrupt data surfaces as OSError from load().
        raise InvalidImage(f"corrupt image: {e}", Reason.IMAGE_UNDECODABLE) from e
    image = to_rgb(image)
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return Decoded(image, (width, height))


def decode_image(data: bytes, max_pixels: int, max_side: int | None = None) -> Image.Image:
    """The decoded RGB image alone (see :func:`decode`)."""
    return decode(data, max_pixels, max_side).image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing alpha onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping.
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")
