import io

import numpy as np
import pytest
from PIL import Image

from indexer.images import InvalidImage, UriPolicy, decode_image, read_image_uri
from tests.imagegen import encoded, product_image

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


def test_file_uri_inside_roots_is_read(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"bytes")
    assert read_image_uri((tmp_path / "a.jpg").as_uri(), UriPolicy((tmp_path,))) == b"bytes"


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("file:///etc/passwd", "outside the configured file roots"),
        ("{root}/../../etc/passwd", "outside the configured file roots"),
        ("http://example.com/a.jpg", "host 'example.com' is not in images.http_hosts"),
        ("http://169.254.169.254/latest/meta-data", "host '169.254.169.254' is not in images.http_hosts"),
        ("gopher://example.com/a.jpg", "scheme 'gopher' is not supported"),
        ("file://otherhost/a.jpg", "with host"),
        ("{root}/missing.jpg", "cannot read"),
    ],
)
def test_file_uri_outside_roots_or_unreadable_is_refused(tmp_path, uri, reason):
    uri = uri.format(root=tmp_path.as_uri())
    with pytest.raises(InvalidImage, match=reason):
        read_image_uri(uri, UriPolicy((tmp_path,)))


def test_symlink_out_of_roots_is_refused(tmp_path):
    (tmp_path / "link.jpg").symlink_to("/etc/hostname")
    with pytest.raises(InvalidImage, match="outside"):
        read_image_uri((tmp_path / "link.jpg").as_uri(), UriPolicy((tmp_path,)))


def test_no_roots_refuses_every_file_uri(tmp_path):
    with pytest.raises(InvalidImage, match=r"no images\.file_roots"):
        read_image_uri((tmp_path / "a.jpg").as_uri(), UriPolicy())


@pytest.fixture
async def image_host(aiohttp_server):
    from aiohttp import web

    jpeg = encoded(product_image(1))

    async def image(request):
        return web.Response(body=jpeg, content_type="image/jpeg")

    async def redirect(request):
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data")

    async def big(request):
        return web.Response(body=b"x" * 5000, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/a.jpg", image)
    app.router.add_get("/moved.jpg", redirect)
    app.router.add_get("/big.jpg", big)
    server = await aiohttp_server(app)
    return f"127.0.0.1:{server.port}", jpeg


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/moved.jpg", "redirects are not followed"),
        ("/missing.jpg", "answered 404"),
        ("/big.jpg", "larger than 4096 bytes"),
    ],
)
async def test_http_uri_from_an_allowed_host_is_fetched_within_limits(image_host, path, reason):
    import asyncio

    host, jpeg = image_host
    policy = UriPolicy(http_hosts=(host,), max_bytes=4096)
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, read_image_uri, f"http://{host}/a.jpg", policy) == jpeg
    with pytest.raises(InvalidImage, match=reason):
        await loop.run_in_executor(None, read_image_uri, f"http://{host}{path}", policy)
    other_port = UriPolicy(http_hosts=("127.0.0.1:1",))
    with pytest.raises(InvalidImage, match=r"not in images\.http_hosts"):
        await loop.run_in_executor(None, read_image_uri, f"http://{host}/a.jpg", other_port)
