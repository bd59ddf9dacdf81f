"""The search page in headless Chromium against a real server: boxes and results appear, and look right."""

import asyncio
import shutil
import struct
import zlib

import pytest

from indexer.web.app import create_app

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=15000",
    "--window-size=1100,760",
]


async def chromium(tmp_path, *args: str) -> bytes:
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0
    return stdout


def png_size_and_colours(data: bytes) -> tuple[int, int, int]:
    """Width, height, and how many distinct bytes the first rows hold (a blank page has a couple)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    chunks, pos = [], 8
    while pos < len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        if data[pos + 4 : pos + 8] == b"IDAT":
            chunks.append(data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    pixels = zlib.decompress(b"".join(chunks))
    return width, height, len(set(pixels[: len(pixels) // 2]))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
async def test_page_shows_boxes_and_results_for_a_photo(aiohttp_server, node, tmp_path):
    server = await aiohttp_server(create_app(node, consume=False))
    url = f"http://127.0.0.1:{server.port}/?example=p2"

    dom = (await chromium(tmp_path, "--dump-dom", url)).decode()
    assert 'data-done="1"' in dom, "the search never finished rendering"
    assert dom.count('class="box"') == 1 and "Whole image" in dom
    whole = dom[dom.index("Whole image") :]
    assert whole.index('data-id="p2"') < whole.index('class="card"', whole.index('data-id="p2"') + 1)

    screenshot = tmp_path / "page.png"
    await chromium(tmp_path, f"--screenshot={screenshot}", url)
    width, height, colours = png_size_and_colours(screenshot.read_bytes())
    assert (width, height) == (1100, 760) and colours > 50

    recent = (await chromium(tmp_path, "--dump-dom", f"http://127.0.0.1:{server.port}/?view=recent")).decode()
    assert recent.count('class="card"') == 7
