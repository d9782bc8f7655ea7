"""Limits of the HTTP layer: what one client may hold of the server before it sent a request.

pywsgi alone keeps a connection open for as long as the client likes: one that sends nothing,
sends its headers one byte a minute (slowloris) or never finishes its body holds a pool slot
and a file descriptor forever, so a few hundred of them lock every login out (issue 10 point 8).
This module gives the pywsgi handler (:class:`~boshroster.transports.http_handler.ServerHandler`)
nginx's defences, with nginx's names and defaults:

* ``http_header_timeout`` (``client_header_timeout``, 60 s): request line and headers must
  arrive within this time of the connection's accept (first request) or of the request line
  (kept-alive connections). A total deadline, not a gap between reads.
* ``http_body_timeout`` (``client_body_timeout``, 60 s): a request body must be complete
  within this time of its headers. nginx bounds the gap between two reads instead; a total
  deadline also stops a body trickled one byte at a time. The largest body accepted
  (``bosh_max_body``, 1 MB) then needs 17 KB/s.
* ``http_keepalive_timeout`` (``keepalive_timeout``, 75 s): a kept-alive connection may wait
  this long for its next request. Keep it above the upstream keep-alive timeout of a proxy in
  front (nginx: 60 s), so that the proxy, not the server, closes idle upstream connections.
* ``http_max_header_line`` / ``http_max_header_size`` (``large_client_header_buffers 4 8k``):
  8 KB per header line, 32 KB (and 100 lines) for all of them: else ``431`` and close. The
  request line is capped at 8 KB by pywsgi itself (``414``).
* ``http_max_connections_per_address``: concurrent connections from one TCP peer address;
  the ones over it are answered ``503`` and closed at once. ``http_connection_limit_exempt``
  (loopback by default) and ``trusted_proxies`` are exempt: behind nginx every client is
  nginx's address, so per-client caps belong in nginx (``limit_conn``, conf/nginx.conf).
* When the pool (``max_connections``) is full and more connections wait to be accepted, the
  connections that are only waiting for a request line (just accepted, or kept alive between
  requests) are closed, oldest first, 32 at a time, so that new clients get in: nginx does
  the same with its "reusable" connections. A held BOSH request or an open WebSocket is
  never closed this way.

Requests in flight are not timed here: a BOSH request is held by the app for up to
``bosh_max_wait`` and a WebSocket lives as long as its stream; they have their own timeouts.

How a timeout acts: the sweeper shuts the socket down for reading (``shutdown(SHUT_RD)``), so
the handler's pending and later reads see end-of-file and the handler ends the connection on
its own greenlet. Nothing is thrown into a greenlet, so a timeout can never interrupt the app
in the middle of its work; only reading from the client is affected.

Costs on the hot path (a kept-alive BOSH request): a few attribute writes, three
``time.monotonic()`` calls and two dict operations per request, on top of the header reading
pywsgi did anyway; no greenlet and no timer per request or per connection. One sweeper greenlet per server wakes every quarter of the
shortest timeout (at most once a second) while connections are open, and scans them.

Shared state (greenlet safety): ``HttpLimits`` is shared by every connection of a server and
lives in one OS thread. ``conns``, ``waiting`` and ``per_address`` are mutated by connection
greenlets (admit/release, entering/leaving the wait for a request line), by the sweeper and
by ``pool_full`` (which runs in the hub's accept callback); none of those yields while
mutating. A handler's ``_phase``/``_deadline`` are written by its own greenlet; the sweeper
only reads them, and writes ``_expired``/``_deadline`` when it expires the connection.
"""

from __future__ import annotations

import _socket
import collections
import functools
import ipaddress
import logging
import resource
import select
import socket
import time

import gevent
from gevent.pywsgi import MAX_REQUEST_LINE, Input  # pywsgi answers 414 past MAX_REQUEST_LINE: logged by http_handler


__all__ = ["ClientGone", "HttpLimits", "body_done", "connection_cap", "raise_fd_limit",
           "WAIT", "HEADERS", "BODY", "APP", "MAX_REQUEST_LINE"]

log = logging.getLogger("boshroster.http")

# Connection phases (ServerHandler._phase).
WAIT = 0      # waiting for a request line (just accepted, or kept alive between requests)
HEADERS = 1   # request line read, headers being read
BODY = 2      # headers read, body being read (by the app, or discarded after it)
APP = 3       # in the app: not timed here (held BOSH request, WebSocket)

RECLAIM_BATCH = 32          # idle connections closed at once when the pool is full (nginx: 32)
DISCARD_MAX = 65536         # unread body bytes pywsgi may still throw away to keep a connection
MAX_HEADER_LINES = 100      # as http.client
NOTICE_INTERVAL = 1.0       # seconds between two log lines of one kind (the rest are summed up)


class ClientGone(Exception):
    """The client stopped sending its request body (closed, or timed out): its fault, no traceback."""


class HeaderTooLarge(ValueError):
    """Headers over ``http_max_header_line``/``http_max_header_size``: 431 (RFC 6585 §5)."""


class BadFraming(ValueError):
    """A body whose length is ambiguous (``check_framing``): 400."""


class HeaderTimeout(ValueError):
    """Headers not complete within ``http_header_timeout``: 408 (RFC 9110 §15.5.9)."""


def body_done(inp) -> bool:
    """Has pywsgi's ``Input`` read the whole request body (or was there none)?"""
    if inp is None:
        return True
    if inp.chunked_input:
        return inp.chunk_length == 0 and not inp._chunked_input_error
    return inp.position >= (inp.content_length or 0)


class BoundedInput(Input):
    """pywsgi's request body with a bounded discard.

    After the app returns, pywsgi reads and throws away whatever body it left unread, to
    keep the connection usable: for ``Content-Length: 99999999999999999999`` that is until
    the client gives up (issue 10 point 16). Here at most ``DISCARD_MAX`` bytes are thrown
    away; beyond that the body stays unread and the handler closes the connection
    (``body_done`` is false). Installed by ``__class__`` assignment: same slots, no allocation.
    """

    __slots__ = ()

    def _discard(self):
        if self._chunked_input_error:
            return
        if self.chunked_input:
            self.send_100_continue_enabled = False
            budget = DISCARD_MAX
            while budget > 0 and self.chunk_length != 0:
                data = self.read(min(16384, budget))
                if not data:
                    break
                budget -= len(data)
            return
        left = (self.content_length or 0) - self.position
        if 0 < left <= DISCARD_MAX:
            super()._discard()


def read_headers(fp, max_line: int, max_total: int) -> list[bytes]:
    """The header lines of a request, terminator included, within the caps (else HeaderTooLarge).

    http.client's reader allows 64 KB per line and 100 lines (6.5 MB); nginx 8 KB per line,
    32 KB in all."""
    lines = []
    total = 0
    readline = fp.readline
    while True:
        line = readline(max_line + 1)
        size = len(line)
        if size > max_line:
            raise HeaderTooLarge(f"a header line over {max_line} bytes")
        total += size
        if total > max_total:
            raise HeaderTooLarge(f"request headers over {max_total} bytes")
        lines.append(line)
        if line in (b"\r\n", b"\n", b""):
            return lines
        if len(lines) > MAX_HEADER_LINES:
            raise HeaderTooLarge(f"more than {MAX_HEADER_LINES} header lines")


def check_framing(headers) -> None:
    """How the body is delimited must be unambiguous (RFC 9112 §6), else BadFraming (400):

    * Content-Length = 1*DIGIT (RFC 9110 §8.6), several only if equal: Python's int() would
      also take "+5", " 5", "1_000" and "٥", which a proxy in front may read differently;
    * Transfer-Encoding only as "chunked" (the one coding pywsgi decodes; anything else would
      leave the body in the stream to be read as the next request), and never together with
      Content-Length (request smuggling, §6.3 point 3; nginx refuses it the same way)."""
    lengths = codings = None
    for name, value in headers._headers:  # raw (name, value) pairs of email.message.Message
        if len(name) == 14 and name.lower() == "content-length":
            lengths = [value] if lengths is None else lengths + [value]
        elif len(name) == 17 and name.lower() == "transfer-encoding":
            codings = [value] if codings is None else codings + [value]
    if codings is not None:
        coding = ",".join(codings).strip().lower()
        if coding != "chunked":
            raise BadFraming(f"unsupported Transfer-Encoding: {coding[:40]!r}")
        if lengths is not None:
            raise BadFraming("both Transfer-Encoding and Content-Length")
        return
    if lengths is None:
        return
    value = lengths[0].strip()
    for other in lengths[1:]:
        if other.strip() != value:
            raise BadFraming(f"several Content-Length headers that differ: {[v[:40] for v in lengths]!r}")
    if not (value.isascii() and value.isdigit()):
        raise BadFraming(f"invalid Content-Length: {value[:40]!r}")


@functools.lru_cache(maxsize=16)
def _networks(specs: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(spec.strip(), strict=False) for spec in specs)


def in_networks(address: str, specs: list[str]) -> bool:
    """Is the socket peer ``address`` in one of ``specs`` (IPs or CIDRs; an IPv4-mapped IPv6
    peer counts as its IPv4 address)? Bad specs raise ValueError (checked at startup)."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in _networks(tuple(specs)))


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (before, after).

    Each connection is one file descriptor: with the usual soft limit of 1024, the 1,025th
    socket fails accept() with EMFILE, whatever ``max_connections`` says."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def connection_cap(max_connections: int, fd_limit: int) -> int:
    """``max_connections``, lowered so that the connections leave file descriptors free.

    Kept free: 1/16 of the limit, at least 64 (SQLite, backend and auth HTTP connections,
    listening sockets, the event loop's own, log files)."""
    if fd_limit == resource.RLIM_INFINITY:
        return max_connections
    reserve = max(64, fd_limit // 16)
    return max(1, min(max_connections, fd_limit - reserve))


class _Notices:
    """WARNING/INFO lines for limits hit, at most one line per kind per second.

    The first event of a kind is logged at once; the ones that follow within the interval are
    counted per address and summed up in one line (a flood of 2,000 idle sockets is one line,
    not 2,000). ``flush`` is called by the sweeper."""

    def __init__(self):
        self.pending: dict[str, list] = {}   # kind -> [level, message, count, Counter(address)]
        self.last: dict[str, float] = {}

    def note(self, kind: str, level: int, message: str, address: str, now: float) -> None:
        entry = self.pending.get(kind)
        if entry is None and now - self.last.get(kind, -1e9) >= NOTICE_INTERVAL:
            self.last[kind] = now
            log.log(level, "%s (from %s)", message, address)
            return
        if entry is None:
            entry = self.pending[kind] = [level, message, 0, collections.Counter()]
        entry[2] += 1
        if len(entry[3]) < 1000 or address in entry[3]:
            entry[3][address] += 1

    def flush(self, now: float) -> None:
        for kind, (level, message, count, addresses) in list(self.pending.items()):
            if now - self.last.get(kind, -1e9) < NOTICE_INTERVAL:
                continue
            del self.pending[kind]
            self.last[kind] = now
            top = ", ".join(f"{a} ×{n}" for a, n in addresses.most_common(3))
            more = len(addresses) - 3
            log.log(level, "%s: %d more time(s), from %s%s", message, count, top,
                    f" and {more} other address(es)" if more > 0 else "")


class HttpLimits:
    """The limits of one server's connections (all its listeners share one pool)."""

    def __init__(self, config, pool=None, listeners=()):
        self.header_timeout = float(config.http_header_timeout)
        self.body_timeout = float(config.http_body_timeout)
        self.keepalive_timeout = float(config.http_keepalive_timeout)
        self.max_header_line = int(config.http_max_header_line)
        self.max_header_size = int(config.http_max_header_size)
        self.per_address = int(config.http_max_connections_per_address)
        self.exempt = list(config.http_connection_limit_exempt) + list(config.trusted_proxies)
        self.pool = pool
        self.listeners = list(listeners)
        shortest = min(t for t in (self.header_timeout, self.body_timeout, self.keepalive_timeout, 4.0) if t > 0)
        self.tick = max(0.05, min(1.0, shortest / 4))
        self.conns: dict = {}                 # handler -> None: every open connection
        self.waiting: dict = {}               # handler -> None: in WAIT, oldest first (dict order)
        self.addresses: dict[str, int] = {}   # peer address -> open connections (non-exempt only)
        self._exempt_cache: dict[str, bool] = {}
        self.notices = _Notices()
        self._sweeper = None
        self._reclaiming = 0                  # expired by pool_full, not yet released
        self.draining = False                 # set by close_waiting(): no connection reads another request

    # -- per connection ---------------------------------------------------------

    def admit(self, handler) -> bool:
        """Register a new connection; False if its address is over its cap (then not registered)."""
        address = handler._peer
        if self.per_address > 0 and not self._is_exempt(address):
            count = self.addresses.get(address, 0)
            if count >= self.per_address:
                self.note("per-address", logging.WARNING,
                          f"connection refused: {count} open from this address "
                          f"(http_max_connections_per_address = {self.per_address})", address)
                return False
            self.addresses[address] = count + 1
            handler._counted = True
        handler._limits = self
        handler._phase = WAIT
        handler._deadline = time.monotonic() + self.header_timeout
        self.conns[handler] = None
        self.waiting[handler] = None
        self._ensure_sweeper()
        return True

    def release(self, handler) -> None:
        self.conns.pop(handler, None)
        self.waiting.pop(handler, None)
        if handler._expired == "reclaimed":
            self._reclaiming -= 1
        if handler._counted:
            handler._counted = False
            address = handler._peer
            left = self.addresses.get(address, 1) - 1
            if left > 0:
                self.addresses[address] = left
            else:
                self.addresses.pop(address, None)

    def _is_exempt(self, address: str) -> bool:
        known = self._exempt_cache.get(address)
        if known is None:
            if len(self._exempt_cache) > 10000:
                self._exempt_cache.clear()
            known = self._exempt_cache[address] = in_networks(address, self.exempt)
        return known

    def note(self, kind: str, level: int, message: str, address: str) -> None:
        self.notices.note(kind, level, message, address, time.monotonic())
        self._ensure_sweeper()

    # -- expiry -------------------------------------------------------------------

    def expire(self, handler, why: str) -> None:
        """End the client's side of the connection: its reads see end-of-file (see module doc)."""
        handler._expired = why
        handler._deadline = 0.0
        self.waiting.pop(handler, None)
        sock = handler.socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def close_waiting(self) -> int:
        """Graceful stop (``Server.stop``): end every connection waiting for a request line;
        the busy ones end after their request, as ``draining`` makes the handler close
        instead of waiting for the next one. Without this, a kept-alive connection would hold
        the stop for its whole grace period."""
        self.draining = True
        idle = list(self.waiting)
        for handler in idle:
            self.expire(handler, "shutdown")
        return len(idle)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = gevent.spawn(self._run)

    def _run(self) -> None:
        try:
            while self.conns or self.notices.pending:
                gevent.sleep(self.tick)
                now = time.monotonic()
                self.sweep(now)
                self.notices.flush(now)
        finally:
            self._sweeper = None

    def sweep(self, now: float) -> None:
        """Expire every connection past its deadline; reclaim idle ones if accepts are waiting."""
        for handler in list(self.conns):
            deadline = handler._deadline
            if not deadline or deadline > now or handler._expired is not None:
                continue
            phase = handler._phase
            if phase == BODY and body_done(handler.wsgi_input):
                handler._phase, handler._deadline = APP, 0.0   # the app has it (a held BOSH request)
                continue
            if phase == WAIT and handler._requests:
                self.expire(handler, "keepalive")
                log.debug("closing kept-alive connection from %s: no request for %.0f s",
                          handler._peer, self.keepalive_timeout)
            elif phase == WAIT or phase == HEADERS:
                self.expire(handler, "header-timeout")
                self.note("header-timeout", logging.WARNING,
                          f"connection closed: no complete request headers within "
                          f"{self.header_timeout:g} s (http_header_timeout)", handler._peer)
            elif phase == BODY:
                self.expire(handler, "body-timeout")
                self.note("body-timeout", logging.WARNING,
                          f"connection closed: request body not complete within "
                          f"{self.body_timeout:g} s (http_body_timeout)", handler._peer)
        if self.pool is not None and self.pool.full() and self._accept_pending():
            self.reclaim()

    # -- a full pool --------------------------------------------------------------------

    def pool_full(self) -> bool:
        """Replaces ``WSGIServer.full`` (called before each accept, in the hub): when the pool
        is full, close idle connections so that the accept can go ahead once they ended."""
        if not self.pool.full():
            return False
        self.reclaim()
        return True

    def reclaim(self) -> int:
        """Close up to RECLAIM_BATCH connections waiting for a request line, oldest first,
        skipping those whose request is already in the socket buffer."""
        if self._reclaiming >= RECLAIM_BATCH:
            return 0   # the last batch is still ending; its slots will free the accept
        closed = 0
        for handler in list(self.waiting):
            if closed >= RECLAIM_BATCH:
                break
            if handler._expired is not None or _has_pending_data(handler.socket):
                continue
            self.expire(handler, "reclaimed")
            self._reclaiming += 1
            closed += 1
            self.note("reclaimed", logging.WARNING,
                      f"connection pool full (max_connections = {self.pool.size}): closed an idle "
                      f"connection waiting for a request, to accept a new one", handler._peer)
        return closed

    def _accept_pending(self) -> bool:
        """Does a listening socket have connections waiting to be accepted?"""
        fds = []
        for listener in self.listeners:
            sock = getattr(listener, "socket", None)
            if sock is not None:
                try:
                    fds.append(sock.fileno())
                except OSError:
                    pass
        if not fds:
            return False
        # poll, not select: select() refuses descriptors >= 1024 (ValueError), which read as
        # "nothing waiting" would stop making room for new connections on a busy server.
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        try:
            return bool(poller.poll(0))
        except OSError:
            return False


def _has_pending_data(sock) -> bool:
    """Bytes from the client not read yet (a request on its way in): never reclaim those."""
    if sock is None:
        return False
    try:
        return bool(_socket.socket.recv(sock._sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False
    except (OSError, AttributeError):
        return True   # closed or unknown: leave it to its own greenlet
