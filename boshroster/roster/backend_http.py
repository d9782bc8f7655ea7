"""The backend's HTTP plumbing under ``requests``: counted, kept-alive connections.

One pool of connections to the backend (urllib3 under requests), each counted when
opened (the bench checks keep-alive), with TCP_NODELAY and TCP_QUICKACK so no reply
waits for a delayed ACK, and a response wrapper that skips what requests would do
per call (cookie extraction, settings merge).  Used only by backend.py.
"""

from __future__ import annotations

import email.parser
import http.client
import re
import select
import socket
import types

import requests
from gevent import monkey
import urllib3
import urllib3.connection
import urllib3.connectionpool
from requests.adapters import HTTPAdapter

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
# The unpatched poll: a zero-timeout poll(2) that never goes through the gevent hub.
_real_poll = monkey.get_original("select", "poll") if hasattr(select, "poll") else None


# One plain header line: a name of the characters email's parser takes for one (printable
# ASCII but ':'; its headerRE), the colon, the value up to the line end (the same rule as
# the server's request headers, transports/http_handler.py).
_PLAIN_HEADER = re.compile(r"([!-9;-~]+):[ \t]*([^\r\n]*)\r?\n")
# A body type for which email's parser does more than store the headers (sub-messages, parts).
_STRUCTURED_TYPE = re.compile(r"\s*(multipart|message)\b", re.IGNORECASE)


def parse_response_headers(fp, _class=http.client.HTTPMessage) -> http.client.HTTPMessage:
    """``http.client.parse_headers`` with a fast path: the same message, without ``email``.

    The stdlib joins the header lines and runs email's ``FeedParser`` over them: ~100 µs
    per backend reply on this machine kind (issue 12), most of what reading a roster
    reply costs after the body.  Lines are read by http.client's own reader (its line
    and count limits); when every line is plain (RFC 9112 §5: ``name: value``) the
    ``(name, value)`` pairs are stored exactly as email's compat32 parser stores them
    (value without leading blanks and the line end) and the payload is the empty string
    it leaves.  Anything else (obs-fold, a line without a colon, other name characters,
    a multipart or message/* Content-Type, on which email's parser builds parts) goes
    through email's parser as before.  tests/test_roster_backend_headers.py compares both."""
    lines = http.client._read_headers(fp)
    msg = _class()
    pairs = msg._headers  # what Message.set_raw appends to
    match = _PLAIN_HEADER.fullmatch
    for raw in lines:
        if raw in (b"\r\n", b"\n", b""):
            msg.set_payload("")
            return msg
        m = match(raw.decode("iso-8859-1"))
        if m is None or (len(m[1]) == 12 and m[1].lower() == "content-type" and _STRUCTURED_TYPE.match(m[2])):
            break
        pairs.append(m.groups())
    return email.parser.Parser(_class=_class).parsestr(b"".join(lines).decode("iso-8859-1"))


class _HTTPResponse(http.client.HTTPResponse):
    """http.client's response with the header reader above.  ``begin`` is the stdlib's own
    code (status line, 1xx skipping, framing) bound to a copy of http.client's globals in
    which ``parse_headers`` is ours: it calls the module function by name, so no override
    of a method reaches it, and a patch of ``http.client`` would change every client of
    the process."""

    begin = types.FunctionType(http.client.HTTPResponse.begin.__code__,
                               {**vars(http.client), "parse_headers": parse_response_headers},
                               "begin")


class _Counters:
    """New TCP connections made by one RosterBackend (shared by its pools)."""

    __slots__ = ("connections",)

    def __init__(self) -> None:
        self.connections = 0


class _ConnectionMixin:
    """urllib3 connection: counts connects; ``TCP_QUICKACK`` before each reply.

    Linux delays the ACK of a segment that carries no request for up to 40 ms
    on an interactive connection.  A backend whose reply goes out in two
    writes (headers, then body) with Nagle on cannot send the body before
    that ACK; quick-ack mode, set right after the request went out, ACKs the
    headers at once.  The flag is not sticky, hence once per reply."""

    _counters: _Counters
    response_class = _HTTPResponse

    def connect(self):
        super().connect()
        self._counters.connections += 1

    @property
    def is_connected(self) -> bool:
        """urllib3's check before reusing a pooled connection ("readable now" = EOF or
        stray bytes: dropped), with a real zero-timeout ``poll(2)``.  urllib3's own
        ``wait_for_read(sock, 0)`` goes through gevent's patched ``select.poll``, which
        parks the fetching greenlet until the next loop turn: the GET of a login's roster
        then went out only after the hub had polled and run whatever else was ready (the
        client's roster get, in a sequential login), and each check cost a loop turn."""
        sock = self.sock
        if sock is None:
            return False
        if _real_poll is None:  # pragma: no cover - every Linux has poll
            return super().is_connected
        poller = _real_poll()
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    def getresponse(self, *args, **kwargs):
        sock = self.sock
        if _TCP_QUICKACK is not None and sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                pass
        return super().getresponse(*args, **kwargs)


def _pool_classes(counters: _Counters) -> dict:
    """Pool classes whose connections count into ``counters``."""
    http_conn = type("RosterHTTPConnection", (_ConnectionMixin, urllib3.connection.HTTPConnection),
                     {"_counters": counters})
    https_conn = type("RosterHTTPSConnection", (_ConnectionMixin, urllib3.connection.HTTPSConnection),
                      {"_counters": counters})
    return {
        "http": type("RosterHTTPPool", (urllib3.connectionpool.HTTPConnectionPool,),
                     {"ConnectionCls": http_conn}),
        "https": type("RosterHTTPSPool", (urllib3.connectionpool.HTTPSConnectionPool,),
                      {"ConnectionCls": https_conn}),
    }


class _Reply:
    """What ``_BackendAdapter.send`` answers instead of a ``requests.Response``:
    the urllib3 response and the three things read from it.  A Response would
    cost a cookie jar, a copy of the headers and cookie extraction per fetch,
    none of which is used (cookies are refused by policy; urllib3's header
    dict is case-insensitive already)."""

    __slots__ = ("raw", "status_code", "reason", "headers")

    def __init__(self, raw) -> None:
        self.raw = raw
        self.status_code = raw.status
        self.reason = raw.reason
        self.headers = raw.headers

    @property
    def is_redirect(self) -> bool:
        return "location" in self.headers and self.status_code in requests.sessions.REDIRECT_STATI

    def close(self, consumed: bool = False) -> None:
        """Give the connection back to the pool if the body was read to its end, else close it
        (like ``requests.Response.close``)."""
        if not consumed:
            self.raw.close()
        self.raw.release_conn()


class _BackendAdapter(HTTPAdapter):
    """The HTTPAdapter of the roster backend's one origin (the URL template's).

    Overrides the documented subclassing hooks only: pool classes that count
    connections and set quick-ack, a cached pool (one origin: the lookup,
    proxy selection and pool-key normalization per call cost ~40 µs), and a
    minimal reply (``_Reply``) instead of a ``requests.Response``."""

    def __init__(self, counters: _Counters, **kwargs) -> None:
        self._counters = counters
        self._pool = None
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _pool_classes(self._counters)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        if proxies:
            return super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        pool = self._pool
        if pool is None:
            pool = self._pool = super().get_connection_with_tls_context(request, verify, cert=cert)
        return pool

    def request_url(self, request, proxies):
        if proxies:
            return super().request_url(request, proxies)
        return request.path_url

    def build_response(self, req, resp) -> "_Reply":
        return _Reply(resp)

    def close(self) -> None:
        self._pool = None
        super().close()
