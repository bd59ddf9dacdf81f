import io

import numpy as np
import pytest
from PIL import Image

from indexer.failures import Reason
from indexer.images import InvalidImage, decode, decode_image
from tests.support.imagegen import encoded, product_image

MAX_PIXELS = 4_000_000


def saved(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        saved(Image.new("CMYK", (20, 10), (0, 255, 0, 0)), "JPEG"),
        saved(Image.fromarray(np.full((10, 20), 40000, dtype=np.uint16)), "PNG"),
        saved(Image.new("RGBA", (20, 10), (255, 0, 0, 128)), "PNG"),
        saved(Image.new("RGB", (20, 10), "red").convert("P"), "PNG"),
        saved(Image.new("LA", (20, 10), (9, 200)), "PNG"),
        saved(Image.new("RGB", (20, 10), "blue"), "WEBP"),
        saved(
            Image.new("RGB", (20, 10), "red"),
            "PNG",
            save_all=True,
            append_images=[Image.new("RGB", (20, 10), "blue")],
        ),
    ],
    ids=["cmyk", "16-bit", "alpha", "palette", "grey-alpha", "webp", "animated"],
)
def test_valid_odd_images_become_rgb(data):
    image = decode_image(data, MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (20, 10)


def test_alpha_is_composited_on_white():
    image = decode_image(saved(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG"), MAX_PIXELS)
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    image = decode_image(saved(Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)), "PNG"), MAX_PIXELS)
    assert image.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty image"),
        (b"definitely not an image", "not a JPEG, PNG or WebP"),
        (saved(Image.new("RGB", (8, 8)), "GIF"), "not a JPEG, PNG or WebP"),
        (encoded(product_image(1))[:300], "corrupt image"),
    ],
    ids=["empty", "garbage", "gif", "truncated"],
)
def test_bad_images_say_why(data, reason):
    with pytest.raises(InvalidImage, match=reason):
        decode_image(data, MAX_PIXELS)


def test_pixel_limit_refuses_decompression_bombs():
    bomb = saved(Image.new("L", (3000, 3000)), "PNG")  # 9 Mpx in a few KB
    assert len(bomb) < 100_000
    with pytest.raises(InvalidImage, match="over the limit"):
        decode_image(bomb, MAX_PIXELS)


def test_a_large_jpeg_is_decoded_small_and_boxes_map_back_to_its_pixels():
    photo = product_image(4, (4000, 3000))
    decoded = decode(saved(photo, "JPEG"), 40_000_000, max_side=1000)
    assert decoded.original_size == (4000, 3000) and decoded.image.size == (1000, 750)
    assert decoded.to_original((100, 75, 1000, 750)) == (400, 300, 4000, 3000)


def test_exif_rotation_swaps_the_original_size():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated a quarter turn
    data = saved(product_image(5, (400, 200)), "JPEG", exif=exif.tobytes())
    decoded = decode(data, MAX_PIXELS, max_side=100)
    assert decoded.original_size == (200, 400) and decoded.image.size == (50, 100)


def test_reason_kinds_tell_too_large_from_undecodable():
    with pytest.raises(InvalidImage) as too_large:
        decode(saved(Image.new("L", (3000, 3000)), "PNG"), MAX_PIXELS)
    with pytest.raises(InvalidImage) as broken:
        decode(b"garbage", MAX_PIXELS)
    assert too_large.value.kind is Reason.IMAGE_TOO_LARGE and broken.value.kind is Reason.IMAGE_UNDECODABLE
