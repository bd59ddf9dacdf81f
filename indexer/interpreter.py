"""The Python interpreter of a serving process, set for query latency: garbage collection and GIL hand-over.

Two CPython defaults cost a node its tail latency (measured in docs/benchmarks.md,
"Query latency during a bulk load"):

* A full collection of the cyclic garbage collector walks every tracked
  object while it holds the GIL. With torch, transformers, ONNX Runtime and
  aiohttp loaded a node tracks about 270,000 objects, and a full collection
  took about 200 ms on the project's 2-core machine: every query in flight
  waited that long. Those objects live as long as the process (modules,
  models), so once they are loaded they go to the permanent generation
  (``gc.freeze``) and later collections walk only what was made since.
* A thread that wants the GIL back waits for the switch interval (CPython's
  default 5 ms) before the thread holding it is asked to let go. A query gives
  the GIL up at every FAISS call, once per segment, and the consumer's Python
  work takes it meanwhile: during a bulk load each hand-back cost up to 5 ms.

Both are process-wide, so the CLI's serving commands set them
(:func:`serve_from_this_process`) and tests and tools keep CPython's defaults.
"""

from __future__ import annotations

import gc
import logging
import sys

log = logging.getLogger(__name__)


def serve_from_this_process(switch_interval_ms: float) -> None:
    """Set this process up to answer queries: a shorter GIL switch interval, start-up objects frozen."""
    sys.setswitchinterval(switch_interval_ms / 1000)
    gc.collect()
    gc.freeze()
    log.info(
        "GIL switch interval %.2f ms; %d objects made at start-up exempt from garbage collection",
        switch_interval_ms,
        gc.get_freeze_count(),
    )


def freeze_new_long_lived(*, something_was_released: bool) -> None:
    """After models were loaded or a generation closed: freeze what now lives, if this process serves.

    ``something_was_released``: a generation was closed, so objects frozen
    earlier may be garbage held by reference cycles, which a frozen object's
    refcount never frees: they are unfrozen and collected first (one full
    collection, as CPython would run anyway).
    """
    if not gc.get_freeze_count():
        return  # not a serving process (tests, tools): CPython's defaults stay
    if something_was_released:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
