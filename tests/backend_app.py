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

Validators (RFC 9110 §8.8, for conditional GETs): ``backend.validators`` is
``"etag"`` (the default: a strong ETag, a hash of the body), ``"last-modified"``,
``"both"`` or ``None`` (a backend that sends neither, like the one in Prosody's
module README).  A GET with ``If-None-Match`` matching the current ETag, or with
``If-Modified-Since`` not older than the roster's Last-Modified, gets ``304``.
Each new version of a user's roster (first seen by a GET) gets a Last-Modified
one second after the previous one at least, so HTTP dates (1 s resolution)
never give two versions the same date.  Counters: ``requests_for(u)`` (all
GETs), ``conditional_requests_for(u)`` (GETs carrying a validator),
``not_modified_for(u)`` (answered 304), ``full_requests_for(u)`` (the others);
``connections`` counts TCP connections accepted (keep-alive check).

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

import email.utils
import hashlib
import json
import socket
import time
from collections import Counter
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

__all__ = ["TestBackend", "closed_port_url_template"]

_PREFIX = "/contacts/"
_CHUNK = b" " * 65536
_FAULTS = {"slow", "gate", "status", "html", "array", "malformed", "huge", "huge-declared", "trickle"}
_VALIDATORS = (None, "etag", "last-modified", "both")


class _RawPathHandler(WSGIHandler):
    """Expose the request target exactly as sent (PATH_INFO is unquoted), and
    set TCP_NODELAY: pywsgi writes headers and body separately, which with
    Nagle and delayed ACKs costs 40 ms per keep-alive request."""

    nodelay = True  # False: like Python's http.server (headers and body in two writes, Nagle on)

    def handle(self):
        owner = getattr(self.server, "owner", None)
        if owner is not None:
            owner.connections += 1
        if self.nodelay:
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
        self.validators: str | None = "etag"  # see the module docstring
        self.connections = 0  # TCP connections accepted
        self._counts: Counter[str] = Counter()
        self._conditional: Counter[str] = Counter()
        self._not_modified: Counter[str] = Counter()
        self._versions: dict[str, tuple[str, float]] = {}  # username -> (ETag, Last-Modified time)
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
        self._server.owner = self
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

    def conditional_requests_for(self, username: str) -> int:
        """GETs that carried If-None-Match or If-Modified-Since."""
        return self._conditional[username]

    def not_modified_for(self, username: str) -> int:
        """GETs answered 304 Not Modified."""
        return self._not_modified[username]

    def full_requests_for(self, username: str) -> int:
        """GETs answered with the whole roster (or a fault), i.e. not 304."""
        return self._counts[username] - self._not_modified[username]

    def set_validators(self, kind: str | None) -> None:
        if kind not in _VALIDATORS:
            raise ValueError(f"unknown validators {kind!r}; one of {_VALIDATORS}")
        self.validators = kind

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
        if "HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MODIFIED_SINCE" in environ:
            self._conditional[username] += 1

        body = json.dumps(self.contacts.get(username, {})).encode()  # state on arrival
        headers: list[tuple[str, str]] = []
        if self.validators is not None and kind is None:
            headers = self._validate(username, body, environ)
            if headers is None:
                self._not_modified[username] += 1
                start_response("304 Not Modified", self._validator_headers(username))
                return []
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
        return _reply(start_response, "200 OK", "application/json", body, headers)

    def _validator_headers(self, username: str) -> list[tuple[str, str]]:
        etag, modified = self._versions[username]
        out = []
        if self.validators in ("etag", "both"):
            out.append(("ETag", etag))
        if self.validators in ("last-modified", "both"):
            out.append(("Last-Modified", email.utils.formatdate(modified, usegmt=True)))
        return out

    def _validate(self, username: str, body: bytes, environ) -> list[tuple[str, str]] | None:
        """The validator headers of this version of the roster, or None if the request's
        conditions say the client has it (RFC 9110 §13.2.2: If-None-Match first; then
        If-Modified-Since, only when If-None-Match is absent)."""
        etag = '"%s"' % hashlib.sha1(body).hexdigest()[:20]
        version = self._versions.get(username)
        if version is None or version[0] != etag:  # a new version: a later second than the last
            modified = float(int(time.time()))
            if version is not None and modified <= version[1]:
                modified = version[1] + 1
            self._versions[username] = version = (etag, modified)
        inm = environ.get("HTTP_IF_NONE_MATCH")
        ims = environ.get("HTTP_IF_MODIFIED_SINCE")
        if inm is not None and self.validators in ("etag", "both"):
            tags = [t.strip().removeprefix("W/") for t in inm.split(",")]  # weak comparison
            if etag in tags or "*" in tags:
                return None
        elif ims is not None and self.validators in ("last-modified", "both"):
            try:
                since = email.utils.parsedate_to_datetime(ims).timestamp()
            except (TypeError, ValueError):
                since = None
            if since is not None and version[1] <= since:
                return None
        return self._validator_headers(username)

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


def _reply(start_response, status: str, content_type: str, body: bytes, extra=()):
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra])
    return [body]


def closed_port_url_template() -> str:
    """A roster URL on a local port nothing listens on (connection refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}{_PREFIX}%s"
