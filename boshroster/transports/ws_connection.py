"""A WebSocket connection after the upgrade (RFC 6455 frames), on top of gevent-websocket 0.10.1.

http_handler.py does the upgrade and hands the app a :class:`WsConnection`.

What we use from gevent-websocket: the HTTP upgrade handshake (``WebSocketHandler``) and frame
header encoding/decoding (``Header``). What we replace, and why (all seen in 0.10.1):

* the subprotocol is echoed only if the app has ``app_protocol()``: we force
  ``Sec-WebSocket-Protocol: xmpp`` in ``start_response`` for the 101, for any app;
* ``WebSocket.read_frame`` reads any announced length and ``read_message`` concatenates without
  bound: our reader checks the cap against the frame header *before* reading a payload byte;
* ``WebSocket.close(code)`` sends a close frame without the status code, and is also called
  from ``__del__`` and from ``run_websocket``: we neutralise that object and send our own close
  frames (``run_websocket`` is replaced entirely);
* its socket writes are not safe for concurrent greenlets, nothing bounds what waits for a
  slow reader, and it cannot tell when a message was written: the writing half is ours,
  :class:`~boshroster.transports.ws_output.FrameWriter` (one writer at a time, a bounded
  output queue, delivery callbacks, at most one pending pong; see ws_output.py);
* the reader counts frames and wire bytes (headers included) per message, not only the
  payload (issue 10.11), and lets the event loop poll every couple of milliseconds when its
  socket never runs dry (issue 10.10);
* pings come from one timer greenlet per server (:class:`Pinger`), not one per connection;
* its error-path bodies are ``str`` (pywsgi needs bytes) and its access log goes to a silenced
  logger: we encode the bodies and restore pywsgi's ``log_request``;
* its per-byte Python unmasking and UTF-8 validator are slow: we unmask with one big-int XOR and
  decode with ``bytes.decode('utf-8')`` (strict) per complete message.
"""

import dataclasses
import logging
import struct
from time import monotonic as _monotonic

import gevent
from gevent.event import Event
from geventwebsocket.exceptions import ProtocolError, WebSocketError
from geventwebsocket.websocket import Header

from boshroster.transports.ws_output import DEFAULT_MAX_QUEUE_BYTES, FrameWriter, frame

__all__ = ["WsConnection", "Pinger", "MessageTooLarge", "ENVIRON_KEY", "SUBPROTOCOL"]

log = logging.getLogger(__name__)

ENVIRON_KEY = "boshroster.websocket"
SUBPROTOCOL = "xmpp"

DEFAULT_MAX_MESSAGE = 262144 + 1024
DEFAULT_PING_INTERVAL = 30
DEFAULT_QUEUE_SIZE = 1000
DEFAULT_MAX_FRAMES = 128  # frames per message, control frames inside it included
DEFAULT_CLOSE_GRACE = 2.0
DEFAULT_FLUSH_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class WsSettings:
    """The WebSocket limits of a listener (server.py fills them from Config), handed to the
    handler class explicitly (``ServerHandler.with_settings``)."""

    max_message: int = DEFAULT_MAX_MESSAGE  # largest accepted text message, bytes
    ping_interval: float = DEFAULT_PING_INTERVAL  # seconds between ping frames, 0 disables
    queue_size: int = DEFAULT_QUEUE_SIZE  # outgoing messages queued before a slow reader is cut off
    close_grace: float = DEFAULT_CLOSE_GRACE  # seconds to wait for the peer's close frame
    flush_timeout: float = DEFAULT_FLUSH_TIMEOUT  # seconds to flush the queue after close()
    max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES  # outgoing bytes queued before cut off
    max_frames: int = DEFAULT_MAX_FRAMES  # frames per incoming message, control frames included
    max_wire: int = 0  # wire bytes per incoming message, headers included; 0 = 2 x max_message

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_DISCARD_CHUNK = 64 * 1024
_PING_YIELD_EVERY = 500  # the pinger lets other greenlets run between groups of connections
#: every this many frames read (a message counts 4, so every 16 messages) the reader checks
#: whether the event loop polled within _HOG_SECONDS, and yields to it if not: this bounds
#: what one busy peer delays all the others (issue 10.10)
_YIELD_EVERY_FRAMES = 64
_HOG_SECONDS = 0.002


class MessageTooLarge(Exception):
    """The peer's message is over a cap: payload bytes (``ws_max_message``), frames
    (``ws_max_frames``) or wire bytes (``ws_max_wire``).

    The payload was not read; the connection cannot be read further. Close it with
    ``close_code`` (1009 message too big, 1008 policy: too many frames).
    """

    def __init__(self, text, close_code=1009):
        super().__init__(text)
        self.close_code = close_code


class _Eof(Exception):
    """The socket ended (EOF or error) in the middle of reading."""


def _wire_size(length):
    """Bytes a masked client frame with this payload length takes on the wire (minimal
    length encoding: 2 bytes, + 2 or 8 for the extended length, + 4 for the mask)."""
    return length + (6 if length < 126 else 8 if length < 65536 else 14)


def _unmask(data, mask):
    n = len(data)
    if not n:
        return b""
    key = (mask * ((n + 3) // 4))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def _valid_close_code(code):
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


class WsConnection(FrameWriter):
    """An upgraded XMPP-over-WebSocket connection (RFC 6455 framing, RFC 7395 rules).

    One greenlet may call :meth:`receive` (the connection's own greenlet, i.e. the WSGI app);
    any greenlet may call :meth:`send` and :meth:`close` (:class:`FrameWriter`, with
    ``on_overflow``, ``congested`` and ``queued_bytes``).
    """

    def __init__(self, sock, rfile, remote_addr, max_message=DEFAULT_MAX_MESSAGE,
                 ping_interval=DEFAULT_PING_INTERVAL, queue_size=DEFAULT_QUEUE_SIZE,
                 close_grace=DEFAULT_CLOSE_GRACE, flush_timeout=DEFAULT_FLUSH_TIMEOUT,
                 max_queue_bytes=DEFAULT_MAX_QUEUE_BYTES, max_frames=DEFAULT_MAX_FRAMES,
                 max_wire=0):
        self._rfile = rfile
        self.remote_addr = remote_addr
        self.max_message = int(max_message)
        self.ping_interval = float(ping_interval or 0)
        self.close_grace = float(close_grace)
        self.flush_timeout = float(flush_timeout)
        self.max_frames = int(max_frames)
        #: wire bytes (headers and control frames inside the message included) per message;
        #: 0 = twice the payload cap, as Prosody's websocket_frame_buffer_limit
        self.max_wire = int(max_wire) or 2 * self.max_message
        #: code of the close frame we sent (None until close()), and of the one the peer sent
        #: (1005 = close frame without a status code; None if none was received)
        self.close_code = None
        self.peer_close_code = None

        self._init_writer(sock, queue_size, max_queue_bytes)
        self._peer_done = Event()  # peer's close frame received, or socket EOF/error (both halves)
        self._recv_done = False  # receive() returns None from now on
        self._in_sync = True  # the read side is at a frame boundary
        self._resync = 0  # unread payload bytes of an oversized frame (skipped by _drain)
        self._streak = 0  # frames read since the reader last yielded on purpose (reader only)
        self._iteration = -1  # the event loop's iteration count at the reader's last check
        self._since = 0.0  # when the reader last saw the loop poll (monotonic)

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return "<WsConnection %s %s>" % (self.remote_addr, state)

    @property
    def closed(self):
        return self._closing or self._peer_done.is_set()

    # -- reading ---------------------------------------------------------------------------

    def receive(self):
        """Return the next complete text message, or None once the connection is over.

        Never raises on socket errors. Raises :class:`MessageTooLarge` without reading the
        oversized payload; the caller should then close with its ``close_code``.
        """
        if self._recv_done:
            return None
        try:
            return self._receive()
        except MessageTooLarge as exc:
            log.warning("websocket %s: %s; closing", self.remote_addr, exc)
            self._recv_done = True
            self._in_sync = False
            raise
        except ProtocolError as exc:
            log.info("websocket %s: protocol error: %s", self.remote_addr, exc)
            self._recv_done = True
            self._in_sync = False
            self.close(1002, "protocol error")
        except UnicodeDecodeError:
            log.info("websocket %s: invalid UTF-8 in a text message", self.remote_addr)
            self._recv_done = True
            self.close(1007, "invalid UTF-8")
        except (_Eof, OSError, ValueError):
            self._on_eof()
        return None

    def _on_eof(self):
        self._recv_done = True
        self._in_sync = False
        self._peer_done.set()

    def _read(self, n):
        data = self._rfile.read(n)
        if len(data) != n:
            raise _Eof()
        return data

    def _read_header(self):
        try:
            header = Header.decode_header(self._rfile)
        except ProtocolError:
            raise
        except WebSocketError:  # 0.10.1 raises WebSocketError on a short read
            raise _Eof()
        if header.flags:
            raise ProtocolError("reserved bits set without a negotiated extension")
        if not header.mask:
            raise ProtocolError("client frames must be masked")
        return header

    def _read_payload(self, header):
        if not header.length:
            return b""
        return _unmask(self._read(header.length), header.mask)

    def _skip(self, n):
        while n > 0:
            chunk = self._rfile.read(min(n, _DISCARD_CHUNK))
            if not chunk:
                raise _Eof()
            n -= len(chunk)

    def _fair(self):
        """Count a frame (a message counts 4). Every _YIELD_EVERY_FRAMES, if the event loop
        has not polled for _HOG_SECONDS, let it poll and run the others. A socket that always
        has data never blocks its reader, so without this one busy peer delays every other
        connection by seconds (issue 10.10). ``gevent.sleep(0)`` is not enough: it runs other
        ready greenlets but may not poll I/O; a zero timer resumes us in the next loop
        iteration, after a non-blocking poll."""
        self._streak += 1
        if self._streak < _YIELD_EVERY_FRAMES:
            return
        self._streak = 0
        loop = self._hub.loop
        iteration = getattr(loop, "iteration", None)  # libev's count; None: time alone decides
        now = _monotonic()
        if iteration is not None and iteration != self._iteration:
            self._iteration = iteration  # the loop has polled since the last check
            self._since = now
        elif now - self._since >= _HOG_SECONDS:
            self._hub.wait(loop.timer(0))
            self._iteration = getattr(loop, "iteration", None)
            self._since = _monotonic()

    def _over(self, frames, wire):
        if frames > self.max_frames:
            raise MessageTooLarge("message in more than %d frames" % self.max_frames, 1008)
        if wire > self.max_wire:
            raise MessageTooLarge("message of more than %d bytes on the wire (limit %d)"
                                  % (wire, self.max_wire), 1009)

    def _receive(self):
        cap = self.max_message
        opcode = None
        parts = []
        total = frames = wire = 0
        while True:
            self._fair()
            header = self._read_header()
            op = header.opcode
            if op >= 0x8:  # control frame; Header.decode_header already enforced fin + <=125
                if opcode is not None:  # inside a fragmented message: it counts there
                    frames += 1
                    wire += _wire_size(header.length)
                    self._over(frames, wire)
                payload = self._read_payload(header)
                if op == OP_CLOSE:
                    self._on_peer_close(payload)
                    return None
                if op == OP_PING:
                    self._queue_pong(payload)
                elif op != OP_PONG:
                    raise ProtocolError("reserved control opcode %d" % op)
                continue
            if op == OP_CONT:
                if opcode is None:
                    raise ProtocolError("continuation frame without a message")
            elif op in (OP_TEXT, OP_BINARY):
                if opcode is not None:
                    raise ProtocolError("new message inside a fragmented message")
                opcode = op
            else:
                raise ProtocolError("reserved data opcode %d" % op)
            total += header.length
            if total > cap:
                self._resync = header.length
                raise MessageTooLarge("message of more than %d bytes (limit %d)" % (total, cap))
            frames += 1
            wire += _wire_size(header.length)
            self._over(frames, wire)
            if opcode == OP_TEXT:
                parts.append(self._read_payload(header))
            else:
                self._skip(header.length)  # RFC 7395 §3.2: text only; ignore binary like Prosody
            if not header.fin:
                continue
            if opcode == OP_TEXT and not self._closing:
                self._streak += 3
                return (parts[0] if len(parts) == 1 else b"".join(parts)).decode("utf-8")
            # binary message, or data arriving after our close frame: drop it, keep reading
            opcode = None
            parts = []
            total = frames = wire = 0

    def _on_peer_close(self, payload):
        reply = 1000
        if not payload:
            self.peer_close_code = 1005
        elif len(payload) < 2:
            reply = 1002
        else:
            code = struct.unpack("!H", payload[:2])[0]
            self.peer_close_code = code
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                reply = 1002
            else:
                reply = code if _valid_close_code(code) else 1002
        self._recv_done = True
        self._peer_done.set()
        self.close(reply)  # no-op if we started the close; otherwise echo it (RFC 6455 §5.5.1)

    # -- ending ----------------------------------------------------------------------------

    def _drain(self):
        """After the app returned: read (and discard) until the peer's close frame or EOF."""
        try:
            if self._resync:  # a well-behaved peer sends the rest of the oversized frame
                self._skip(self._resync)
                self._resync = 0
                self._in_sync = True
            while not self._peer_done.is_set():
                self._fair()
                if not self._in_sync:
                    if not self._rfile.read1(_DISCARD_CHUNK):
                        break
                    continue
                try:
                    header = self._read_header()
                except ProtocolError:
                    self._in_sync = False
                    continue
                if header.opcode == OP_CLOSE:
                    self._on_peer_close(self._read_payload(header))
                    break
                self._skip(header.length)
        except (_Eof, OSError, ValueError):
            pass
        self._on_eof()

    def _finish(self, code=1000, reason=""):
        """Called by the handler greenlet once the app has returned: close, linger, clean up."""
        self.close(code, reason)
        with gevent.Timeout(self.flush_timeout + self.close_grace + 1.0, False):
            if not self._peer_done.is_set():
                self._drain()
            writer = self._writer
            if writer is not None:
                writer.join()
        self._abort()
        for glet in (self._writer, self._watchdog):
            if glet is not None and not glet.dead:
                glet.kill(block=True, timeout=1)
        self._out.clear()
        self._lose_tracked()
        self._give_back()  # the session has ended: what is given back cannot come back here


class Pinger:
    """One timer greenlet per server sends a ping frame to every open connection each
    ``interval`` seconds (a greenlet per connection cost ~9 KiB each). It runs only while
    connections exist. ``_conns`` is mutated by connection greenlets (add, and discard when
    the connection ends) and read by the timer greenlet from a snapshot."""

    def __init__(self, interval):
        self.interval = interval
        self._conns = set()
        self._timer = None

    def add(self, conn):
        self._conns.add(conn)
        if self._timer is None:
            self._timer = gevent.spawn(self._run)

    def discard(self, conn):
        self._conns.discard(conn)

    def _run(self):
        ping = frame(OP_PING, b"")
        try:
            while self._conns:
                gevent.sleep(self.interval)
                for n, conn in enumerate(list(self._conns)):
                    conn._ping(ping)  # a no-op once closing, or while the socket is backed up
                    if n % _PING_YIELD_EVERY == _PING_YIELD_EVERY - 1:
                        gevent.sleep(0)
        finally:
            self._timer = None
