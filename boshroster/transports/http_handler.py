"""The pywsgi handler of every connection: plain HTTP, or the WebSocket upgrade (RFC 6455, RFC 7395 §3.1).

Use :class:`ServerHandler` as ``handler_class`` of ``gevent.pywsgi.WSGIServer`` for every
connection. Plain HTTP requests (BOSH, static files, admin) reach the WSGI app untouched. A
WebSocket upgrade on any path must offer the ``xmpp`` subprotocol (RFC 7395 §3.1), otherwise it
gets ``501``; on success the app is called once with ``environ['boshroster.websocket']`` set to a
:class:`~boshroster.transports.ws_connection.WsConnection` and owns the socket until it returns.
What the app returns and any ``start_response`` call it makes are ignored: nothing more is
written as HTTP on that socket.

WebSocket settings are a :class:`~boshroster.transports.ws_connection.WsSettings`, bound to the
handler class with :meth:`ServerHandler.with_settings` (the defaults otherwise). One attribute of
the ``WSGIServer`` instance is read:

``boshroster_limits`` a :class:`~boshroster.transports.http_limits.HttpLimits`: timeouts,
                     header caps, per-address cap (default None: none of them)

Request reading (``handle``, ``MessageClass``, ``get_environ``, ``handle_one_request``) tells
the limits which phase the connection is in (http_limits.py explains the timeouts); client
errors (``_handle_client_error``, ``handle_error`` for a body that stopped short) are one log
line, never a traceback.
"""

import binascii
import dataclasses
import email.parser
import logging
import re
import socket
import time

from gevent import GreenletExit
from gevent.pywsgi import OldMessage, WSGIHandler, _InvalidClientInput, _InvalidClientRequest, _NoopLog, format_date_time
from geventwebsocket.handler import WebSocketHandler

from boshroster.transports import http_limits as _limits
from boshroster.transports.bosh_watch import ENVIRON_KEY as BOSH_SOCKET
from boshroster.transports.http_limits import APP, BODY, HEADERS, WAIT, BoundedInput, body_done
from boshroster.transports.ws_connection import (
    ENVIRON_KEY,
    SUBPROTOCOL,
    MessageTooLarge,
    Pinger,
    WsConnection,
    WsSettings,
)

__all__ = ["ServerHandler"]

_VERSION = "13"  # RFC 6455; 0.10.1 also accepts the drafts' 7 and 8
_WRONG_VERSION_BODY = (
    b"This server speaks WebSocket version 13 (RFC 6455) only.\n"
)
_NOT_XMPP_BODY = (
    b"This WebSocket endpoint speaks XMPP (RFC 7395) only: the handshake must offer the "
    b"'xmpp' subprotocol (Sec-WebSocket-Protocol: xmpp).\n"
)


log = logging.getLogger("boshroster.http")


def _ignore_start_response(status, headers, exc_info=None):
    return lambda data: None


def _response(status: str, reason: str = "") -> bytes:
    body = (reason + "\n").encode("latin-1", "replace") if reason else b""
    return (f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body


_HEADER_PARSER = email.parser.Parser(_class=OldMessage)  # stateless: parsestr() makes its own FeedParser
# One plain header line: a name of the characters email's parser takes for one (printable ASCII
# but ':'; its headerRE), the colon, the value up to the line end.  (Issue 12: the parser costs
# ~100 µs a request, ~1 ms a BOSH login of 8 requests and most of what a re-poll costs.)
_PLAIN_HEADER = re.compile(r"([!-9;-~]+):[ \t]*([^\r\n]*)\r?\n")


class PlainHeaders(OldMessage):
    """The headers of a request whose every line was plain (``parse_header_lines``): the same
    message with two shortcuts pywsgi uses several times per request (issue 12).  ``get``
    skips compat32's ``header_fetch_parse``, which returns a str value unchanged unless it
    holds surrogates, and no value decoded from latin-1 can.  ``pairs`` is what pywsgi's
    ``_headers`` gets by formatting each pair as a line and splitting it again."""

    def get(self, name, failobj=None):
        name = name.lower()
        for k, v in self._headers:
            if k.lower() == name:
                return v
        return failobj

    def environ_pairs(self):
        """pywsgi's ``_headers`` for lines without continuations: ``HTTP_NAME`` and the value
        stripped, names with "_" skipped, Content-Type and Content-Length left out."""
        for key, value in self._headers:
            if "_" in key:
                continue
            key = key.replace("-", "_").upper()
            if key != "CONTENT_TYPE" and key != "CONTENT_LENGTH":
                yield "HTTP_" + key, value.strip()


def parse_header_lines(lines: list[bytes]) -> OldMessage:
    """The request headers as pywsgi's message class, from ``read_headers``' lines.

    Plain lines (all of them, almost always) are split here into exactly the ``(name, value)``
    pairs email's compat32 parser would store (value without leading blanks and the line
    end, RFC 9112 §5); anything else (an obs-fold continuation, a line without a colon, a
    name with other characters, a "From " line) goes to email's parser as before, whose
    handling of those cases stays the reference.  tests/test_http_limits.py compares both."""
    msg = PlainHeaders()
    pairs = msg._headers  # what Message.set_raw appends to
    match = _PLAIN_HEADER.fullmatch
    for raw in lines:
        if raw in (b"\r\n", b"\n", b""):
            return msg
        m = match(raw.decode("iso-8859-1"))
        if m is None:
            break
        pairs.append(m.groups())
    return _HEADER_PARSER.parsestr(b"".join(lines).decode("iso-8859-1"))
def _http_date(_cache=[0, b""]) -> bytes:
    """pywsgi's ``Date`` value (RFC 9110 §6.6.1, IMF-fixdate), formatted once per second
    rather than per response (~2% of a BOSH fan-out, issue 12).  ``_cache``: [second,
    value], module state rewritten whole by whichever greenlet first sees a new second."""
    now = int(time.time())
    if _cache[0] != now:
        _cache[1] = format_date_time(now)
        _cache[0] = now
    return _cache[1]


_ONE_SEND_MAX = 64 * 1024  # a first body chunk up to this size goes out with the headers
_OVER_CAP = _response("503 Service Unavailable", "too many connections from your address")
_TIMEOUT = _response("408 Request Timeout")


class ServerHandler(WebSocketHandler):
    """pywsgi handler class for every connection of the server (``handler_class=``)."""

    # 0.10.1 names these in its 426 for a handshake without a version header
    SUPPORTED_VERSIONS = (_VERSION,)
    ws_settings = WsSettings()

    @classmethod
    def with_settings(cls, settings: WsSettings) -> type["ServerHandler"]:
        """This handler class bound to a listener's WebSocket settings."""
        return type(cls.__name__, (cls,), {"ws_settings": settings, "__doc__": cls.__doc__})

    # Per connection, for transports/http_limits.py (class defaults keep the constructor as it is).
    _limits = None      # the server's HttpLimits, None when it has none
    _peer = ""          # the TCP peer's address
    _counted = False    # counted in HttpLimits.addresses
    _phase = APP        # WAIT / HEADERS / BODY / APP
    _deadline = 0.0     # time.monotonic() by which the phase must end; 0 = none
    _expired = None     # why the limits ended the connection ("header-timeout", ...)
    _requests = 0       # request lines read on this connection

    def handle(self):
        # pywsgi writes headers and body in two sends; without TCP_NODELAY the body waits for
        # the client's delayed ACK (RFC 1122 §4.2.3.2, Nagle; ~40 ms per kept-alive response).
        sock = self.socket
        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        limits = getattr(self.server, "boshroster_limits", None)
        if limits is None:
            return super().handle()
        address = self.client_address
        self._peer = address[0] if isinstance(address, tuple) else str(address)
        if not limits.admit(self):
            try:
                sock.sendall(_OVER_CAP)
            except OSError:
                pass
            self.rfile.close()  # the socket's fd is only closed with its makefile() reader
            sock.close()
            return None
        try:
            return super().handle()
        finally:
            limits.release(self)

    # -- request reading (phases for transports/http_limits.py) ------------------------------------

    def MessageClass(self, fp, *args):
        """The request headers (pywsgi calls this right after the request line), read within
        the caps: http.client's reader, which pywsgi uses, allows 64 KB x 100 lines."""
        limits = self._limits
        if limits is None:
            lines = _limits.read_headers(fp, 65536, 65536 * 100)
        else:
            limits.waiting.pop(self, None)
            self._phase = HEADERS
            if self._requests:  # kept alive: the headers get their own time from now
                self._deadline = time.monotonic() + limits.header_timeout
            self._requests += 1
            lines = _limits.read_headers(fp, limits.max_header_line, limits.max_header_size)
        headers = parse_header_lines(lines)
        _limits.check_framing(headers)
        if self._expired is not None:  # end-of-file from the limits cut the headers short
            raise _limits.HeaderTimeout(self._expired)
        return headers

    def _write_with_headers(self, data):
        """pywsgi's, but the status line, headers and a first body chunk of at most
        _ONE_SEND_MAX bytes go out in one ``send``: pywsgi sends the head and the body apart,
        two syscalls and two TCP segments per response, each ~70 µs of kernel time on
        loopback on this machine kind (issue 12; every BOSH response).  The bytes are
        pywsgi's: a chunked or larger body is written after the head by pywsgi's ``_write``."""
        self.headers_sent = True
        if self.provided_date is None:  # pywsgi would format the same bytes afresh
            self.response_headers.append((b"Date", _http_date()))
            self.provided_date = True
        self.finalize_headers()
        towrite = bytearray(b"HTTP/1.1 ")
        towrite += self.status
        towrite += b"\r\n"
        for header, value in self.response_headers:
            towrite += header
            towrite += b": "
            towrite += value
            towrite += b"\r\n"
        towrite += b"\r\n"
        if data and not self.response_use_chunked and len(data) <= _ONE_SEND_MAX:
            towrite += data
            self._sendall(towrite)
            return
        self._sendall(towrite)
        self._write(data)

    def _check_http_version(self):
        return self.request_version == "HTTP/1.1" or super()._check_http_version()

    def _headers(self):
        headers = self.headers
        if type(headers) is PlainHeaders:
            return headers.environ_pairs()
        return super()._headers()

    def get_environ(self):
        environ = super().get_environ()
        environ[BOSH_SOCKET] = self.socket  # pywsgi gives the app no socket: bosh_watch.py watches it
        inp = self.wsgi_input
        inp.__class__ = BoundedInput  # same slots: bounded discard of an unread body
        if self._limits is not None:
            if inp.chunked_input or inp.content_length:
                self._phase = BODY
                self._deadline = time.monotonic() + self._limits.body_timeout
            else:
                self._phase, self._deadline = APP, 0.0
        return environ

    def handle_one_request(self):
        result = super().handle_one_request()
        limits = self._limits
        if result is True:
            inp = self.wsgi_input  # body_done(), inlined: this is every kept-alive request
            if self._expired is not None or (inp.position < (inp.content_length or 0) if not inp.chunked_input
                                             else not body_done(inp)):
                return None  # timed out, or a body left unread: close, never parse it as a request
            if limits is not None:
                if limits.draining:  # the server is stopping (close_waiting): no next request
                    return None
                self._phase = WAIT
                self._deadline = time.monotonic() + limits.keepalive_timeout
                limits.waiting[self] = None
        elif result is not None and result[0] == "414":
            self._note_client_error("request-line", logging.WARNING,
                                    f"request line over {_limits.MAX_REQUEST_LINE} bytes refused (414)")
        return result

    # -- client errors: one line, no traceback --------------------------------------------

    def _note_client_error(self, kind: str, level: int, message: str) -> None:
        peer = self._peer or str(self.client_address)
        if self._limits is not None:
            self._limits.note(kind, level, message, peer)
        else:
            log.log(level, "%s (from %s)", message, peer)

    def _handle_client_error(self, ex):
        # pywsgi prints a traceback for anything but ValueError (http.client's "got more than
        # 100 headers" was one) and logs the rest at ERROR; these are the client's mistakes.
        self.close_connection = True
        if isinstance(ex, _limits.HeaderTimeout) or self._expired is not None:
            return ("408", _TIMEOUT)  # the sweeper logged it
        if isinstance(ex, _limits.HeaderTooLarge):
            self._note_client_error(f"header-size {ex}", logging.WARNING,  # three kinds
                                    f"request refused (431): {ex}")
            return ("431", _response("431 Request Header Fields Too Large", str(ex)))
        if isinstance(ex, _InvalidClientRequest):
            detail = ex.formatted_message
        else:
            detail = str(ex) or type(ex).__name__
        self._note_client_error("bad-request", logging.INFO,
                                f"bad HTTP request refused (400): {detail[:200]}")
        return ("400", _response("400 Bad Request"))

    def handle_error(self, t, v, tb):
        # Reading the body failed because the client closed or was timed out (limits): its
        # doing, so one line and close, not pywsgi's traceback and 500.
        if issubclass(t, (OSError, _limits.ClientGone, _InvalidClientInput)) and (
                self._expired is not None or not body_done(self.wsgi_input)):
            if self._expired is None:
                self._note_client_error("body-incomplete", logging.INFO,
                                        f"request body incomplete, connection closed: {v}")
            self.close_connection = True
            if not self.headers_sent:
                try:
                    self.socket.sendall(_TIMEOUT if self._expired else _response("400 Bad Request"))
                except OSError:
                    pass
                self.response_length = 1  # nothing more may be written as this response
            return
        super().handle_error(t, v, tb)

    # 0.10.1 routes its access log to a logger that emits nothing; use pywsgi's (server.log),
    # but format the line only when that log writes somewhere: with ``log=None`` it is
    # pywsgi's no-op log, and format_request (time, address, request line) costs ~7% of a
    # BOSH fan-out's CPU for nothing (issue 12).
    def log_request(self):
        if not isinstance(self.server.log, _NoopLog):
            WSGIHandler.log_request(self)

    def run_application(self):
        """Plain HTTP (every BOSH request) goes straight to pywsgi's ``run_application``.

        geventwebsocket's first tries an upgrade: two debug log calls through its
        ``logger`` property and its header checks, for each request (issue 12: a BOSH
        fan-out to 100 contacts answers 100 requests and reads 100 re-polls).  Without
        ``Upgrade: websocket`` its ``upgrade_websocket`` returns None and it ends in the
        same pywsgi call, so only requests asking for the upgrade take its path."""
        if (self.environ.get("HTTP_UPGRADE", "").lower() != "websocket"
                and not getattr(self.server, "pre_start_hook", None)):
            return WSGIHandler.run_application(self)
        return super().run_application()

    def upgrade_websocket(self):
        result = super().upgrade_websocket()
        if result:  # 0.10.1's error bodies are str; pywsgi writes bytes only
            result = [r.encode("utf-8") if isinstance(r, str) else r for r in result]
        return result

    def upgrade_connection(self):
        version = self.environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip()
        if version != _VERSION:
            # RFC 6455 §4.2.2 and §4.4: refuse, naming the version we speak (0.10.1 would
            # accept the drafts' 7 and 8, or answer 400).
            self.close_connection = True
            self.start_response("426 Upgrade Required", [
                ("Sec-WebSocket-Version", _VERSION),
                ("Upgrade", "websocket"),
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(_WRONG_VERSION_BODY))),
                ("Connection", "close"),
            ])
            return [_WRONG_VERSION_BODY]
        offered = self.environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "")
        if SUBPROTOCOL not in [p.strip() for p in offered.split(",")]:
            self.close_connection = True
            self.start_response("501 Not Implemented", [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(_NOT_XMPP_BODY))),
                ("Connection", "close"),
            ])
            return [_NOT_XMPP_BODY]
        try:
            return super().upgrade_connection()
        except (binascii.Error, ValueError):  # 0.10.1 only catches TypeError from b64decode
            self.start_response("400 Bad Request", [("Content-Type", "text/plain")])
            return [b"Invalid Sec-WebSocket-Key\n"]

    def start_response(self, status, headers, exc_info=None):
        if status.startswith("101") and self.environ.get("wsgi.websocket") is not None:
            # RFC 7395 §3.1: echo the subprotocol (0.10.1 only does it via app.app_protocol).
            headers = [(k, v) for k, v in headers if k.lower() != "sec-websocket-protocol"]
            headers.append(("Sec-WebSocket-Protocol", SUBPROTOCOL))
        return super().start_response(status, headers, exc_info)

    def run_websocket(self):
        # Replaces 0.10.1's run_websocket. Its WebSocket object must never write: close() would
        # send a close frame without status code (also from __del__), so mark it closed.
        old = self.websocket
        old.closed = True
        self.websocket = None
        self.environ.pop("wsgi.websocket", None)
        server = self.server
        conn = WsConnection(
            self.socket, self.rfile, self.environ.get("REMOTE_ADDR", ""),
            **dataclasses.asdict(self.ws_settings),
        )
        self.environ[ENVIRON_KEY] = conn
        pinger = None
        if conn.ping_interval > 0:
            pinger = server.__dict__.get("_boshroster_pinger")
            if pinger is None:  # the interval is a server setting: one pinger per server
                pinger = server._boshroster_pinger = Pinger(conn.ping_interval)
            pinger.add(conn)
        code, reason = 1000, ""
        try:
            result = self.application(self.environ, _ignore_start_response)
            try:
                for _ in result or ():
                    pass
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except MessageTooLarge as exc:
            code, reason = exc.close_code, "message too large"
            raise
        except GreenletExit:
            code, reason = 1001, "server shutting down"
            raise
        except BaseException:
            code, reason = 1011, "internal error"
            raise  # pywsgi logs it; response_length > 0, so it writes no 500 response
        finally:
            if pinger is not None:
                pinger.discard(conn)
            conn._finish(code, reason)
            self.close_connection = True
