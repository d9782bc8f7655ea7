"""A real HTTP backend app for tests: serves ``GET /contacts/<username>``.

Runs a ``gevent.pywsgi.WSGIServer`` on 127.0.0.1, port 0, inside the test
process, so the process must be monkey-patched (``from gevent import monkey;
monkey.patch_all()`` at the top of the test module, before anything imports
``requests``/``socket``), or a client in the same process blocks the server.

    backend = TestBackend({"alice": {"bob@example.com": {"name": "Bob"}}}).start()
    try:
        url = backend.url_template            # http://127.0.0.1:PORT/contacts/%s
        backend.contacts["alice"] = {...}     # change what is served, any time
        backend.set_fault("alice", "status", 500)
        backend.requests_for("alice")         # GETs seen for alice so far
        backend.in_progress, backend.peak_in_progress  # 'slow'/'gate' GETs held now / at most at once
    finally:
        backend.stop()

or ``with TestBackend(...) as backend:``.  Users without an entry in
``contacts`` get ``{}`` (an empty roster).

Faults, per username (``set_fault(username, kind, value)``; ``None`` clears):

==============  =================================================================
``'slow'``      sleep ``value`` seconds, then answer with the contacts as they
                were when the request arrived
``'gate'``      wait until ``value`` (a ``gevent.event.Event``) is set (30 s at most),
                then answer like ``'slow'``: a test decides when, no timing involved
``'status'``    answer HTTP ``value`` (e.g. 500, 404) with a small JSON body
``'html'``      200 with an HTML error page (``text/html``)
``'array'``     200 with a JSON array instead of an object
``'malformed'`` 200 ``application/json`` with truncated JSON
``'huge'``      200, stream ``value`` MB (default 50) in 64 KiB chunks, chunked,
                no Content-Length; ``huge_bytes_sent(username)`` tells how far
                it got before the client hung up
``'huge-declared'`` like ``'huge'`` but announces ``Content-Length``
``'trickle'``   200, send one byte every ``value`` seconds (default 0.1), forever
==============  =================================================================

A backend that is down: ``stop()`` it, or use ``closed_port_url_template()``.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

__all__ = ["TestBackend", "closed_port_url_template"]

_PREFIX = "/contacts/"
_CHUNK = b" " * 65536
_FAULTS = {"slow", "gate", "status", "html", "array", "malformed", "huge", "huge-declared", "trickle"}


class _RawPathHandler(WSGIHandler):
    """Expose the request target exactly as sent (PATH_INFO is unquoted), and
    set TCP_NODELAY: pywsgi writes headers and body separately, which with
    Nagle and delayed ACKs costs 40 ms per keep-alive request."""

    def handle(self):
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return super().handle()

    def get_environ(self):
        env = super().get_environ()
        env["boshroster.raw_path"] = self.path.split("?", 1)[0]
        return env


class TestBackend:
    """The backend app of roster-delegation-contract §1, with fault injection."""

    __test__ = False  # not a pytest test class

    def __init__(self, contacts: dict[str, Any] | None = None) -> None:
        self.contacts: dict[str, Any] = dict(contacts or {})
        self.faults: dict[str, tuple[str, Any]] = {}
        self.raw_paths: list[str] = []         # request targets, in order
        self.last_headers: dict[str, str] = {}  # headers of the last GET (WSGI names)
        self._counts: Counter[str] = Counter()
        self._huge_sent: dict[str, int] = {}
        self._server: WSGIServer | None = None
        # 'slow'/'gate' GETs held right now, and the most held at once. Changed by the request
        # greenlets only, never across a yield between check and update.
        self.in_progress = 0
        self.peak_in_progress = 0

    # -- control -----------------------------------------------------------------
    def start(self) -> "TestBackend":
        # A Pool, so that stop() also ends keep-alive connections and
        # requests in progress (the default spawn does not track them).
        self._server = WSGIServer(("127.0.0.1", 0), self._app, handler_class=_RawPathHandler,
                                  spawn=Pool(), log=None, error_log=None)
        self._server.start()
        return self

    def stop(self) -> None:
        """Close the port and every open connection (requests in progress die)."""
        if self._server is not None:
            self._server.stop(timeout=0)
            self._server = None

    def __enter__(self) -> "TestBackend":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "TestBackend not started"
        return self._server.server_port

    @property
    def url_template(self) -> str:
        return f"http://127.0.0.1:{self.port}{_PREFIX}%s"

    def set_fault(self, username: str, kind: str | None, value: Any = None) -> None:
        if kind is None:
            self.faults.pop(username, None)
            return
        if kind not in _FAULTS:
            raise ValueError(f"unknown fault {kind!r}; one of {sorted(_FAULTS)}")
        self.faults[username] = (kind, value)

    def requests_for(self, username: str) -> int:
        return self._counts[username]

    def huge_bytes_sent(self, username: str) -> int:
        return self._huge_sent.get(username, 0)

    # -- the app -----------------------------------------------------------------
    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if environ["REQUEST_METHOD"] != "GET" or not path.startswith(_PREFIX):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        username = path[len(_PREFIX):].encode("latin-1").decode("utf-8", "replace")
        self._counts[username] += 1
        self.raw_paths.append(environ["boshroster.raw_path"])
        self.last_headers = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
        kind, value = self.faults.get(username, (None, None))

        body = json.dumps(self.contacts.get(username, {})).encode()  # state on arrival
        if kind in ("slow", "gate"):
            self.in_progress += 1
            self.peak_in_progress = max(self.peak_in_progress, self.in_progress)
            try:
                if kind == "slow":
                    gevent.sleep(value or 0)
                else:
                    value.wait(timeout=30)
            finally:
                self.in_progress -= 1  # before the reply is written: the client cannot be faster
        elif kind == "status":
            if value in (204, 304) or 100 <= value < 200:
                start_response(f"{value} Fault", [])
                return []
            return _reply(start_response, f"{value} Fault", "application/json",
                          json.dumps({"error": f"injected {value}"}).encode())
        elif kind == "html":
            return _reply(start_response, "200 OK", "text/html",
                          b"<html><body><h1>Oops</h1>Something went wrong</body></html>")
        elif kind == "array":
            return _reply(start_response, "200 OK", "application/json",
                          b'["marie@example.com", "michael@example.com"]')
        elif kind == "malformed":
            return _reply(start_response, "200 OK", "application/json",
                          b'{"marie@example.com": {"name": "Mar')
        elif kind in ("huge", "huge-declared"):
            return self._huge(start_response, username, int((value or 50) * 1024 * 1024),
                              declared=kind == "huge-declared")
        elif kind == "trickle":
            return self._trickle(start_response, value or 0.1)
        return _reply(start_response, "200 OK", "application/json", body)

    def _huge(self, start_response, username: str, size: int, *, declared: bool):
        headers = [("Content-Type", "application/json")]
        if declared:
            headers.append(("Content-Length", str(size)))
        start_response("200 OK", headers)
        self._huge_sent[username] = 0

        def stream():
            yield b'{"x": "'
            sent = 7
            while sent < size - 2:
                chunk = _CHUNK[: size - 2 - sent]
                yield chunk
                sent += len(chunk)
                self._huge_sent[username] = sent
            yield b'"}'
        return stream()

    @staticmethod
    def _trickle(start_response, interval: float):
        start_response("200 OK", [("Content-Type", "application/json")])

        def stream():
            yield b"{"
            while True:
                gevent.sleep(interval)
                yield b" "
        return stream()


def _reply(start_response, status: str, content_type: str, body: bytes):
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def closed_port_url_template() -> str:
    """A roster URL on a local port nothing listens on (connection refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}{_PREFIX}%s"
