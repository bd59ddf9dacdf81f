"""Where searches run: a small thread pool, or the event loop itself for searches that are fast.

Model inference and FAISS search hold the GIL in parts but release it in the
heavy loops, so two worker threads keep the event loop answering while they
work. A vector search that has recently taken less than
``api.inline_search_ms`` runs on the event loop instead: below that, the hop to
a thread costs more than the search (docs/benchmarks.md, "Query latency").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class SearchWorkers:
    def __init__(self, inline_below_ms: float, threads: int = 2) -> None:
        self.inline_below_s = inline_below_ms / 1000
        self.executor = ThreadPoolExecutor(threads, "lookstream-query")
        #: moving average of recent vector search times, in seconds
        self.vector_search_s = 0.0

    async def run(self, work: Callable[..., T], *args) -> T:
        """Run model work (an image query) in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, work, *args)

    async def run_search(self, search: Callable[..., T], *args) -> T:
        """Run a vector search inline while searches are fast, else in a worker thread; time it."""
        if self.vector_search_s < self.inline_below_s:
            return self._timed(search, *args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._timed, search, *args)

    def _timed(self, search: Callable[..., T], *args) -> T:
        started = time.perf_counter()
        try:
            return search(*args)
        finally:
            self.vector_search_s += 0.1 * (time.perf_counter() - started - self.vector_search_s)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
