"""Turn image bytes or an ``image_uri`` into an RGB PIL image, or say why not.

Every image that reaches a model went through :func:`decode_image`, so models
can rely on 8-bit RGB. Odd but valid inputs (CMYK, 16-bit, alpha, palette,
animation) are converted; broken or hostile ones raise :class:`InvalidImage`.
"""

from __future__ import annotations

import io
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")


class InvalidImage(ValueError):
    """The image cannot be used; the message is the reason shown to the sender."""


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode JPEG/PNG/WebP bytes into an RGB image no larger than ``max_pixels``."""
    if not data:
        raise InvalidImage("empty image")
    try:
        with warnings.catch_warnings():
            # PIL warns between max_pixels and 2x; we refuse at max_pixels instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidImage(f"image of {width}x{height} pixels is over the limit of {max_pixels}")
        image.load()
        image = ImageOps.exif_transpose(image) or image
    except InvalidImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise InvalidImage(f"not a JPEG, PNG or WebP image: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        # Truncated or corrupt data surfaces as OSError from load().
        raise InvalidImage(f"corrupt image: {e}") from e
    return to_rgb(image)


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


@dataclass(frozen=True)
class UriPolicy:
    """Where an ``image_uri`` may point: directories for ``file://``, hosts for ``http(s)://``."""

    file_roots: tuple[Path, ...] = ()
    http_hosts: tuple[str, ...] = ()  # "host" or "host:port", exact; nothing else is fetched (no SSRF)
    timeout_s: float = 5.0
    max_bytes: int = 20 * 1024 * 1024


def read_image_uri(uri: str, policy: UriPolicy) -> bytes:
    """Read the bytes an ``image_uri`` points at, within the policy."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return _read_file(uri, parsed, policy.file_roots)
    if parsed.scheme in ("http", "https"):
        return _fetch(uri, parsed, policy)
    raise InvalidImage(f"image_uri scheme {parsed.scheme!r} is not supported (file, http, https)")


def _read_file(uri: str, parsed, file_roots: tuple[Path, ...]) -> bytes:
    """Only inside ``file_roots``; paths are resolved (symlinks, ``..``) before the check."""
    if parsed.netloc not in ("", "localhost"):
        raise InvalidImage(f"file URI with host {parsed.netloc!r} is not allowed")
    if not file_roots:
        raise InvalidImage("file:// image_uri refused: no images.file_roots are configured")
    path = Path(unquote(parsed.path)).resolve()
    if not any(path.is_relative_to(root.resolve()) for root in file_roots):
        raise InvalidImage(f"image_uri {uri!r} is outside the configured file roots")
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidImage(f"cannot read image_uri {uri!r}: {e.strerror}") from e


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise InvalidImage(f"image_uri redirects to {newurl!r}; redirects are not followed")


def _fetch(uri: str, parsed, policy: UriPolicy) -> bytes:
    """GET from an allowed host only: no redirects, a timeout and a size cap."""
    host = parsed.hostname or ""
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    if host not in policy.http_hosts and netloc not in policy.http_hosts:
        raise InvalidImage(f"image_uri host {netloc!r} is not in images.http_hosts")
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(urllib.request.Request(uri, headers={"Accept": "image/*"}), timeout=policy.timeout_s) as r:
            data = r.read(policy.max_bytes + 1)
    except InvalidImage:
        raise
    except urllib.error.HTTPError as e:
        raise InvalidImage(f"image_uri {uri!r} answered {e.code}") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise InvalidImage(f"cannot fetch image_uri {uri!r}: {e}") from e
    if len(data) > policy.max_bytes:
        raise InvalidImage(f"image_uri {uri!r} is larger than {policy.max_bytes} bytes")
    return data
