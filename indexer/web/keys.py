"""The app's typed state: what handlers and lifecycle hooks read from the application."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from indexer.config import Settings
from indexer.node import Node
from indexer.web.metrics import Metrics
from indexer.web.workers import SearchWorkers

NODE = web.AppKey("node", Node)
METRICS = web.AppKey("metrics", Metrics)
WORKERS = web.AppKey("workers", SearchWorkers)
#: Whether the app runs the node's consumers (tests of the API alone do not).
CONSUMING = web.AppKey("consuming", bool)
#: Re-reads the config file on SIGHUP (the CLI's); new model settings start a new generation.
RELOAD = web.AppKey("reload", Callable[[], Settings])
#: Called once, on the event loop, with the reason when ingestion stops for good.
ON_FATAL = web.AppKey("on_fatal", Callable[[str], None])
