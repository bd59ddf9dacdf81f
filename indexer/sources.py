"""Read the bytes an event's ``image_uri`` points at: safely, and many at once.

An ``image_uri`` comes from whoever produces events, so every read is a request
made on their behalf from inside our network. This module is the one place that
decides what such a request may reach:

* ``file://`` only inside ``images.file_roots`` (symlinks and ``..`` resolved first),
  and only regular files: never a FIFO that blocks the reader or a device that never ends;
* ``http(s)://`` only to ``images.http_hosts``, never to a loopback, private or other
  non-public address unless allowed (checked on the addresses the connection is made to,
  so a name that re-resolves elsewhere cannot slip through), never following redirects;
* nothing larger than ``images.max_image_bytes``, nothing slower than one deadline per attempt.

A batch of events names many images, so http(s) fetches run concurrently on an
asyncio loop in a thread of our own, with one reused connection pool; callers stay
ordinary threads. Each image either comes back as bytes or as a
:class:`~indexer.failures.Rejection` that dead-letters its event. Only failures that
are this machine's (a full file table, no memory: :func:`~indexer.failures.is_transient`)
are raised, so that they are retried rather than blamed on the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import socket
import stat
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote_to_bytes, urlsplit

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from indexer.config import ImageSettings
from indexer.failures import Reason, Rejection, describe, is_transient

log = logging.getLogger(__name__)

SCHEMES = ("file", "http", "https")
#: A host allowed without a port may be reached on these ports only.
DEFAULT_PORTS = (80, 443)
BACKOFF_S = 0.2
CHUNK_BYTES = 64 * 1024
#: Longest uri quoted whole in a rejection's detail.
MAX_QUOTED_URI = 200

# C0 controls, DEL and C1 controls: urlsplit silently drops some of them, which would make
# what is checked differ from what is fetched.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HEADERS = {"Accept": "image/*", "Accept-Encoding": "identity"}


class ImageSources:
    """Reads ``image_uri`` bytes within :class:`~indexer.config.ImageSettings`'s policy.

    Why a class: http fetches share one aiohttp session (connection reuse, one DNS cache
    holding only checked addresses) on one event-loop thread, both created on the first
    http fetch and released by :meth:`close`. Call :meth:`close` once no :meth:`read_many`
    is in flight.
    """

    def __init__(self, settings: ImageSettings) -> None:
        self._settings = settings
        self._roots = tuple(Path(os.path.realpath(root)) for root in settings.file_roots)
        self._hosts = HostPolicy.parse(settings.http_hosts)
        self._lock = threading.Lock()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Created on the loop thread by _client():
        self._session: aiohttp.ClientSession | None = None
        self._resolver: PublicOnlyResolver | None = None
        self._slots: asyncio.Semaphore | None = None

    def read_many(self, uris: Sequence[str]) -> list[bytes | Rejection]:
        """One result per uri, in order; fetched concurrently (at most settings.http_concurrency http fetches at once).

        Raises only for failures that are this machine's, not the event's
        (failures.is_transient: e.g. EMFILE, ENOSPC, MemoryError).
        """
        if self._closed:
            raise RuntimeError("ImageSources is closed")
        results: list[bytes | Rejection | None] = [None] * len(uris)
        files: list[tuple[int, str, Path]] = []
        fetches: list[tuple[int, str, yarl.URL]] = []
        for i, uri in enumerate(uris):
            try:
                target = self._target(uri)
            except Rejection as e:
                results[i] = e
                continue
            if isinstance(target, Path):
                files.append((i, uri, target))
            else:
                fetches.append((i, uri, target))
        pending = self._submit([(uri, url) for _, uri, url in fetches]) if fetches else None
        try:
            for i, uri, path in files:
                results[i] = self._read_file_or_rejection(uri, path)
            fetched = pending.result() if pending is not None else []
        except BaseException:
            if pending is not None:
                pending.cancel()
            raise
        for (i, _, _), result in zip(fetches, fetched):
            if isinstance(result, BaseException) and not isinstance(result, Rejection):
                raise result
            results[i] = result
        return results  # type: ignore[return-value]

    def read(self, uri: str) -> bytes:
        """The bytes at ``uri``; raises :class:`~indexer.failures.Rejection` if they cannot be used."""
        result = self.read_many([uri])[0]
        if isinstance(result, Rejection):
            raise result
        return result

    def close(self) -> None:
        """Close the http session and stop the loop thread; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._aclose(), loop).result(timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)

    # -- what a uri points at -------------------------------------------------------------

    def _target(self, uri: str) -> Path | yarl.URL:
        """The resolved file or the checked URL ``uri`` names, or a Rejection saying why not."""
        if not isinstance(uri, str) or not uri:
            raise refused("image_uri is empty")
        if _CONTROL.search(uri):
            raise refused(f"image_uri {quoted(uri)} contains control characters")
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018 -- raises ValueError for a port out of range
        except ValueError as e:
            raise refused(f"image_uri {quoted(uri)} cannot be parsed: {e}") from e
        if parts.scheme == "file":
            return self._file_path(uri, parts)
        if parts.scheme in ("http", "https"):
            return self._http_url(uri)
        raise refused(f"image_uri {quoted(uri)}: scheme {parts.scheme!r} is not supported ({', '.join(SCHEMES)})")

    def _file_path(self, uri: str, parts: SplitResult) -> Path:
        """The real path of a file URI, inside a root; symlinks and ``..`` are resolved before the check."""
        if parts.netloc not in ("", "localhost"):
            raise refused(f"file URI {quoted(uri)} with host {parts.netloc!r} is not allowed")
        if not self._roots:
            raise refused(f"file:// image_uri {quoted(uri)} refused: no images.file_roots are configured")
        raw = unquote_to_bytes(parts.path)
        if b"\x00" in raw:
            raise refused(f"image_uri {quoted(uri)} has a NUL byte in its path")
        if not raw.startswith(b"/"):
            raise refused(f"image_uri {quoted(uri)} is not an absolute path")
        path = Path(os.path.realpath(os.fsdecode(raw)))
        if not any(path.is_relative_to(root) for root in self._roots):
            raise refused(f"image_uri {quoted(uri)} is outside the configured file roots")
        return path

    def _http_url(self, uri: str) -> yarl.URL:
        """The URL aiohttp will request, once its host, port and (literal) address are allowed."""
        try:
            url = yarl.URL(uri)
            host, port = url.raw_host, url.port
            key = host_key(host) if host else None
        except ValueError as e:  # UnicodeError (IDNA) is a ValueError too
            raise refused(f"image_uri {quoted(uri)} cannot be parsed: {e}") from e
        if key is None or port is None:
            raise refused(f"image_uri {quoted(uri)} has no host")
        if not self._hosts.allows(key, port):
            shown = f"[{key}]" if ":" in key else key
            shown = f"{shown}:{url.explicit_port}" if url.explicit_port is not None else shown
            raise refused(f"image_uri {quoted(uri)}: host {shown!r} is not in images.http_hosts")
        if not self._settings.http_allow_private_addresses and is_ip(key) and not is_public(key):
            raise refused(f"image_uri {quoted(uri)}: address {key} is not a public address")
        return url

    # -- file:// ----------------------------------------------------------------------------

    def _read_file_or_rejection(self, uri: str, path: Path) -> bytes | Rejection:
        try:
            return self._read_file(uri, path)
        except Rejection as e:
            return e

    def _read_file(self, uri: str, path: Path) -> bytes:
        """A regular file's bytes; O_NONBLOCK so that opening a FIFO cannot hang the reader."""
        limit = self._settings.max_image_bytes
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_NOCTTY", 0))
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise refused(f"image_uri {quoted(uri)} is not a regular file")
                if info.st_size > limit:
                    raise failed(f"image_uri {quoted(uri)} is larger than {limit} bytes")
                return _read_fd(fd, limit, uri)
            finally:
                os.close(fd)
        except OSError as e:
            if is_transient(e):
                raise
            raise failed(f"cannot read image_uri {quoted(uri)}: {e.strerror or e}") from e

    # -- http(s):// -------------------------------------------------------------------------

    def _submit(self, fetches: list[tuple[str, yarl.URL]]) -> Future[list[bytes | BaseException]]:
        return asyncio.run_coroutine_threadsafe(self._fetch_all(fetches), self._running_loop())

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise RuntimeError("ImageSources is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_run_loop, args=(loop,), name="lookstream-image-sources", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def _client(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        """The session and the fetch slots, created on first use; only ever called on the loop thread."""
        if self._session is None or self._slots is None:
            settings = self._settings
            self._resolver = PublicOnlyResolver(DefaultResolver(), settings.http_allow_private_addresses)
            connector = aiohttp.TCPConnector(resolver=self._resolver, limit=settings.http_concurrency)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=settings.http_timeout_s),
                headers=_HEADERS,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
            self._slots = asyncio.Semaphore(settings.http_concurrency)
        return self._session, self._slots

    async def _aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()

    async def _fetch_all(self, fetches: list[tuple[str, yarl.URL]]) -> list[bytes | BaseException]:
        return await asyncio.gather(*(self._fetch(uri, url) for uri, url in fetches), return_exceptions=True)

    async def _fetch(self, uri: str, url: yarl.URL) -> bytes:
        """Up to ``http_attempts`` attempts, with doubling backoff between them for failures worth retrying."""
        attempts = self._settings.http_attempts
        retry: Retry | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                return await self._attempt(uri, url)
            except Retry as e:
                log.debug("image_uri %s: attempt %d of %d %s", quoted(uri), attempt + 1, attempts, e.what)
                retry = e
        summary = retry.summary(attempts) if retry is not None else "failed"
        raise failed(f"image_uri {quoted(uri)} {summary}")

    async def _attempt(self, uri: str, url: yarl.URL) -> bytes:
        session, slots = self._client()
        async with slots:
            try:
                async with session.get(url, allow_redirects=False) as response:
                    check_status(uri, response)
                    return await self._body(uri, response)
            except (Rejection, Retry):
                raise
            except Exception as e:
                if is_transient(e):
                    raise
                raise self._outcome(uri, url, e) from e

    async def _body(self, uri: str, response: aiohttp.ClientResponse) -> bytes:
        """The body, refused as soon as it is known to pass the cap; a short one is retried."""
        limit = self._settings.max_image_bytes
        expected = response.content_length
        if expected is not None and expected > limit:
            raise failed(f"image_uri {quoted(uri)} is larger than {limit} bytes (Content-Length {expected})")
        body = bytearray()
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            body += chunk
            if len(body) > limit:
                raise failed(f"image_uri {quoted(uri)} is larger than {limit} bytes")
        encoded = response.headers.get("Content-Encoding", "identity").lower() != "identity"
        if expected is not None and not encoded and len(body) < expected:
            raise Retry(f"sent {len(body)} of {expected} bytes")
        return bytes(body)

    def _outcome(self, uri: str, url: yarl.URL, error: Exception) -> Rejection | Retry:
        """What a failed attempt means: retry it, or reject the event (and which kind)."""
        if isinstance(error, TimeoutError):  # before OSError: TimeoutError is one
            return Retry(f"timed out after {self._settings.http_timeout_s:g} s", timed_out=True)
        if isinstance(error, aiohttp.ClientConnectorError) and isinstance(error.os_error, NotPublic | socket.gaierror):
            return self._dns_outcome(uri, url, error.os_error)  # aiohttp >= 3.11 raises ClientConnectorDNSError
        if isinstance(error, aiohttp.ClientSSLError | aiohttp.InvalidURL):
            return failed(f"cannot fetch image_uri {quoted(uri)}: {describe(error)}")
        if isinstance(error, aiohttp.ClientPayloadError):
            return Retry(f"sent a truncated body ({describe(error)})")
        if isinstance(error, aiohttp.ClientConnectorError):
            return Retry(f"could not be connected to: {error.os_error.strerror or describe(error.os_error)}")
        if isinstance(error, aiohttp.ClientConnectionError | OSError):
            return Retry(f"lost the connection: {describe(error)}")
        if not isinstance(error, aiohttp.ClientError):
            log.warning("unexpected error fetching image_uri %s", quoted(uri), exc_info=error)
        return failed(f"cannot fetch image_uri {quoted(uri)}: {describe(error)}")

    def _dns_outcome(self, uri: str, url: yarl.URL, cause: OSError) -> Rejection | Retry:
        if isinstance(cause, NotPublic):
            return refused(f"image_uri {quoted(uri)}: {cause}")
        if isinstance(cause, socket.gaierror) and cause.errno == socket.EAI_AGAIN:
            return Retry(f"could not be resolved: {describe(cause)}")
        return failed(f"cannot resolve the host of image_uri {quoted(uri)} ({url.raw_host}): {describe(cause)}")


# -- policy helpers ------------------------------------------------------------------------


@dataclass(frozen=True)
class HostPolicy:
    """``images.http_hosts``: hosts allowed on ports 80 and 443, and (host, port) pairs allowed exactly."""

    default_ports: frozenset[str]
    exact: frozenset[tuple[str, int]]

    @classmethod
    def parse(cls, entries: Sequence[str]) -> HostPolicy:
        """Entries are "host", "host:port", "[v6]", "[v6]:port" or a bare "v6"; a bad one raises ValueError."""
        default_ports: set[str] = set()
        exact: set[tuple[str, int]] = set()
        for entry in entries:
            host, port = _split_entry(entry)
            if port is None:
                default_ports.add(host)
            else:
                exact.add((host, port))
        return cls(frozenset(default_ports), frozenset(exact))

    def allows(self, host: str, port: int) -> bool:
        return (host, port) in self.exact or (host in self.default_ports and port in DEFAULT_PORTS)


def _split_entry(entry: str) -> tuple[str, int | None]:
    text = entry.strip()
    try:
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket:
                raise ValueError("no closing ']'")
            if rest and not rest.startswith(":"):
                raise ValueError("text after ']'")
            port = _entry_port(rest[1:]) if rest else None
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
            port = _entry_port(port_text)
        else:
            host, port = text, None
        raw = host if is_ip(host) else yarl.URL.build(scheme="http", host=host).raw_host
        return host_key(raw or ""), port
    except ValueError as e:
        raise ValueError(f"images.http_hosts entry {entry!r} is not 'host', 'host:port' or '[v6]:port': {e}") from e


def _entry_port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return port


def host_key(host: str) -> str:
    """How a host compares: an IP address in its canonical form, a name in lower case without a trailing dot."""
    if is_ip(host):
        return str(ipaddress.ip_address(host))
    name = host.lower().removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{host!r} is not a valid host name")
    if labels[-1].isdigit():
        raise ValueError(f"{host!r} is neither a host name nor a canonical IP address")
    return name


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_public(address: str) -> bool:
    """Globally routable, including any IPv4 address embedded in an IPv6 one (mapped, 6to4, NAT64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        nat64 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None
        return all(v4 is None or v4.is_global for v4 in (ip.ipv4_mapped, ip.sixtofour, nat64))
    return True


class NotPublic(OSError):
    """A host name resolved to an address that is not public; the connector reports it as a DNS failure."""


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's resolver, refusing a name when any of its addresses is not public.

    The connection is made to the addresses returned here (and cached by the connector),
    so what was checked is what is connected to: no window for DNS rebinding.
    aiohttp does not call a resolver for IP literals; :class:`ImageSources` checks those itself.
    """

    def __init__(self, inner: AbstractResolver, allow_private: bool = False) -> None:
        self._inner = inner
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        if not self._allow_private:
            for answer in answers:
                if not is_public(answer["host"]):
                    raise NotPublic(f"host {host!r} resolves to {answer['host']}, which is not a public address")
        return answers

    async def close(self) -> None:
        await self._inner.close()


class Retry(Exception):
    """An attempt failed in a way another attempt may not: a timeout, a 5xx, a dropped connection."""

    def __init__(self, what: str, timed_out: bool = False) -> None:
        super().__init__(what)
        self.what = what
        self.timed_out = timed_out

    def summary(self, attempts: int) -> str:
        count = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        return f"{self.what} ({count})" if self.timed_out else f"{self.what} after {count}"


def check_status(uri: str, response: aiohttp.ClientResponse) -> None:
    """2xx passes; a redirect is refused, a 5xx retried, anything else rejects the event."""
    status = response.status
    if 200 <= status < 300:
        return
    location = response.headers.get("Location")
    if 300 <= status < 400 and location:
        raise refused(f"image_uri {quoted(uri)} redirects to {quoted(location)}; redirects are not followed")
    if status >= 500:
        raise Retry(f"answered {status}")
    raise failed(f"image_uri {quoted(uri)} answered {status}")


def _read_fd(fd: int, limit: int, uri: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, min(CHUNK_BYTES * 16, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:  # the file grew since fstat
            raise failed(f"image_uri {quoted(uri)} is larger than {limit} bytes")
    return b"".join(chunks)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The loop thread: run until stopped, then release what the loop still holds."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def quoted(uri: str) -> str:
    """``uri`` quoted for a message, cut to its first MAX_QUOTED_URI characters."""
    return repr(uri if len(uri) <= MAX_QUOTED_URI else uri[:MAX_QUOTED_URI] + "…")


def refused(detail: str) -> Rejection:
    return Rejection(Reason.IMAGE_URI_REFUSED, detail)


def failed(detail: str) -> Rejection:
    return Rejection(Reason.IMAGE_FETCH_FAILED, detail)
