"""What the consumer thread tells the rest of the node about itself: failures, progress, giving up.

The consumer thread writes; ``/readyz``, ``/stats`` and ``/metrics`` read. The
rules that turn these facts into "ready" or "exit" are in
:meth:`ConsumerHealth.problems` and :meth:`ConsumerHealth.should_give_up`, so
that the HTTP layer only reports them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from indexer.config import IngestSettings


@dataclass
class ConsumerHealth:
    settings: IngestSettings
    #: failures since the last success (loop restarts and failed batches alike)
    consecutive_failures: int = 0
    last_failure: str | None = None
    #: what failed last: "loop" or "batch"
    failing: str | None = None
    #: monotonic time of the first failure of the current streak that may end in giving up
    failing_since: float | None = None
    #: totals, by what failed: "loop" (restarted), "batch" (retried), "dead-letter" (send refused)
    failures: Counter = field(default_factory=Counter)
    #: why the consumer stopped for good; the node exits non-zero once this is set
    gave_up: str | None = None
    #: monotonic time of the last batch applied, or of the last moment nothing was waiting
    last_progress: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def failed(self, what: str, reason: str, *, counts_towards_giving_up: bool) -> float:
        """Record a failure; return how long to wait before the retry (exponential backoff)."""
        with self._lock:
            self.consecutive_failures += 1
            self.last_failure = reason
            self.failing = what
            self.failures[what] += 1
            if counts_towards_giving_up and self.failing_since is None:
                self.failing_since = time.monotonic()
            n = self.consecutive_failures
        return min(self.settings.retry_backoff_s * 2 ** (n - 1), self.settings.retry_backoff_max_s)

    def succeeded(self, what: str | None = None) -> None:
        """Something went through: the streak of failures is over (only if it was of ``what``, if given)."""
        with self._lock:
            if what is not None and self.failing != what:
                return
            self.consecutive_failures = 0
            self.failing_since = None
            self.failing = None

    def count(self, what: str) -> None:
        """Count a failure that another one already reports (a refused dead letter fails its batch too)."""
        with self._lock:
            self.failures[what] += 1

    def failure_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.failures)

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def should_give_up(self) -> bool:
        since = self.failing_since
        return since is not None and time.monotonic() - since >= self.settings.give_up_after_s

    def give_up(self) -> str:
        reason = (
            f"the consumer failed for {self.settings.give_up_after_s:.0f} s without recovering: {self.last_failure}"
        )
        self.gave_up = reason
        return reason

    def problems(self, waiting: int) -> list[str]:
        """Why the consumer is not healthy now; ``waiting`` is the number of messages not yet applied."""
        reasons = []
        if self.gave_up:
            reasons.append(self.gave_up)
        elif self.consecutive_failures >= self.settings.unready_after_failures:
            reasons.append(f"the consumer failed {self.consecutive_failures} times in a row: {self.last_failure}")
        stalled = time.monotonic() - self.last_progress
        if waiting > 0 and stalled > self.settings.stall_after_s:
            reasons.append(f"no event applied for {stalled:.0f} s while {waiting} messages wait")
        return reasons

    def snapshot(self) -> dict:
        return {
            "consecutive_failures": self.consecutive_failures,
            "last_failure": self.last_failure,
            "failures": self.failure_counts(),
            "gave_up": self.gave_up,
            "seconds_since_progress": round(time.monotonic() - self.last_progress, 1),
        }
