"""Issue 10 points 8 and 16: what one client can hold of the HTTP layer, through real sockets.

Every test starts the real server (a subprocess) with short limits in its config
(``http_header_timeout`` and friends, transports/http_limits.py) and attacks it the way the issue's
findings did: sockets that send nothing, headers or bodies trickled a byte at a time, huge
headers, a full connection pool, a low open-file limit, absurd Content-Lengths and malformed
requests. Each test then checks what a normal client gets (a login over BOSH and over
WebSocket, in bounded time) and what the log says (one WARNING/INFO line per kind of
limit, never a traceback).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import re
import resource
import select
import socket
import subprocess
import time

import gevent
import pytest
import requests

import harness
from harness import NS_BOSH, BoshClient, ServerProcess, WsClient

SHORT = {"http_header_timeout": 1.5, "http_body_timeout": 1.5, "http_keepalive_timeout": 1.5}
SLACK = 1.5   # sweeper tick (timeout / 4) + scheduling on a shared 2-core machine


# -- raw-socket helpers --------------------------------------------------------------------


def connect(server, source: str | None = None, blocking: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if source:
        sock.bind((source, 0))
    if blocking:
        sock.settimeout(5)
        sock.connect(("127.0.0.1", server.port))
    else:
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", server.port))
        assert err in (0, errno.EINPROGRESS), err
    return sock


def idle_sockets(server, count: int) -> list[socket.socket]:
    """``count`` connections that send nothing (connects left in flight when the backlog is full)."""
    socks = [connect(server, blocking=False) for _ in range(count)]
    gevent.sleep(0.5)
    return socks


def closed_by_server(sock: socket.socket) -> bool:
    """Has the server closed this connection (EOF or reset pending, after any response)?"""
    try:
        while True:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            if not sock.recv(65536):
                return True
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def wait_all_closed(socks, timeout: float) -> float:
    """Seconds until every socket was closed by the server; fails after ``timeout``."""
    started = time.monotonic()
    pending = list(socks)
    while pending:
        pending = [s for s in pending if not closed_by_server(s)]
        if not pending:
            break
        assert time.monotonic() - started < timeout, f"{len(pending)} of {len(socks)} still open after {timeout} s"
        gevent.sleep(0.05)
    return time.monotonic() - started


def close_all(socks) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int | None, bytes, bool]:
    """(status, raw bytes, closed): reads until the server closes or ``timeout``."""
    sock.setblocking(True)
    sock.settimeout(0.2)
    data = b""
    deadline = time.monotonic() + timeout
    closed = False
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            if b"\r\n\r\n" in data and _complete(data):
                break
            continue
        except OSError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return (int(match.group(1)) if match else None), data, closed


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    return match is not None and len(body) >= int(match.group(1))


def exchange(server, raw: bytes, timeout: float = 5.0) -> tuple[int | None, bytes, bool, float]:
    sock = connect(server)
    started = time.monotonic()
    try:
        sock.sendall(raw)
        status, data, closed = read_response(sock, timeout)
        if not closed:
            closed = _wait_eof(sock, 1.0)
        return status, data, closed, time.monotonic() - started
    finally:
        sock.close()


def _wait_eof(sock, timeout) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if closed_by_server(sock):
            return True
        gevent.sleep(0.02)
    return False


def log_lines(server, text: str) -> list[str]:
    return [line for line in server.log().splitlines() if text in line]


def wait_log(server, text: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = log_lines(server, text)
        if lines or time.monotonic() > deadline:
            return lines
        gevent.sleep(0.1)


def assert_no_traceback(server) -> None:
    log = server.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]


def timed_logins(server) -> dict[str, float]:
    """Seconds a complete login (SASL, bind, roster) takes over BOSH and over WebSocket."""
    took = {}
    for kind in ("bosh", "websocket"):
        started = time.monotonic()
        client = BoshClient(server.bosh_url, wait=5) if kind == "bosh" else WsClient(server.ws_url)
        try:
            client.login("alice", resource=kind)
            assert client.get_roster().get("type") == "result"
            took[kind] = time.monotonic() - started
        finally:
            client.stop()
    return took


def bosh_create(server, wait: int = 5) -> dict:
    body = (f"<body xmlns='{NS_BOSH}' rid='1000' to='localhost' wait='{wait}' hold='1' ver='1.6' "
            f"xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>")
    reply = requests.post(server.bosh_url, data=body, timeout=10)
    assert reply.status_code == 200
    return reply


@contextlib.contextmanager
def open_file_limit(soft: int, hard: int):
    """Servers started inside run with RLIMIT_NOFILE = (soft, hard) (set in the child only)."""
    real = subprocess.Popen

    def limited():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    harness.subprocess.Popen = functools.partial(real, preexec_fn=limited)
    try:
        yield
    finally:
        harness.subprocess.Popen = real


# -- point 8: idle and slow connections ---------------------------------------------------------


def test_sockets_that_send_nothing_are_closed_after_the_header_timeout(make_server):
    server = make_server(**SHORT)
    socks = idle_sockets(server, 200)
    try:
        took = wait_all_closed(socks, SHORT["http_header_timeout"] + SLACK)
        assert took >= SHORT["http_header_timeout"] - 0.6, took   # not before the timeout
    finally:
        close_all(socks)
    assert wait_log(server, "(http_header_timeout): 199 more time(s), from 127.0.0.1 ×199")  # summed up
    lines = log_lines(server, "no complete request headers within 1.5 s (http_header_timeout)")
    assert len(lines) == 2 and all(" WARNING " in line for line in lines), lines  # not 200 lines
    assert max(timed_logins(server).values()) < 2.0
    assert_no_traceback(server)


def test_slowloris_headers_are_cut_at_the_header_timeout(make_server):
    """20 clients send their headers one byte every 0.2 s, for ever: each is answered 408 and
    closed once http_header_timeout has passed since it connected."""
    server = make_server(**SHORT)
    socks = [connect(server) for _ in range(20)]
    for sock in socks:
        sock.sendall(b"POST /http-bind HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    started = time.monotonic()
    statuses = {}
    try:
        while len(statuses) < len(socks):
            assert time.monotonic() - started < SHORT["http_header_timeout"] + SLACK, statuses
            for index, sock in enumerate(socks):
                if index in statuses:
                    continue
                try:
                    sock.sendall(b"a")
                except OSError:
                    statuses[index] = "reset"
                    continue
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    status, _, closed = read_response(sock, 1.0)
                    assert closed
                    statuses[index] = status
            gevent.sleep(0.2)
        assert time.monotonic() - started >= SHORT["http_header_timeout"] - 0.6
    finally:
        close_all(socks)
    assert set(statuses.values()) <= {408, "reset"} and 408 in statuses.values(), statuses
    assert wait_log(server, "no complete request headers within 1.5 s")
    assert_no_traceback(server)


@pytest.mark.parametrize("path", ["/http-bind", "/roster_admin/refresh"])
def test_slow_bodies_are_cut_at_the_body_timeout(make_server, path):
    server = make_server(**SHORT)
    socks = [connect(server) for _ in range(20)]
    for sock in socks:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n<body".encode())
    started = time.monotonic()
    closed = set()
    try:
        while len(closed) < len(socks):
            assert time.monotonic() - started < SHORT["http_body_timeout"] + SLACK, len(closed)
            for index, sock in enumerate(socks):
                if index not in closed:
                    try:
                        sock.sendall(b" ")
                    except OSError:
                        closed.add(index)
                        continue
                    if closed_by_server(sock):
                        closed.add(index)
            gevent.sleep(0.2)
        assert time.monotonic() - started >= SHORT["http_body_timeout"] - 0.6
    finally:
        close_all(socks)
    assert wait_log(server, "request body not complete within 1.5 s (http_body_timeout)")
    assert max(timed_logins(server).values()) < 2.0
    assert_no_traceback(server)


def test_headers_stalled_midway_and_6_mb_of_headers(make_server):
    """10 connections stall inside their headers (16 KB sent, then nothing): closed by the
    header timeout; 10 more send 6 MB of headers: refused with 431 once over 32 KB."""
    server = make_server(**SHORT)
    stalled = [connect(server) for _ in range(10)]
    for sock in stalled:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"X-Pad: " + b"p" * 4000 + b"\r\n" * 1)
        sock.sendall(b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 4000) for i in range(3)))
    try:
        for _ in range(10):
            sock = connect(server)
            try:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
                sent = 0
                with contextlib.suppress(OSError):
                    while sent < 6_000_000:
                        sock.sendall(b"X-Big-%d: %s\r\n" % (sent, b"b" * 7000))
                        sent += 7000
                status, data, closed = read_response(sock, 3.0)
                assert status == 431 and closed, data[:200]   # (what was sent sat in socket buffers)
            finally:
                sock.close()
        wait_all_closed(stalled, SHORT["http_header_timeout"] + SLACK)
    finally:
        close_all(stalled)
    assert wait_log(server, "request refused (431): request headers over 32768 bytes")
    assert wait_log(server, "no complete request headers within 1.5 s")
    assert_no_traceback(server)


def test_kept_alive_connection_closes_when_idle_but_held_requests_are_not_cut(make_server):
    """Idle keep-alive ends after http_keepalive_timeout; a BOSH request held by the app for
    3 s (longer than every HTTP timeout) is answered normally, on a connection that then stays
    usable for the next request."""
    server = make_server(bosh_max_wait=3, **SHORT)
    idle = connect(server)
    idle.sendall(b"GET /http-bind HTTP/1.1\r\nHost: localhost\r\n\r\n")
    status, _, closed = read_response(idle, 2.0)
    assert status == 200 and not closed
    started = time.monotonic()
    try:
        took = wait_all_closed([idle], SHORT["http_keepalive_timeout"] + SLACK)
        assert took >= SHORT["http_keepalive_timeout"] - 0.6
    finally:
        idle.close()

    http = requests.Session()
    created = http.post(server.bosh_url, data=(f"<body xmlns='{NS_BOSH}' rid='10' to='localhost' wait='3' hold='1' "
                                               f"ver='1.6' xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>"), timeout=10)
    sid = re.search(rb"sid=['\"]([^'\"]+)", created.content).group(1).decode()
    for rid in (11, 12):   # two held requests in a row on the same kept-alive connection
        started = time.monotonic()
        held = http.post(server.bosh_url, data=f"<body xmlns='{NS_BOSH}' rid='{rid}' sid='{sid}'/>", timeout=10)
        assert held.status_code == 200 and b"terminate" not in held.content, held.content
        assert 1.8 < time.monotonic() - started < 3.5
    http.close()
    assert not log_lines(server, "http_body_timeout") and not log_lines(server, "http_header_timeout")
    assert_no_traceback(server)


def test_header_size_caps(make_server):
    server = make_server()
    ok_line = b"GET /http-bind HTTP/1.1\r\nHost: localhost\r\nCookie: " + b"c" * 8000 + b"\r\nConnection: close\r\n\r\n"
    assert exchange(server, ok_line)[0] == 200
    ok_total = (b"GET /http-bind HTTP/1.1\r\nHost: localhost\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 7000) for i in range(4))
                + b"Connection: close\r\n\r\n")
    assert exchange(server, ok_total)[0] == 200
    cases = {
        "line": b"GET / HTTP/1.1\r\nHost: localhost\r\nCookie: " + b"c" * 8200 + b"\r\n\r\n",
        "total": b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 7000) for i in range(5)) + b"\r\n",
        "count": b"GET / HTTP/1.1\r\nHost: localhost\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n",
    }
    for name, raw in cases.items():
        status, data, closed, took = exchange(server, raw)
        assert status == 431 and closed and took < 1.0, (name, data[:200])
    assert exchange(server, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")[0] == 414
    assert wait_log(server, "a header line over 8192 bytes")
    assert wait_log(server, "more than 100 header lines")
    assert wait_log(server, "request line over 8192 bytes refused (414)")
    assert_no_traceback(server)


def test_connections_per_address_are_capped_but_loopback_is_exempt_by_default(make_server):
    capped = make_server(http_max_connections_per_address=5, http_connection_limit_exempt=[], trusted_proxies=[])
    held = [connect(capped) for _ in range(5)]
    try:
        gevent.sleep(0.3)
        over = connect(capped)
        status, data, closed = read_response(over, 2.0)
        over.close()
        assert status == 503 and closed, data
        assert wait_log(capped, "connection refused: 5 open from this address (http_max_connections_per_address = 5)")
        held.pop().close()
        gevent.sleep(0.3)
        assert exchange(capped, b"GET /http-bind HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")[0] == 200
    finally:
        close_all(held)

    exempt = make_server(http_max_connections_per_address=5)   # 127.0.0.0/8 exempt by default
    many = [connect(exempt) for _ in range(20)]
    try:
        for sock in many:
            sock.sendall(b"GET /http-bind HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert all(read_response(sock, 3.0)[0] == 200 for sock in many)
    finally:
        close_all(many)
    assert not log_lines(exempt, "http_max_connections_per_address")
    assert_no_traceback(capped)
    assert_no_traceback(exempt)


def test_a_full_pool_of_idle_sockets_does_not_lock_logins_out(make_server):
    """max_connections = 300 and 300 sockets that send nothing: a login over BOSH and over
    WebSocket still succeeds within 2 s (idle connections make room, as nginx's reusable
    connections do), and the idle ones that remain are closed at the header timeout. A
    logged-in BOSH user with a held request is never one of those closed."""
    server = make_server(max_connections=300, http_header_timeout=4.0, bosh_max_wait=5)
    bob = BoshClient(server.bosh_url, wait=5)
    bob.login("bob")
    socks = idle_sockets(server, 300)
    try:
        took = timed_logins(server)
        assert max(took.values()) < 2.0, took
        assert wait_log(server, "connection pool full (max_connections = 300)")
        wait_all_closed(socks, 4.0 + SLACK + 1)
        assert bob.get_roster().get("type") == "result"   # bob's connections survived
        assert bob.terminated is None, bob.closed_reason
        assert max(timed_logins(server).values()) < 2.0
    finally:
        close_all(socks)
        bob.stop()
    assert_no_traceback(server)


def test_pool_full_of_idle_sockets_closes_them_at_the_timeout(make_server):
    """The done-when figure for max_connections = 300: 300 idle sockets are all closed by the
    (shortened) header timeout, then logins succeed."""
    server = make_server(max_connections=300, **SHORT)
    socks = idle_sockets(server, 300)
    try:
        wait_all_closed(socks, SHORT["http_header_timeout"] + SLACK)
        assert max(timed_logins(server).values()) < 2.0
    finally:
        close_all(socks)
    assert_no_traceback(server)


@pytest.mark.parametrize("soft,hard", [(1024, 1024), (1024, None)], ids=["hard-1024", "soft-1024"])
def test_2000_idle_sockets_under_a_low_open_file_limit(make_server, soft, hard):
    """2,000 sockets that send nothing, with the default max_connections (20,000): a login
    over BOSH and over WebSocket each succeeds within 2 s. With the hard limit at 1,024 the
    server lowers max_connections to what its file descriptors allow (and logs it) instead of
    failing accept() with EMFILE; with only the soft limit at 1,024, it raises it."""
    hard = hard or resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with open_file_limit(soft, hard):  # inherited by a subprocess, not by a fork-server child
        server = make_server(fork=False)
    if hard == 1024:
        assert log_lines(server, "max_connections lowered from 20000 to 960")
    else:
        assert log_lines(server, f"open file limit (RLIMIT_NOFILE) raised from 1024 to {hard}")
    socks = idle_sockets(server, 2000)
    try:
        took = timed_logins(server)
        assert max(took.values()) < 2.0, took
    finally:
        close_all(socks)
    assert_no_traceback(server)


# -- point 16: absurd lengths, malformed requests, no tracebacks ------------------------------------


@pytest.mark.parametrize("request_line", ["POST /http-bind", "POST /roster_admin/refresh", "GET /", "POST /nowhere"])
def test_absurd_content_length_is_refused_at_once(server, request_line):
    raw = f"{request_line} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999999999999\r\n\r\n".encode()
    status, data, closed, took = exchange(server, raw, timeout=3.0)
    assert status is not None and closed and took < 1.0, (status, closed, took, data[:300])
    assert_no_traceback(server)


BAD_REQUESTS = {
    "content-length-word": b"POST /http-bind HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "content-length-plus": b"POST /http-bind HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n<body",
    "content-length-underscore": b"POST /http-bind HTTP/1.1\r\nHost: x\r\nContent-Length: 1_0\r\n\r\n<body/>abc",
    "content-length-unicode-digit": "POST /http-bind HTTP/1.1\r\nHost: x\r\nContent-Length: \u0665\r\n\r\n".encode("utf-8"),
    "content-length-twice": b"POST /http-bind HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n<body/>",
    "content-length-negative": b"POST /http-bind HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "transfer-encoding-gzip": b"POST /http-bind HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n<body/>",
    "transfer-encoding-and-length": (b"POST /http-bind HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"7\r\n<body/>\r\n0\r\n\r\n"),
    "bad-version": b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    "garbage-version": b"GET / HTTX/1.1\r\nHost: x\r\n\r\n",
    "no-version-post": b"POST /http-bind\r\n\r\n",
    "one-word": b"HELLO\r\n\r\n",
    "binary": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n",
    "bad-chunk": b"POST /http-bind HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "bad-chunk-refresh": b"POST /roster_admin/refresh HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
}


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("limits"), **SHORT).start()
    yield server
    server.stop()


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_malformed_requests_get_4xx_and_one_log_line_no_traceback(shared_server, name):
    server = shared_server
    before = len(server.log().splitlines())
    status, data, closed, took = exchange(server, BAD_REQUESTS[name], timeout=3.0)
    assert status is not None and 400 <= status < 500 and closed and took < 1.0, (status, closed, took, data[:300])
    deadline = time.monotonic() + 3.0   # one line per kind per second: a summary may come later
    while not any(" INFO boshroster" in line or " WARNING boshroster" in line
                  for line in server.log().splitlines()[before:]):
        assert time.monotonic() < deadline, server.log().splitlines()[before:]
        gevent.sleep(0.1)
    assert_no_traceback(server)
    assert exchange(server, b"GET /http-bind HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0] == 200


@pytest.mark.parametrize("path", ["/http-bind", "/roster_admin/refresh"])
def test_body_cut_short_by_the_client_is_one_line_no_traceback(shared_server, path):
    server = shared_server
    sock = connect(server)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n<body xmlns='".encode())
    gevent.sleep(0.2)
    sock.close()
    assert wait_log(server, "body incomplete")
    assert_no_traceback(server)


# -- issue 12: the request headers' fast parser gives what email's parser gives ------------------

from gevent.pywsgi import OldMessage  # noqa: E402

from boshroster.transports.http_handler import parse_header_lines  # noqa: E402
from boshroster.transports.http_limits import read_headers  # noqa: E402

HEADER_BLOCKS = {
    "plain": b"Host: x\r\nContent-Length: 7\r\nConnection: keep-alive\r\n\r\n",
    "no-blank-after-colon": b"Host:x\r\nX-A:\t\t tabbed  \r\n\r\n",
    "empty-value": b"Host: x\r\nX-Empty:\r\nX-Blank:   \r\n\r\n",
    "lf-only": b"Host: x\nContent-Length: 7\n\n",
    "duplicates-and-case": b"host: x\r\nCONTENT-length: 7\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
    "latin-1-value": "Host: x\r\nX-Name: Jürgen \u00e9\r\n\r\n".encode("latin-1"),
    "utf-8-value": "Host: x\r\nContent-Length: \u0665\r\n\r\n".encode("utf-8"),
    "obs-fold": b"Host: x\r\nX-Folded: one\r\n two\r\n\tthree\r\nContent-Length: 7\r\n\r\n",
    "no-colon": b"Host: x\r\ngarbage line\r\nContent-Length: 7\r\n\r\n",
    "empty-name": b"Host: x\r\n: nameless\r\n\r\n",
    "space-in-name": b"Host: x\r\nBad Name: v\r\n\r\n",
    "from-line": b"From someone\r\nHost: x\r\n\r\n",
    "non-ascii-name": "Host: x\r\nN\u00e4me: v\r\n\r\n".encode("latin-1"),
    "cr-inside-value": b"Host: x\r\nX-A: a\rb\r\n\r\n",
    "eof-terminated": b"Host: x\r\nX-A: 1\r\n",
    "nothing": b"\r\n",
    "unicode-blanks-around-value": "Host: x\r\nX-A: \u00a0v\u0085 \r\nX-B:\u00a0\r\n\r\n".encode("latin-1"),
    "underscore-name": b"Host: x\r\nX_Under: 1\r\nX-Over: 2\r\n\r\n",
    "content-type-and-length": b"Host: x\r\nContent-Type: text/xml\r\nContent-Length: 7\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(HEADER_BLOCKS))
def test_fast_header_parser_matches_the_email_parser(name):
    import email.parser
    import io

    lines = read_headers(io.BytesIO(HEADER_BLOCKS[name]), 65536, 65536 * 100)
    fast = parse_header_lines(lines)
    reference = email.parser.Parser(_class=OldMessage).parsestr(b"".join(lines).decode("iso-8859-1"))
    assert isinstance(fast, OldMessage)  # PlainHeaders (a subclass) when every line was plain
    assert fast._headers == reference._headers
    assert fast.get("content-length") == reference.get("content-length")
    assert list(fast.headers) == list(reference.headers)


@pytest.mark.parametrize("name", ["obs-fold-before-length", "lf-only"])
def test_requests_with_unusual_header_lines_are_still_answered(shared_server, name):
    body = b"<body/>"
    raw = {
        "obs-fold-before-length": (b"GET /http-bind HTTP/1.1\r\nHost: x\r\nX-Folded: one\r\n two\r\n"
                                   b"Connection: close\r\n\r\n"),
        "lf-only": b"POST /http-bind HTTP/1.1\nHost: x\nContent-Length: %d\nConnection: close\n\n%s" % (len(body), body),
    }[name]
    status, data, closed, took = exchange(shared_server, raw, timeout=3.0)
    assert status is not None and status < 500 and closed, (status, data[:300])
    if name == "obs-fold-before-length":
        assert status == 200
    assert_no_traceback(shared_server)


def _data_segments_in(sock) -> int:
    """tcpi_data_segs_in of Linux's struct tcp_info (offset 152, Linux 4.6+): data-carrying
    TCP segments this socket received."""
    import struct

    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, 152)[0]


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="Linux TCP_INFO")
def test_a_small_response_is_one_tcp_segment(shared_server):
    """Status line, headers and body in one write (pywsgi writes the head and the body apart:
    two segments, and two syscalls, per BOSH response)."""
    sock = connect(shared_server)
    try:
        for _ in range(3):  # kept alive: each response alone
            before = _data_segments_in(sock)
            sock.sendall(b"GET /http-bind HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            sock.settimeout(5.0)
            while not (b"\r\n\r\n" in data and _complete(data)):
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 200") and int(re.search(rb"Content-Length: (\d+)", data).group(1)) > 0
            assert _data_segments_in(sock) - before == 1
    finally:
        sock.close()


@pytest.mark.parametrize("name", sorted(HEADER_BLOCKS))
def test_plain_headers_shortcuts_match_pywsgi(name):
    """PlainHeaders (issue 12): ``get`` and ``environ_pairs`` give what email's ``get`` and
    pywsgi's ``_headers`` give for the same block, before and after pywsgi deletes a
    Content-Length (it does for a chunked request)."""
    import email.parser
    import io
    import types

    from gevent.pywsgi import WSGIHandler

    from boshroster.transports.http_handler import PlainHeaders

    lines = read_headers(io.BytesIO(HEADER_BLOCKS[name]), 65536, 65536 * 100)
    fast = parse_header_lines(lines)
    reference = email.parser.Parser(_class=OldMessage).parsestr(b"".join(lines).decode("iso-8859-1"))
    if type(fast) is not PlainHeaders:  # an unusual block: email's message, as before
        assert type(fast) is OldMessage
        return
    for _ in range(2):
        names = {k for k, _ in reference._headers} | {"content-length", "CONTENT-LENGTH", "missing", "x-a", ""}
        for header in names:
            assert fast.get(header) == reference.get(header)
            assert fast.get(header, "dflt") == reference.get(header, "dflt")
            assert fast.getheader(header) == reference.getheader(header)
        assert fast.typeheader == reference.typeheader
        assert list(fast.environ_pairs()) == list(WSGIHandler._headers(types.SimpleNamespace(headers=reference)))
        for msg in (fast, reference):
            del msg["content-length"]
