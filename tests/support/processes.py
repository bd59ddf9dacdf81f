"""Running real lookstream nodes as processes: free ports, the example plugin, waiting for /stats.

Shared by integration tests and benchmarks (which import it; tests never import benchmarks).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from indexer.config import KafkaSettings

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "lookstream-colour-histogram"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kafka_toml(kafka: KafkaSettings, **extra: int) -> str:
    """The ``[kafka]`` tables of a node's config file: the cluster, the group, the topics, and ``extra`` numbers."""
    lines = ["[kafka]", f'bootstrap_servers = "{kafka.bootstrap_servers}"', f'group_id = "{kafka.group_id}"']
    lines += [f"{key} = {value}" for key, value in extra.items()]
    lines.append("[kafka.topics]")
    lines += [f'{name} = "{topic}"' for name, topic in kafka.topics.model_dump().items()]
    return "\n".join(lines) + "\n"


def install_example(target: Path) -> Path:
    """pip-install examples/lookstream-colour-histogram into ``target`` (for PYTHONPATH).

    Its encoder is cheap, so thousands of events stream through a real node
    fast; it is found through its entry point like any plugin. Built from a
    copy, so setuptools leaves no build/ folder in the source tree.
    """
    source = target.parent / f"{target.name}-src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    return target


def get_json(port: int, path: str, data: bytes | None = None):
    """GET (or POST an image) on a node at 127.0.0.1:port; the JSON answer."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "image/png"} if data else {}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def node_stats(port: int) -> dict | None:
    """The node's /stats, or None while it does not answer."""
    try:
        return get_json(port, "/stats")
    except OSError:
        return None


def wait_until(check, timeout: float, what: str):
    """Call ``check()`` every 0.1 s until it returns something truthy; return that, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout} s")
