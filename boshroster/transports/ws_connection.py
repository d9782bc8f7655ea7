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
* its socket writes are not safe for concurrent greenlets: ours have one writer at a time.
  ``send`` queues the frame and schedules a hub callback that writes everything queued during
  this loop turn in one non-blocking write (almost always enough: the kernel buffer has room);
  only what does not fit waits for a writer greenlet that exists while there is a backlog. So
  a slow reader never blocks the greenlet that routed to it, a burst costs one syscall, and an
  idle connection holds no writer greenlet;
* pings come from one timer greenlet per server (:class:`_Pinger`), not one per connection;
* its error-path bodies are ``str`` (pywsgi needs bytes) and its access log goes to a silenced
  logger: we encode the bodies and restore pywsgi's ``log_request``;
* its per-byte Python unmasking and UTF-8 validator are slow: we unmask with one big-int XOR and
  decode with ``bytes.decode('utf-8')`` (strict) per complete message.
"""

import logging
import socket
import struct
from collections import deque

import gevent
from gevent.event import Event
from geventwebsocket.exceptions import ProtocolError, WebSocketError
from geventwebsocket.websocket import Header

__all__ = ["WsConnection", "Pinger", "MessageTooLarge", "ENVIRON_KEY", "SUBPROTOCOL"]

log = logging.getLogger(__name__)

ENVIRON_KEY = "boshroster.websocket"
SUBPROTOCOL = "xmpp"

DEFAULT_MAX_MESSAGE = 262144 + 1024
DEFAULT_PING_INTERVAL = 30
DEFAULT_QUEUE_SIZE = 1000
DEFAULT_CLOSE_GRACE = 2.0
DEFAULT_FLUSH_TIMEOUT = 10.0

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_BATCH_BYTES = 256 * 1024  # writer coalesces queued frames up to this size per sendall
_DISCARD_CHUNK = 64 * 1024
_CLOSE = object()  # queue sentinel: write the close frame next, then stop writing
_PING_YIELD_EVERY = 500  # the pinger lets other greenlets run between groups of connections



class MessageTooLarge(Exception):
    """The peer announced or sent a message larger than ``ws_max_message``.

    The payload was not read; the connection cannot be read further. Close it (1009).
    """


class _Eof(Exception):
    """The socket ended (EOF or error) in the middle of reading."""


def _frame(opcode, payload):
    return bytes(Header.encode_header(True, opcode, b"", len(payload), 0)) + payload


def _unmask(data, mask):
    n = len(data)
    if not n:
        return b""
    key = (mask * ((n + 3) // 4))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def _close_payload(code, reason):
    raw = reason.encode("utf-8")[:123]
    raw = raw.decode("utf-8", "ignore").encode("utf-8")  # don't cut a character in half
    return struct.pack("!H", code) + raw


def _valid_close_code(code):
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


class WsConnection:
    """An upgraded XMPP-over-WebSocket connection (RFC 6455 framing, RFC 7395 rules).

    One greenlet may call :meth:`receive` (the connection's own greenlet, i.e. the WSGI app);
    any greenlet may call :meth:`send` and :meth:`close`.
    """

    def __init__(self, sock, rfile, remote_addr, max_message=DEFAULT_MAX_MESSAGE,
                 ping_interval=DEFAULT_PING_INTERVAL, queue_size=DEFAULT_QUEUE_SIZE,
                 close_grace=DEFAULT_CLOSE_GRACE, flush_timeout=DEFAULT_FLUSH_TIMEOUT):
        self._sock = sock
        self._rfile = rfile
        self.remote_addr = remote_addr
        self.max_message = int(max_message)
        self.ping_interval = float(ping_interval or 0)
        self.queue_size = int(queue_size)
        self.close_grace = float(close_grace)
        self.flush_timeout = float(flush_timeout)
        #: code of the close frame we sent (None until close()), and of the one the peer sent
        #: (1005 = close frame without a status code; None if none was received)
        self.close_code = None
        self.peer_close_code = None

        # Writing state, mutated by any greenlet that sends and by the hub's _flush callback,
        # never across a yield except in the writer. Frames wait in _out until the end of the
        # current loop turn (_flush writes them without blocking) or, if the socket is backed
        # up, until _writer (then the only one allowed to write) has written them.
        self._out = deque()  # bounded by send() via queue_size; control frames bypass it
        self._partial_head = False  # _out[0] is what a write left (maybe half a frame): keep it
        self._writer = None
        self._flush_scheduled = False  # a _flush callback is pending in the hub
        self._hub = gevent.get_hub()
        self._close_frame = None
        self._closing = False  # close() called or socket dead: nothing more is queued
        self._peer_done = Event()  # peer's close frame received, or socket EOF/error
        self._recv_done = False  # receive() returns None from now on
        self._in_sync = True  # the read side is at a frame boundary
        self._resync = 0  # unread payload bytes of an oversized frame (skipped by _drain)
        self._aborted = False
        self._watchdog = None

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
        oversized payload; the caller should then ``close(1009)``.
        """
        if self._recv_done:
            return None
        try:
            return self._receive()
        except MessageTooLarge:
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

    def _receive(self):
        cap = self.max_message
        opcode = None
        parts = []
        total = 0
        while True:
            header = self._read_header()
            op = header.opcode
            if op >= 0x8:  # control frame; Header.decode_header already enforced fin + <=125
                payload = self._read_payload(header)
                if op == OP_CLOSE:
                    self._on_peer_close(payload)
                    return None
                if op == OP_PING:
                    self._enqueue_control(_frame(OP_PONG, payload))
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
            if opcode == OP_TEXT:
                parts.append(self._read_payload(header))
            else:
                self._skip(header.length)  # RFC 7395 §3.2: text only; ignore binary like Prosody
            if not header.fin:
                continue
            if opcode == OP_TEXT and not self._closing:
                return b"".join(parts).decode("utf-8")
            # binary message, or data arriving after our close frame: drop it, keep reading
            opcode = None
            parts = []
            total = 0

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

    # -- writing ---------------------------------------------------------------------------

    def send(self, text):
        """Send one text message; never blocks. Dropped once the connection is closing."""
        if self._closing:
            return
        if self._writer is not None and len(self._out) >= self.queue_size:
            # The socket is backed up (a writer is blocked on it) and the peer is not reading.
            log.warning("websocket %s: %d messages queued, peer is not reading; closing",
                        self.remote_addr, len(self._out))
            self._drop_queued()
            self.close(1008, "send queue overflow")
            return
        self._push(_frame(OP_TEXT, text.encode("utf-8")))

    def _enqueue_control(self, frame):
        if not self._closing:
            self._push(frame)

    def _push(self, frame):
        self._out.append(frame)
        if self._writer is None and not self._flush_scheduled:
            self._flush_scheduled = True
            self._hub.loop.run_callback(self._flush)

    def _flush(self):
        """Runs in the hub once the current greenlet yields, so everything sent to this
        socket during one turn of the loop goes out in one non-blocking write (one syscall,
        not one per stanza). What the kernel does not take waits for a writer greenlet."""
        self._flush_scheduled = False
        if self._writer is not None or self._closing:
            return  # the writer (close() always starts one) writes what is queued
        try:
            while self._out:
                data, _ = self._take_batch()  # no close sentinel before close()
                try:
                    sent = self._sock.send(data, 0, 0.0)
                except BlockingIOError:  # EAGAIN: the kernel buffer is full
                    sent = 0
                if sent < len(data):
                    self._out.appendleft(data[sent:])
                    self._partial_head = True
                    self._start_writer()
                    return
        except (OSError, ValueError) as exc:  # ValueError: socket already closed
            log.debug("websocket %s: write failed: %s", self.remote_addr, exc)
            self._abort()

    def _take_batch(self):
        """Pop queued frames, up to _BATCH_BYTES, as one bytes object; and whether the close
        sentinel was reached (its frame then ends the batch)."""
        out = self._out
        self._partial_head = False
        batch = []
        size = 0
        while out and size < _BATCH_BYTES:
            item = out.popleft()
            if item is _CLOSE:
                batch.append(self._close_frame)
                return b"".join(batch), True
            batch.append(item)
            size += len(item)
        return (batch[0] if len(batch) == 1 else b"".join(batch)), False

    def _start_writer(self):
        if self._writer is None:
            self._writer = gevent.spawn(self._write_loop)

    def _drop_queued(self):
        head = self._out[0] if self._partial_head and self._out else None
        self._out.clear()
        if head is not None:
            self._out.append(head)

    def close(self, code=1000, reason=""):
        """Send a close frame with ``code`` after everything already queued; idempotent.

        Returns at once. The socket is shut down when the peer answers with its close frame, or
        ``ws_close_grace`` seconds after ours was written, or ``ws_flush_timeout`` +
        ``ws_close_grace`` seconds from now at the latest.
        """
        if self._closing:
            return
        self.close_code = code
        self._close_frame = _frame(OP_CLOSE, _close_payload(code, reason))
        self._closing = True
        self._out.append(_CLOSE)
        self._start_writer()
        if not self._aborted:
            self._watchdog = gevent.spawn_later(self.flush_timeout + self.close_grace,
                                                self._abort)

    def _write_loop(self):
        """Write the backlog, then exit; after the close frame, linger for the peer's."""
        try:
            while self._out:
                data, closing = self._take_batch()
                self._sock.sendall(data)
                if closing:  # close frame written: give the peer a moment to answer
                    self._peer_done.wait(self.close_grace)
                    self._abort()
                    return
        except (OSError, ValueError) as exc:
            log.debug("websocket %s: write failed: %s", self.remote_addr, exc)
            self._abort()
        finally:
            self._writer = None

    # -- ending ----------------------------------------------------------------------------

    def _abort(self):
        """Shut the socket down (wakes a blocked reader and writer); the handler closes it."""
        if self._aborted:
            return
        self._aborted = True
        self._closing = True
        self._peer_done.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass

    def _drain(self):
        """After the app returned: read (and discard) until the peer's close frame or EOF."""
        try:
            if self._resync:  # a well-behaved peer sends the rest of the oversized frame
                self._skip(self._resync)
                self._resync = 0
                self._in_sync = True
            while not self._peer_done.is_set():
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
        ping = _frame(OP_PING, b"")
        try:
            while self._conns:
                gevent.sleep(self.interval)
                for n, conn in enumerate(list(self._conns)):
                    conn._enqueue_control(ping)  # a no-op once the connection is closing
                    if n % _PING_YIELD_EVERY == _PING_YIELD_EVERY - 1:
                        gevent.sleep(0)
        finally:
            self._timer = None
