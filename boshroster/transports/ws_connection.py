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
* gevent-websocket has no bound on what waits for a slow reader. Ours is bounded in bytes
  (``max_queue_bytes``: what waits behind the frame being written, so one stanza larger than
  the cap still goes out whole) and in frames while the socket is backed up (``queue_size``);
  a peer that does not read is cut off when either is exceeded (issue 10.9), and
  ``congested`` says when more than half the bytes are used. At most one pong waits at a
  time: a newer ping replaces the payload of the one not yet written (RFC 6455 §5.5.3), so a
  ping flood from a peer that never reads costs nothing;
* ``send(text, delivered)`` reports when the frame carrying ``text`` was accepted by the
  kernel (``delivered(True)``) or dropped because the connection ended first (``False``);
* the reader counts frames and wire bytes (headers included) per message, not only the
  payload (issue 10.11), and lets the event loop poll every couple of milliseconds when its
  socket never runs dry (issue 10.10);
* pings come from one timer greenlet per server (:class:`Pinger`), not one per connection;
* its error-path bodies are ``str`` (pywsgi needs bytes) and its access log goes to a silenced
  logger: we encode the bodies and restore pywsgi's ``log_request``;
* its per-byte Python unmasking and UTF-8 validator are slow: we unmask with one big-int XOR and
  decode with ``bytes.decode('utf-8')`` (strict) per complete message.
"""

import logging
import socket
import struct
from collections import deque
from time import monotonic as _monotonic

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
DEFAULT_MAX_QUEUE_BYTES = 2 * 1024 * 1024
DEFAULT_MAX_FRAMES = 128  # frames per message, control frames inside it included
DEFAULT_CLOSE_GRACE = 2.0
DEFAULT_FLUSH_TIMEOUT = 10.0

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_BATCH_BYTES = 256 * 1024  # writer coalesces queued frames up to this size per write
_DISCARD_CHUNK = 64 * 1024
_CLOSE = object()  # queue sentinel: write the close frame next, then stop writing
_PING_YIELD_EVERY = 500  # the pinger lets other greenlets run between groups of connections
_PONG = object()  # queue placeholder: the pong for the latest ping (payload in _pong)
#: every this many frames read (a message counts 4, so every 16 messages) the reader checks
#: whether the event loop polled within _HOG_SECONDS, and yields to it if not: this bounds
#: what one busy peer delays all the others (issue 10.10)
_YIELD_EVERY_FRAMES = 64
_HOG_SECONDS = 0.002
_pack_short = struct.Struct("!BB").pack
_pack_medium = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack



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


def _frame(opcode, payload):
    """An unmasked, final server frame (RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        return _pack_short(0x80 | opcode, n) + payload
    if n < 65536:
        return _pack_medium(0x80 | opcode, 126, n) + payload
    return _pack_long(0x80 | opcode, 127, n) + payload


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

    ``on_overflow`` may be set by the layer above (the XMPP stream): it is called once, from
    the greenlet whose :meth:`send` found the output queue full, after everything queued but
    not yet written was dropped. It must not block, and should end the connection with
    ``close(code, reason, final=[last messages])``; unset, the connection closes with 1008.
    """

    def __init__(self, sock, rfile, remote_addr, max_message=DEFAULT_MAX_MESSAGE,
                 ping_interval=DEFAULT_PING_INTERVAL, queue_size=DEFAULT_QUEUE_SIZE,
                 close_grace=DEFAULT_CLOSE_GRACE, flush_timeout=DEFAULT_FLUSH_TIMEOUT,
                 max_queue_bytes=DEFAULT_MAX_QUEUE_BYTES, max_frames=DEFAULT_MAX_FRAMES,
                 max_wire=0):
        self._sock = sock
        self._rfile = rfile
        self.remote_addr = remote_addr
        self.max_message = int(max_message)
        self.ping_interval = float(ping_interval or 0)
        self.queue_size = int(queue_size)
        self.close_grace = float(close_grace)
        self.flush_timeout = float(flush_timeout)
        self.max_queue_bytes = int(max_queue_bytes)
        self.max_frames = int(max_frames)
        #: wire bytes (headers and control frames inside the message included) per message;
        #: 0 = twice the payload cap, as Prosody's websocket_frame_buffer_limit
        self.max_wire = int(max_wire) or 2 * self.max_message
        self.on_overflow = None
        self.overflowed = False  # the output queue overflowed once (then the connection closes)
        #: code of the close frame we sent (None until close()), and of the one the peer sent
        #: (1005 = close frame without a status code; None if none was received)
        self.close_code = None
        self.peer_close_code = None

        # Writing state, mutated by any greenlet that sends and by the hub's _flush callback,
        # never across a yield except in the writer. Frames wait in _out until the end of the
        # current loop turn (_flush writes them without blocking) or, if the socket is backed
        # up, until _writer (then the only one allowed to write) has written them.
        # Stream positions count every byte of _out except pongs: _pushed is the position
        # after the last queued byte, _queued the bytes not yet accepted by the kernel
        # (in _out, or in the batch the writer is writing), so _pushed - _queued is written.
        self._out = deque()  # bounded by send(): max_queue_bytes, and queue_size when backed up
        self._queued = 0
        self._pushed = 0
        self._tracked = deque()  # (position after a tracked frame, its delivered callback)
        self._pong = None  # payload of the pong waiting in _out as _PONG (None: no pong queued)
        self._pong_left = 0  # bytes of a pong at the front of what is being written (not positions)
        self._inflight = 0  # bytes of the batch being written (or its unwritten rest, in _out[0])
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
        self._streak = 0  # frames read since the reader last yielded on purpose (reader only)
        self._iteration = -1  # the event loop's iteration count at the reader's last check
        self._since = 0.0  # when the reader last saw the loop poll (monotonic)
        self._aborted = False
        self._watchdog = None

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return "<WsConnection %s %s>" % (self.remote_addr, state)

    @property
    def closed(self):
        return self._closing or self._peer_done.is_set()

    @property
    def congested(self):
        """More than half of ``max_queue_bytes`` is waiting for the peer: the layer above
        should hold back (or bounce) what is not urgent rather than queue it."""
        return self._queued - self._inflight > self.max_queue_bytes >> 1

    @property
    def queued_bytes(self):
        """Bytes queued and not yet accepted by the kernel (pongs excepted)."""
        return self._queued

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

    # -- writing ---------------------------------------------------------------------------

    def send(self, text, delivered=None):
        """Queue one text message; never blocks. Returns whether it was queued.

        ``delivered``, if given, is called exactly once: ``delivered(True)`` once the kernel
        has accepted the last byte of the frame, ``delivered(False)`` if the connection ends
        (or the queue overflows) first. It runs in a greenlet, never in the hub: inline in
        the writer, in the caller (refused at once), or in a greenlet of its own; keep it short.
        """
        if self._closing:
            if delivered is not None:
                _call(delivered, False)
            return False
        frame = _frame(OP_TEXT, text.encode("utf-8"))
        behind = self._queued - self._inflight
        if behind and (behind + len(frame) > self.max_queue_bytes
                       or (self._writer is not None and len(self._out) >= self.queue_size)):
            # The peer is not reading fast enough. The cap counts what waits behind the
            # batch being written, and a frame always fits an empty queue: one large stanza
            # (a big roster) goes out whole and does not make the next small ones overflow.
            self._overflow(len(frame))
            if delivered is not None:
                _call(delivered, False)
            return False
        self._push(frame)
        if delivered is not None:
            self._tracked.append((self._pushed, delivered))
        return True

    def _ping(self, frame):
        """A ping from the Pinger; skipped while the socket is backed up (the peer is not
        reading, and the ping would only wait in the queue)."""
        if not self._closing and self._writer is None:
            self._push(frame)

    def _queue_pong(self, payload):
        """Answer a ping. While a pong is still queued, only its payload changes: RFC 6455
        §5.5.3 allows answering only the most recent ping, which bounds the pongs owed to a
        peer that pings and never reads to one."""
        if self._closing:
            return
        if self._pong is None:
            self._out.append(_PONG)
            self._schedule()
        self._pong = payload

    def _push(self, frame):
        self._out.append(frame)
        n = len(frame)
        if not self._queued:  # the next frame written: counts as in flight already
            self._inflight = n
        self._queued += n
        self._pushed += n
        if self._writer is None and not self._flush_scheduled:
            self._flush_scheduled = True
            self._hub.loop.run_callback(self._flush)

    def _schedule(self):
        if self._writer is None and not self._flush_scheduled:
            self._flush_scheduled = True
            self._hub.loop.run_callback(self._flush)

    def _written(self, sent):
        """``sent`` more bytes were accepted by the kernel: account them and report the
        tracked frames now complete."""
        skip = self._pong_left
        if skip:
            k = sent if sent < skip else skip
            self._pong_left = skip - k
            sent -= k
        self._queued -= sent
        self._inflight -= sent
        tracked = self._tracked
        if tracked:
            written = self._pushed - self._queued
            if tracked[0][0] <= written:
                done = []
                while tracked and tracked[0][0] <= written:
                    done.append(tracked.popleft()[1])
                self._report(done, True)

    def _report(self, callbacks, ok):
        if gevent.getcurrent() is self._hub:  # _flush: the hub must not run foreign code
            gevent.spawn(_call_all, callbacks, ok)
        else:
            _call_all(callbacks, ok)

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
                self._written(sent)
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
        sentinel was reached (its frame then ends the batch). A pong is only ever written at
        the start of a batch (so _pong_left covers the front of what is written)."""
        out = self._out
        self._partial_head = False
        batch = []
        size = 0
        while out and size < _BATCH_BYTES:
            item = out.popleft()
            if item is _PONG:
                if batch:
                    out.appendleft(item)
                    break
                item = _frame(OP_PONG, self._pong)
                self._pong = None
                self._pong_left = len(item)
            elif item is _CLOSE:
                batch.append(self._close_frame)
                self._inflight = size + len(self._close_frame) - self._pong_left
                return b"".join(batch), True
            batch.append(item)
            size += len(item)
        self._inflight = size - self._pong_left
        return (batch[0] if len(batch) == 1 else b"".join(batch)), False

    def _start_writer(self):
        if self._writer is None:
            self._writer = gevent.spawn(self._write_loop)

    def _overflow(self, size):
        self.overflowed = True
        log.warning("websocket %s: output queue full (%d bytes in %d frames, %d more refused; "
                    "limits %d bytes, %d frames while the socket is backed up): the peer is not "
                    "reading; closing", self.remote_addr, self._queued, len(self._out), size,
                    self.max_queue_bytes, self.queue_size)
        self._drop_queued()
        handler = self.on_overflow
        if handler is not None:
            handler()
        self.close(1008, "send queue overflow")  # no-op if the handler closed

    def _drop_queued(self):
        """Drop what waits in _out (not the half-written head, nor what the writer holds);
        tracked frames among it are reported undelivered."""
        out = self._out
        head = out.popleft() if self._partial_head and out else None
        dropped = 0
        for item in out:
            if item.__class__ is bytes:
                dropped += len(item)
        out.clear()
        self._pong = None
        if head is not None:
            out.append(head)
        self._queued -= dropped
        self._pushed -= dropped
        tracked = self._tracked
        lost = []
        while tracked and tracked[-1][0] > self._pushed:
            lost.append(tracked.pop()[1])
        if lost:
            lost.reverse()
            self._report(lost, False)

    def close(self, code=1000, reason="", final=()):
        """Send the text messages ``final`` (not subject to the queue caps), then a close
        frame with ``code``, after everything already queued; idempotent.

        Returns at once. The socket is shut down when the peer answers with its close frame, or
        ``ws_close_grace`` seconds after ours was written, or ``ws_flush_timeout`` +
        ``ws_close_grace`` seconds from now at the latest.
        """
        if self._closing:
            return
        for text in final:
            self._push(_frame(OP_TEXT, text.encode("utf-8")))
        self.close_code = code
        self._close_frame = _frame(OP_CLOSE, _close_payload(code, reason))
        self._closing = True
        self._out.append(_CLOSE)
        self._queued += len(self._close_frame)
        self._pushed += len(self._close_frame)
        self._start_writer()
        if not self._aborted:
            self._watchdog = gevent.spawn_later(self.flush_timeout + self.close_grace,
                                                self._abort)

    def _write_loop(self):
        """Write the backlog, then exit; after the close frame, linger for the peer's."""
        sock = self._sock
        try:
            while self._out:
                data, closing = self._take_batch()
                total = len(data)
                sent = sock.send(data)  # blocks (yields) until the kernel takes some
                self._written(sent)
                if sent < total:
                    view = memoryview(data)
                    while sent < total:
                        n = sock.send(view[sent:])
                        sent += n
                        self._written(n)
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
        """Shut the socket down (wakes a blocked reader and writer); the handler closes it.
        Tracked frames not written by now never will be: reported undelivered."""
        if self._aborted:
            return
        self._aborted = True
        self._closing = True
        self._peer_done.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        self._lose_tracked()

    def _lose_tracked(self):
        if self._tracked:
            lost = [cb for _, cb in self._tracked]
            self._tracked.clear()
            self._report(lost, False)

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


def _call(callback, ok):
    try:
        callback(ok)
    except Exception:  # a bug in the layer above must not break this connection's writer
        log.exception("websocket delivery callback failed")


def _call_all(callbacks, ok):
    for callback in callbacks:
        _call(callback, ok)


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
                    conn._ping(ping)  # a no-op once closing, or while the socket is backed up
                    if n % _PING_YIELD_EVERY == _PING_YIELD_EVERY - 1:
                        gevent.sleep(0)
        finally:
            self._timer = None
