"""Why an event was refused, and whether a failure is the event's fault at all.

Every dead letter carries one reason *kind* from the fixed set :class:`Reason`
(header ``lookstream.reason``, the ``reason`` label of
``lookstream_events_rejected_total``, the keys of ``/stats``
``rejected_by_reason``) and the free text in a separate header
(``lookstream.reason-detail``). Free text never becomes a metric label or a
checkpoint key, so the set of series stays bounded whatever producers send.

A failure that is *not* the event's fault (GPU out of memory, a full disk, the
broker away, a plugin that raises :class:`plugins.models.RetryableError`) is
never turned into a dead letter: :func:`is_transient` tells the consumer to
retry it with backoff instead.
"""

from __future__ import annotations

import errno
from enum import StrEnum


class RetryableError(RuntimeError):
    """Raised by a model (or any stage) when the failure is not the input's fault: a remote service away.

    The consumer retries the batch with backoff and never dead-letters its
    events; any other exception a model raises is taken as the input's fault
    once the batch has been split down to the one event that fails. Plugins
    import it as ``plugins.models.RetryableError``.
    """


class Reason(StrEnum):
    """The dead-letter reason kinds; README's "Events" section documents each."""

    MESSAGE_TOO_LARGE = "message-too-large"
    BAD_ENVELOPE = "bad-envelope"
    WRONG_TOPIC = "wrong-topic"
    IMAGE_URI_REFUSED = "image-uri-refused"
    IMAGE_FETCH_FAILED = "image-fetch-failed"
    IMAGE_UNDECODABLE = "image-undecodable"
    IMAGE_TOO_LARGE = "image-too-large"
    MODEL_FAILED = "model-failed"
    THUMBNAIL_FAILED = "thumbnail-failed"
    INTERNAL_ERROR = "internal-error"


class Rejection(ValueError):
    """One event cannot be indexed: a reason kind and the detail for the dead-letter header."""

    def __init__(self, kind: Reason, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


#: OSError numbers that say something about this machine, not about the event being read.
_MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EIO})


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` is the machine's or a service's trouble rather than the event's.

    Such failures are retried with backoff and never dead-letter an event:
    memory (host or GPU), a full disk or too many open files, Kafka errors,
    and whatever a plugin marks with :class:`~plugins.models.RetryableError`.
    """
    if isinstance(error, Rejection):
        return False
    if isinstance(error, RetryableError | MemoryError):
        return True
    if isinstance(error, OSError) and error.errno in _MACHINE_ERRNOS:
        return True
    for kind in type(error).__mro__:
        # torch.OutOfMemoryError (CUDA, MPS) and kafka.errors.KafkaError, named so that
        # neither library is imported here.
        if kind.__name__ == "OutOfMemoryError" or (kind.__name__ == "KafkaError" and kind.__module__ == "kafka.errors"):
            return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def describe(error: BaseException) -> str:
    """A one-line detail for a dead-letter header: the exception type and its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
