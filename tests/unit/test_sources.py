"""indexer.sources: what an image_uri may reach, and how fetches fail, retry and stay bounded.

HTTP cases run against a real aiohttp server on loopback, so they allow private addresses;
the tests of the address rule itself do not. ``read_many`` blocks, so async tests call it
through an executor: the test's loop also runs the server.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from indexer import sources as sources_module
from indexer.config import ImageSettings
from indexer.failures import Reason, Rejection, is_transient
from indexer.sources import ImageSources, PublicOnlyResolver
from tests.support.imagegen import encoded, product_image

REFUSED = Reason.IMAGE_URI_REFUSED
FAILED = Reason.IMAGE_FETCH_FAILED
JPEG = encoded(product_image(1))
CAP = 4096


@pytest.fixture
def make_sources():
    """ImageSources for a test, closed after it; loopback is allowed unless a test says otherwise."""
    made: list[ImageSources] = []

    def make(**fields) -> ImageSources:
        made.append(ImageSources(ImageSettings(**{"http_allow_private_addresses": True, **fields})))
        return made[-1]

    yield make
    for sources in made:
        sources.close()


async def read_all(sources: ImageSources, uris: list[str]) -> list[bytes | Rejection]:
    return await asyncio.get_running_loop().run_in_executor(None, sources.read_many, uris)


async def read_one(sources: ImageSources, uri: str) -> bytes | Rejection:
    return (await read_all(sources, [uri]))[0]


def rejection(result: bytes | Rejection, kind: Reason, match: str) -> Rejection:
    assert isinstance(result, Rejection), result[:50] if isinstance(result, bytes) else result
    assert result.kind == kind, result.detail
    assert match in result.detail, result.detail
    return result


def refusal(sources: ImageSources, uri: str) -> Rejection:
    """The Rejection ``read`` raises for ``uri``; nothing else may be raised."""
    with pytest.raises(Rejection) as info:
        sources.read(uri)
    return info.value


# -- file:// ------------------------------------------------------------------------------------


def test_file_uri_inside_roots_is_read(tmp_path, make_sources):
    (tmp_path / "a.jpg").write_bytes(JPEG)
    sources = make_sources(file_roots=(tmp_path,))
    assert sources.read((tmp_path / "a.jpg").as_uri()) == JPEG
    assert sources.read(f"file://localhost{tmp_path}/a.jpg") == JPEG


@pytest.mark.parametrize(
    ("uri", "kind", "reason"),
    [
        ("file:///etc/passwd", REFUSED, "outside the configured file roots"),
        ("{root}/../../etc/passwd", REFUSED, "outside the configured file roots"),
        ("{root}/sub/../../etc/passwd", REFUSED, "outside the configured file roots"),
        ("http://example.com/a.jpg", REFUSED, "host 'example.com' is not in images.http_hosts"),
        ("http://169.254.169.254/latest/meta-data", REFUSED, "host '169.254.169.254' is not in images.http_hosts"),
        ("gopher://example.com/a.jpg", REFUSED, "scheme 'gopher' is not supported (file, http, https)"),
        ("ftp://example.com/a.jpg", REFUSED, "scheme 'ftp' is not supported"),
        ("file://otherhost/a.jpg", REFUSED, "with host 'otherhost' is not allowed"),
        ("file:relative/a.jpg", REFUSED, "not an absolute path"),
        ("{root}/missing.jpg", FAILED, "cannot read image_uri"),
        ("{root}/a%00.jpg", REFUSED, "NUL byte"),
    ],
)
def test_uris_outside_the_policy_or_unreadable_are_rejected(tmp_path, make_sources, uri, kind, reason):
    (tmp_path / "a.jpg").write_bytes(JPEG)
    uri = uri.format(root=tmp_path.as_uri())
    error = refusal(make_sources(file_roots=(tmp_path,)), uri)
    assert error.kind == kind and reason in error.detail, error.detail
    if kind == FAILED:
        assert "No such file or directory" in error.detail


def test_symlink_out_of_roots_is_refused(tmp_path, make_sources):
    (tmp_path / "link.jpg").symlink_to("/etc/hostname")
    error = refusal(make_sources(file_roots=(tmp_path,)), (tmp_path / "link.jpg").as_uri())
    assert error.kind == REFUSED and "outside" in error.detail


def test_roots_are_resolved_too(tmp_path, make_sources):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.jpg").write_bytes(JPEG)
    (tmp_path / "alias").symlink_to(real)
    sources = make_sources(file_roots=(tmp_path / "alias",))
    assert sources.read((real / "a.jpg").as_uri()) == JPEG
    assert sources.read((tmp_path / "alias" / "a.jpg").as_uri()) == JPEG


def test_no_roots_refuses_every_file_uri(tmp_path, make_sources):
    (tmp_path / "a.jpg").write_bytes(JPEG)
    error = refusal(make_sources(), (tmp_path / "a.jpg").as_uri())
    assert error.kind == REFUSED and "no images.file_roots are configured" in error.detail


@pytest.mark.timeout(10)
def test_only_regular_files_are_read(tmp_path, make_sources):
    os.mkfifo(tmp_path / "fifo.jpg")  # opening it for reading without O_NONBLOCK would wait for a writer
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "dev").symlink_to("/dev")  # a root through a symlink: /dev/zero is inside it
    sources = make_sources(file_roots=(tmp_path, tmp_path / "dev"))
    for path in (tmp_path / "fifo.jpg", tmp_path / "folder.jpg", tmp_path / "dev" / "zero"):
        error = refusal(sources, path.as_uri())
        assert error.kind == REFUSED and "not a regular file" in error.detail, error.detail


def test_file_larger_than_the_cap_is_rejected(tmp_path, make_sources):
    (tmp_path / "big.jpg").write_bytes(b"x" * (CAP + 1))
    (tmp_path / "fits.jpg").write_bytes(b"x" * CAP)
    sources = make_sources(file_roots=(tmp_path,), max_image_bytes=CAP)
    error = refusal(sources, (tmp_path / "big.jpg").as_uri())
    assert error.kind == FAILED and f"larger than {CAP} bytes" in error.detail
    assert sources.read((tmp_path / "fits.jpg").as_uri()) == b"x" * CAP


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_rejected_with_the_reason(tmp_path, make_sources):
    (tmp_path / "secret.jpg").write_bytes(JPEG)
    (tmp_path / "secret.jpg").chmod(0)
    error = refusal(make_sources(file_roots=(tmp_path,)), (tmp_path / "secret.jpg").as_uri())
    assert error.kind == FAILED and "Permission denied" in error.detail


@pytest.mark.parametrize("number", [errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EIO, errno.ENOMEM])
def test_machine_errors_reading_a_file_are_raised_not_rejected(tmp_path, make_sources, monkeypatch, number):
    (tmp_path / "a.jpg").write_bytes(JPEG)
    sources = make_sources(file_roots=(tmp_path,))

    def broken_open(*args, **kwargs):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(sources_module.os, "open", broken_open)
    with pytest.raises(OSError) as info:
        sources.read_many([(tmp_path / "a.jpg").as_uri()])
    assert info.value.errno == number and is_transient(info.value)


# -- parsing and the host rules (no request is made) -------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "http://a:99999/x.jpg",  # urllib's .port raises ValueError
        "https://[::1/x",  # urlsplit raises ValueError
        "http://xn--/x.jpg",  # not IDNA
        "http://xn--a-ecp.ru/x.jpg",
        "http://exa mple.com/x.jpg",
        "http://example.com\\@evil.com/x.jpg",
        "http://a..b/x.jpg",
        "http:///x.jpg",
        "",
        "http://example.com/\r\nX-Injected: 1",
        "http://exa\x00mple.com/x.jpg",
        "file:///tmp/a\x01.jpg",
        "\x7f",
    ],
)
def test_unparseable_uris_are_refused_and_nothing_else(make_sources, tmp_path, uri):
    sources = make_sources(file_roots=(tmp_path,), http_hosts=("example.com", "a"))
    assert refusal(sources, uri).kind == REFUSED


@pytest.mark.parametrize(
    ("entries", "uri", "allowed"),
    [
        (("127.0.0.1",), "http://127.0.0.1/x.jpg", True),
        (("127.0.0.1",), "https://127.0.0.1/x.jpg", True),
        (("127.0.0.1",), "http://127.0.0.1:80/x.jpg", True),
        (("127.0.0.1",), "http://127.0.0.1:8080/x.jpg", False),
        (("127.0.0.1:8080",), "http://127.0.0.1:8080/x.jpg", True),
        (("127.0.0.1:8080",), "http://127.0.0.1/x.jpg", False),
        (("127.0.0.1:8080",), "http://127.0.0.1:8081/x.jpg", False),
        (("[::1]:8080",), "http://[::1]:8080/x.jpg", True),
        (("[::1]:8080",), "http://[::1]/x.jpg", False),
        (("::1",), "http://[::1]/x.jpg", True),
        (("::1",), "http://[::1]:8080/x.jpg", False),
        (("[::1]",), "https://[0:0::1]/x.jpg", True),
        (("::ffff:127.0.0.1",), "http://[::ffff:127.0.0.1]/x.jpg", True),
        (("LocalHost",), "http://LOCALHOST/x.jpg", True),
        (("localhost:8080",), "http://localhost:8080/x.jpg", True),
        (("localhost",), "http://localhost.example.com/x.jpg", False),
        (("example.com",), "http://other.example.com/x.jpg", False),
    ],
)
def test_host_entries_allow_exactly_their_ports(make_sources, entries, uri, allowed):
    # Loopback is refused here, and only after the host passed: that refusal says it was allowed.
    error = refusal(make_sources(http_hosts=entries, http_allow_private_addresses=False), uri)
    assert error.kind == REFUSED
    expected = "not a public address" if allowed else "is not in images.http_hosts"
    assert expected in error.detail, error.detail


@pytest.mark.parametrize("entry", ["[::1", "host:port", "example.com:0", "a b", "[::1]x"])
def test_malformed_host_entries_fail_at_start(entry):
    with pytest.raises(ValueError, match=r"images\.http_hosts entry"):
        ImageSources(ImageSettings(http_hosts=(entry,)))


def test_long_uris_are_cut_short_in_messages(make_sources):
    error = refusal(make_sources(), "http://example.com/" + "a" * 10_000)
    assert "not in images.http_hosts" in error.detail and "…" in error.detail
    assert len(error.detail) < 400


# -- addresses ----------------------------------------------------------------------------------


class FakeResolver(AbstractResolver):
    """Answers from a table: host name -> addresses, or an exception to raise."""

    def __init__(self, answers: dict[str, list[str] | BaseException]) -> None:
        self.answers = answers

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        answer = self.answers[host]
        if isinstance(answer, BaseException):
            raise answer
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        return [
            ResolveResult(
                hostname=host,
                host=a,
                port=port,
                family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                proto=0,
                flags=flags,
            )
            for a in answer
        ]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "answers",
    [
        ["93.184.215.14", "10.0.0.7"],
        ["93.184.215.14", "169.254.169.254"],
        ["2606:2800:21f:cb07:6820:80da:af6b:8b2c", "::1"],
        ["::ffff:127.0.0.1"],
        ["64:ff9b::a00:1"],  # NAT64 of 10.0.0.1
        ["0.0.0.0"],
        ["fe80::1%eth0"],
    ],
)
async def test_a_name_with_any_non_public_address_is_refused(answers):
    resolver = PublicOnlyResolver(FakeResolver({"images.example": answers}))
    with pytest.raises(OSError, match="not a public address"):
        await resolver.resolve("images.example", 80)
    allowing = PublicOnlyResolver(FakeResolver({"images.example": answers}), allow_private=True)
    assert [a["host"] for a in await allowing.resolve("images.example", 80)] == answers


async def test_public_answers_pass_through_unchanged():
    answers = ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    resolver = PublicOnlyResolver(FakeResolver({"images.example": answers}))
    assert [a["host"] for a in await resolver.resolve("images.example", 443)] == answers


# -- http(s):// against a local server -------------------------------------------------------


@dataclass
class Host:
    port: int
    hits: Counter = field(default_factory=Counter)
    accept: list[str] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0

    @property
    def netloc(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, path: str) -> str:
        return f"http://{self.netloc}{path}"


@pytest.fixture
async def host(aiohttp_server) -> Host:
    state = Host(port=0)

    @web.middleware
    async def count(request, handler):
        state.hits[request.path] += 1
        state.accept.append(request.headers.get("Accept", ""))
        return await handler(request)

    async def image(request):
        return web.Response(body=JPEG, content_type="image/jpeg")

    async def moved(request):
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data")

    async def flaky(request):
        if state.hits[request.path] == 1:
            raise web.HTTPServiceUnavailable()
        return web.Response(body=JPEG, content_type="image/jpeg")

    async def down(request):
        raise web.HTTPServiceUnavailable()

    async def big(request):
        return web.Response(body=b"x" * (CAP + 1), content_type="image/jpeg")

    async def big_stream(request):  # chunked: no Content-Length to refuse early on
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"x" * 1024)
        return response

    async def slow(request):  # one byte every 50 ms: each read is quick, the whole is not
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.content_length = 1000
        await response.prepare(request)
        try:
            for _ in range(1000):
                await response.write(b"x")
                await asyncio.sleep(0.05)
        except ConnectionError:
            pass
        return response

    async def cut(request):  # promises 5000 bytes, sends 100, hangs up
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.content_length = 5000
        await response.prepare(request)
        await response.write(b"x" * 100)
        request.transport.close()
        return response

    async def sleepy(request):
        state.in_flight += 1
        state.most_in_flight = max(state.most_in_flight, state.in_flight)
        try:
            await asyncio.sleep(0.3)
        finally:
            state.in_flight -= 1
        return web.Response(body=JPEG, content_type="image/jpeg")

    app = web.Application(middlewares=[count])
    for path, handler in {
        "/a.jpg": image,
        "/moved.jpg": moved,
        "/flaky.jpg": flaky,
        "/down.jpg": down,
        "/big.jpg": big,
        "/big-stream.jpg": big_stream,
        "/slow.jpg": slow,
        "/cut.jpg": cut,
        "/sleepy.jpg": sleepy,
    }.items():
        app.router.add_get(path, handler)
    server = await aiohttp_server(app)
    state.port = server.port
    return state


async def test_an_image_from_an_allowed_host_is_fetched_asking_for_images(host, make_sources):
    sources = make_sources(http_hosts=(host.netloc,))
    assert await read_one(sources, host.uri("/a.jpg")) == JPEG
    assert host.accept == ["image/*"]


@pytest.mark.parametrize(
    ("path", "kind", "reason", "hits"),
    [
        (
            "/moved.jpg",
            REFUSED,
            "redirects to 'http://169.254.169.254/latest/meta-data'; redirects are not followed",
            1,
        ),
        ("/missing.jpg", FAILED, "answered 404", 1),  # 4xx: not retried
        ("/big.jpg", FAILED, f"larger than {CAP} bytes", 1),
        ("/big-stream.jpg", FAILED, f"larger than {CAP} bytes", 1),
        ("/down.jpg", FAILED, "answered 503 after 3 attempts", 3),
    ],
)
async def test_http_failures_say_why(host, make_sources, path, kind, reason, hits):
    sources = make_sources(http_hosts=(host.netloc,), max_image_bytes=CAP, http_attempts=3)
    rejection(await read_one(sources, host.uri(path)), kind, reason)
    assert host.hits[path] == hits
    assert "169.254.169.254" not in "".join(host.hits)


async def test_a_5xx_is_retried(host, make_sources):
    sources = make_sources(http_hosts=(host.netloc,), http_attempts=2)
    assert await read_one(sources, host.uri("/flaky.jpg")) == JPEG
    assert host.hits["/flaky.jpg"] == 2


async def test_a_trickling_body_fails_at_the_deadline(host, make_sources):
    sources = make_sources(http_hosts=(host.netloc,), http_timeout_s=0.5, http_attempts=2)
    started = time.monotonic()
    rejection(await read_one(sources, host.uri("/slow.jpg")), FAILED, "timed out after 0.5 s (2 attempts)")
    assert time.monotonic() - started < 3
    assert host.hits["/slow.jpg"] == 2


async def test_a_truncated_body_is_retried_then_rejected(host, make_sources):
    sources = make_sources(http_hosts=(host.netloc,), http_attempts=2)
    rejection(await read_one(sources, host.uri("/cut.jpg")), FAILED, "truncated body")
    assert host.hits["/cut.jpg"] == 2


async def test_a_refused_connection_is_retried_then_rejected(make_sources):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sources = make_sources(http_hosts=(f"127.0.0.1:{port}",), http_attempts=2)
    rejection(await read_one(sources, f"http://127.0.0.1:{port}/a.jpg"), FAILED, "after 2 attempts")


async def test_fetches_run_concurrently(host, make_sources):
    sources = make_sources(http_hosts=(host.netloc,), http_concurrency=8)
    started = time.monotonic()
    assert await read_all(sources, [host.uri("/sleepy.jpg")] * 8) == [JPEG] * 8
    assert time.monotonic() - started < 8 * 0.3 / 2
    assert host.most_in_flight > 1


async def test_concurrency_is_capped(host, make_sources):
    sources = make_sources(http_hosts=(host.netloc,), http_concurrency=2)
    assert await read_all(sources, [host.uri("/sleepy.jpg")] * 5) == [JPEG] * 5
    assert host.most_in_flight == 2


async def test_results_keep_the_order_of_the_uris(host, make_sources, tmp_path):
    (tmp_path / "b.jpg").write_bytes(b"file bytes")
    sources = make_sources(http_hosts=(host.netloc,), file_roots=(tmp_path,))
    uris = [
        host.uri("/sleepy.jpg"),
        (tmp_path / "b.jpg").as_uri(),
        "gopher://example.com/a.jpg",
        host.uri("/missing.jpg"),
        host.uri("/a.jpg"),
        (tmp_path / "missing.jpg").as_uri(),
    ]
    results = await read_all(sources, uris)
    assert results[0] == JPEG and results[1] == b"file bytes" and results[4] == JPEG
    rejection(results[2], REFUSED, "scheme 'gopher'")
    rejection(results[3], FAILED, "answered 404")
    rejection(results[5], FAILED, "cannot read")


async def test_loopback_is_refused_without_private_addresses(host, make_sources):
    entries = (host.netloc, f"[::1]:{host.port}", f"[::ffff:127.0.0.1]:{host.port}", f"localhost:{host.port}")
    sources = make_sources(http_hosts=entries, http_allow_private_addresses=False)
    uris = [f"http://{netloc}/a.jpg" for netloc in entries]
    for result in await read_all(sources, uris):
        rejection(result, REFUSED, "not a public address")
    assert not host.hits


async def test_connections_go_to_the_addresses_the_resolver_checked(host, make_sources, monkeypatch):
    monkeypatch.setattr(sources_module, "DefaultResolver", lambda: FakeResolver({"images.test": ["127.0.0.1"]}))
    uri = f"http://images.test:{host.port}/a.jpg"
    allowing = make_sources(http_hosts=(f"images.test:{host.port}",))
    assert await read_one(allowing, uri) == JPEG
    refusing = make_sources(http_hosts=(f"images.test:{host.port}",), http_allow_private_addresses=False)
    rejection(await read_one(refusing, uri), REFUSED, "host 'images.test' resolves to 127.0.0.1")
    assert host.hits["/a.jpg"] == 1


async def test_machine_errors_while_fetching_are_raised_not_rejected(make_sources, monkeypatch):
    too_many = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    monkeypatch.setattr(sources_module, "DefaultResolver", lambda: FakeResolver({"images.test": too_many}))
    sources = make_sources(http_hosts=("images.test",))
    with pytest.raises(OSError) as info:
        await read_all(sources, ["http://images.test/a.jpg"])
    assert is_transient(info.value)


# -- lifecycle ---------------------------------------------------------------------------------


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lookstream-image-sources"]


async def test_close_stops_the_loop_thread_and_is_idempotent(host):
    before = len(loop_threads())
    sources = ImageSources(ImageSettings(http_hosts=(host.netloc,), http_allow_private_addresses=True))
    assert len(loop_threads()) == before  # nothing started until an http fetch
    assert await read_one(sources, host.uri("/a.jpg")) == JPEG
    assert len(loop_threads()) == before + 1
    sources.close()
    sources.close()
    assert len(loop_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        sources.read(host.uri("/a.jpg"))


def test_close_without_any_fetch(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    sources = ImageSources(ImageSettings(file_roots=(tmp_path,)))
    assert sources.read((tmp_path / "a.jpg").as_uri()) == b"x"
    sources.close()
    sources.close()
