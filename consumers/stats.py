"""Counters the consumer writes and ``GET /stats`` reads."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class IngestStats:
    consumed: int = 0
    indexed: int = 0
    deleted: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason kind -> count
    #: "topic/partition" -> next offset to read (the last applied offset + 1)
    offsets: dict[str, int] = field(default_factory=dict)
    #: On a serve replica: event "topic/partition" -> the next source offset after the newest record applied
    #: from it, so that a new generation's replica knows when it holds what the active one does.
    sources: dict[str, int] = field(default_factory=dict)
    #: event ts -> searchable, in ms, for the newest live event of the last batch and the slowest
    #: live one ever; replays (events older than the consumer) do not count
    freshness_ms_last: int | None = None
    freshness_ms_max: int = 0
    #: called with each applied event's freshness in seconds and whether it was a replay (the /metrics histogram)
    freshness_observer: Callable[[float, bool], None] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_batch(
        self,
        consumed: int,
        indexed: int,
        deleted: int,
        rejected: list[str],
        offsets: dict[str, int],
        freshness_ms: list[tuple[int, bool]],
    ) -> None:
        """Count a batch.

        ``rejected`` holds the reason kind of each dead letter; ``freshness_ms``
        each applied event's searchable time minus its timestamp, and whether
        the event is a replay.
        """
        if self.freshness_observer is not None:
            for ms, replay in freshness_ms:
                self.freshness_observer(ms / 1000, replay)
        live = [ms for ms, replay in freshness_ms if not replay]
        with self._lock:
            if live:
                self.freshness_ms_last = min(live)  # the newest event of the batch
                self.freshness_ms_max = max(self.freshness_ms_max, *live)
            self.consumed += consumed
            self.indexed += indexed
            self.deleted += deleted
            self.rejected.update(str(kind) for kind in rejected)
            self.offsets.update(offsets)

    def counters(self) -> dict:
        """What a checkpoint keeps, so that counts stay exact across restarts."""
        with self._lock:
            return {
                "consumed": self.consumed,
                "indexed": self.indexed,
                "deleted": self.deleted,
                "rejected": dict(self.rejected),
                **({"sources": dict(self.sources)} if self.sources else {}),
            }

    def record_sources(self, sources: dict[str, int]) -> None:
        with self._lock:
            for name, offset in sources.items():
                self.sources[name] = max(self.sources.get(name, 0), offset)

    def restore(self, counters: dict) -> None:
        with self._lock:
            self.consumed = counters.get("consumed", 0)
            self.indexed = counters.get("indexed", 0)
            self.deleted = counters.get("deleted", 0)
            self.rejected = Counter(counters.get("rejected", {}))
            self.sources = dict(counters.get("sources", {}))

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "consumed": self.consumed,
                "indexed": self.indexed,
                "deleted": self.deleted,
                "rejected": sum(self.rejected.values()),
                "rejected_by_reason": dict(self.rejected),
                "offsets": dict(sorted(self.offsets.items())),
                "freshness_ms": {"last": self.freshness_ms_last, "max": self.freshness_ms_max},
            }
