"""The README's path, as a newcomer runs it: `lookstream up`, then `lookstream produce products`."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.support.imagegen import write_catalog
from tests.support.processes import free_port

pytestmark = pytest.mark.integration
LOOKSTREAM = [sys.executable, "-m", "indexer"]


def http(url: str, data: bytes | None = None, content_type: str = "image/jpeg") -> bytes:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout} s")


def test_up_then_produce_makes_every_product_its_own_first_hit(tmp_path):
    import json

    catalog = write_catalog(tmp_path / "catalog", 50)
    api_port, broker_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    node = subprocess.Popen(
        [
            *LOOKSTREAM,
            "up",
            "--port",
            str(api_port),
            "--broker-port",
            str(broker_port),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{api_port}"
    try:
        wait_until(lambda: json.loads(http(f"{base}/stats"))["consumer"]["assigned"], 60, "consumer assignment")
        produced = subprocess.run(
            [
                *LOOKSTREAM,
                "produce",
                "products",
                str(tmp_path / "catalog"),
                "--bootstrap-servers",
                f"127.0.0.1:{broker_port}",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        published = time.monotonic()
        assert produced.returncode == 0, produced.stderr
        assert "sent 50, skipped 0" in produced.stdout

        def all_first_hits():
            for product_id, category in catalog.items():
                image = (tmp_path / "catalog" / category / f"{product_id}.jpg").read_bytes()
                hits = json.loads(http(f"{base}/search?k=1", image))["hits"]
                if not hits or hits[0]["id"] != product_id:
                    return False
            return True

        wait_until(all_first_hits, 30, "every product first for its own image")
        freshness = json.loads(http(f"{base}/stats"))["ingest"]["freshness_ms"]
        print(
            f"publish -> all 50 checked searchable: {time.monotonic() - published:.2f} s; "
            f"event ts -> searchable, slowest event: {freshness['max']} ms"
        )
    finally:
        node.send_signal(signal.SIGTERM)
        code = node.wait(30)
        log.close()
    output = (tmp_path / "up.log").read_text()
    assert code == 0, output
    assert "stopping the local broker" in output
    with socket.socket() as s:  # the broker went with it
        assert s.connect_ex(("127.0.0.1", broker_port)) != 0
