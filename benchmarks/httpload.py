"""The benchmarks' HTTP client: runs in its own process, so it shares neither the server's event loop nor its GIL.

    python -m benchmarks.httpload PORT PATH QUERIES.npy [--seconds S] [--connections C]
    python -m benchmarks.httpload PORT PATH DIR --images [--seconds S] [--connections C]

Posts ``{"vector": q, "k": 10}`` for each row of QUERIES.npy, or each JPEG of
DIR as an ``image/jpeg`` body (``--images``), once each or round and round
for S seconds, over C keep-alive connections, and prints one
JSON list of ``[wall-clock start, seconds, HTTP status]`` per request (status
0: the connection failed). http.client is used because its own cost per
request is small next to an aiohttp client's.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson

HEADERS = {"Content-Type": "application/json"}


def load(
    port: int, path: str, bodies: list[bytes], seconds: float | None, connections: int, headers: dict = HEADERS
) -> list[tuple]:
    stop = None if seconds is None else time.time() + seconds

    def worker(first: int) -> list[tuple]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        done = []
        i = first
        while (i < len(bodies)) if stop is None else (time.time() < stop):
            started, clock = time.time(), time.perf_counter()
            try:
                connection.request("POST", path, bodies[i % len(bodies)], headers)
                response = connection.getresponse()
                response.read()
                status = response.status
            except OSError:
                status = 0
                connection.close()
            done.append((started, time.perf_counter() - clock, status))
            i += connections
        connection.close()
        return done

    with ThreadPoolExecutor(connections) as pool:
        return sorted(r for rows in pool.map(worker, range(connections)) for r in rows)


async def run_client(
    port: int, path: str, queries: np.ndarray | list[bytes], seconds: float | None = None, connections: int = 1
) -> list[tuple[float, float, int]]:
    """Start the client in another process and wait for its requests' timings; ``queries``: vectors or JPEGs."""
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(queries, list):
            for i, jpeg in enumerate(queries):
                (Path(tmp) / f"{i:06d}.jpg").write_bytes(jpeg)
            args = [str(port), path, tmp, "--images", "--connections", str(connections)]
        else:
            file = Path(tmp) / "queries.npy"
            np.save(file, np.asarray(queries, np.float32))
            args = [str(port), path, str(file), "--connections", str(connections)]
        if seconds is not None:
            args += ["--seconds", str(seconds)]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.httpload", *args, stdout=asyncio.subprocess.PIPE
        )
        stdout, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the load client failed with exit code {process.returncode}")
    return [tuple(row) for row in json.loads(stdout)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    parser.add_argument("queries", type=Path)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--images", action="store_true", help="QUERIES is a directory of JPEGs to post")
    args = parser.parse_args()
    if args.images:
        bodies = [path.read_bytes() for path in sorted(args.queries.glob("*.jpg"))]
        headers = {"Content-Type": "image/jpeg"}
    else:
        bodies = [orjson.dumps({"vector": q.tolist(), "k": 10}) for q in np.load(args.queries)]
        headers = HEADERS
    print(json.dumps(load(args.port, args.path, bodies, args.seconds, args.connections, headers)))


if __name__ == "__main__":
    main()
