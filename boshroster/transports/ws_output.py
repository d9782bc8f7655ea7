"""The writing half of a WebSocket connection (RFC 6455 frames out): :class:`FrameWriter`.

:class:`~boshroster.transports.ws_connection.WsConnection` inherits it; it is a mixin only
to keep both halves under the 500-line module rule, and shares with the reading half
``_peer_done`` (an Event: the peer's close frame was read, or the socket ended),
``close_grace`` and ``flush_timeout``.

What it does that gevent-websocket 0.10.1 does not:

* one writer at a time (0.10.1's writes are not safe for concurrent greenlets). ``send``
  queues the frame and schedules a hub callback that writes everything queued during this
  loop turn in one non-blocking write (almost always enough: the kernel buffer has room);
  only what does not fit waits for a writer greenlet that exists while there is a backlog.
  So a slow reader never blocks the greenlet that routed to it, a burst costs one syscall,
  and an idle connection holds no writer greenlet;
* a bounded output queue (issue 10.9): in bytes, ``max_queue_bytes`` of what waits behind the
  frame being written (one frame always fits an empty queue, so one stanza larger than the
  cap still goes out whole), and ``queue_size`` frames while the socket is backed up. A peer
  that does not read is cut off when either is exceeded, and ``congested`` says when more
  than half the bytes are used;
* at most one pong waits at a time: a newer ping replaces the payload of the one not yet
  written (RFC 6455 §5.5.3), so a ping flood from a peer that never reads costs nothing;
* ``send(text, delivered)`` reports when the frame carrying ``text`` was accepted by the
  kernel (``delivered(True)``) or dropped because the connection ended first (``False``);
* nothing accepted is lost (issue 10): ``send(text, item=stanza)`` keeps ``stanza`` until its
  frame is written, and when the connection is over hands every such item whose frame never
  was to ``on_undelivered`` (the layer above routes them again, as BOSH's give-back does);
* close frames carry the status code (0.10.1's do not), after everything queued.
"""

import logging
import socket
import struct
from collections import deque

import gevent

__all__ = ["FrameWriter", "frame", "DEFAULT_MAX_QUEUE_BYTES"]

log = logging.getLogger("boshroster.transports.ws_connection")  # one logger for both halves

DEFAULT_MAX_QUEUE_BYTES = 2 * 1024 * 1024
OP_TEXT, OP_CLOSE, OP_PONG = 0x1, 0x8, 0xA

_BATCH_BYTES = 256 * 1024  # writer coalesces queued frames up to this size per write
_CLOSE = object()  # queue sentinel: write the close frame next, then stop writing
_PONG = object()  # queue placeholder: the pong for the latest ping (payload in _pong)
_pack_short = struct.Struct("!BB").pack
_pack_medium = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


def frame(opcode, payload):
    """An unmasked, final server frame (RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        return _pack_short(0x80 | opcode, n) + payload
    if n < 65536:
        return _pack_medium(0x80 | opcode, 126, n) + payload
    return _pack_long(0x80 | opcode, 127, n) + payload


def _close_payload(code, reason):
    raw = reason.encode("utf-8")[:123]
    raw = raw.decode("utf-8", "ignore").encode("utf-8")  # don't cut a character in half
    return struct.pack("!H", code) + raw


class FrameWriter:
    """The output queue and writer of a connection; any greenlet may send and close.

    ``on_overflow`` may be set by the layer above (the XMPP stream): it is called once, from
    the greenlet whose :meth:`send` found the output queue full, after everything queued but
    not yet written was dropped. It must not block, and should end the connection with
    ``close(code, reason, final=[last messages])``; unset, the connection closes with 1008.

    ``on_undelivered`` may be set too: it is called at most once, with the ``item`` of every
    frame sent with one that the kernel did not take whole (dropped on overflow, refused once
    closing, left in the queue when the socket died or the flush timed out), in queue order.
    It runs in the connection's handler greenlet once the app has returned (:meth:`_finish`),
    so after the XMPP session ended: what it routes again cannot come back to this connection.
    What was written to the kernel counts as sent: TCP may still lose it when the peer
    vanishes (stream management, XEP-0198, covers that: with it the layer above passes no
    item). A frame the kernel took only part of counts as not sent: nothing more of it is
    written after the socket died, and no client acts on half a frame (so no duplicate).
    """

    def _init_writer(self, sock, queue_size, max_queue_bytes):
        self._sock = sock
        self.queue_size = int(queue_size)
        self.max_queue_bytes = int(max_queue_bytes)
        self.on_overflow = None
        self.on_undelivered = None  # set by the layer above; cleared once called (_finish)
        self.overflowed = False  # the output queue overflowed once (then the connection closes)
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
        self._tracked = deque()  # (position after a tracked frame, its delivered callback, its item)
        self._lost = []  # items of frames never written, for on_undelivered (same mutators)
        self._pong = None  # payload of the pong waiting in _out as _PONG (None: no pong queued)
        self._pong_left = 0  # bytes of a pong at the front of what is being written (not positions)
        self._inflight = 0  # bytes of the batch being written (or its unwritten rest, in _out[0])
        self._partial_head = False  # _out[0] is what a write left (maybe half a frame): keep it
        self._writer = None
        self._flush_scheduled = False  # a _flush callback is pending in the hub
        self._hub = gevent.get_hub()
        self._close_frame = None
        self._closing = False  # close() called or socket dead: nothing more is queued
        self._aborted = False
        self._watchdog = None

    @property
    def congested(self):
        """More than half of ``max_queue_bytes`` is waiting for the peer: the layer above
        should hold back (or bounce) what is not urgent rather than queue it."""
        return self._queued - self._inflight > self.max_queue_bytes >> 1

    @property
    def queued_bytes(self):
        """Bytes queued and not yet accepted by the kernel (pongs excepted)."""
        return self._queued

    # -- writing ---------------------------------------------------------------------------

    def send(self, text, delivered=None, item=None):
        """Queue one text message; never blocks. Returns whether it was queued.

        ``delivered``, if given, is called exactly once: ``delivered(True)`` once the kernel
        has accepted the last byte of the frame, ``delivered(False)`` if the connection ends
        (or the queue overflows) first. It runs in a greenlet, never in the hub: inline in
        the writer, in the caller (refused at once), or in a greenlet of its own; keep it short.
        ``item``, if given, goes to ``on_undelivered`` when the frame is not written whole.
        """
        if self._closing:
            if delivered is not None:
                _call(delivered, False)
            if item is not None:
                self._lose_item(item)
            return False
        data = frame(OP_TEXT, text.encode("utf-8"))
        behind = self._queued - self._inflight
        if behind and (behind + len(data) > self.max_queue_bytes
                       or (self._writer is not None and len(self._out) >= self.queue_size)):
            # The peer is not reading fast enough. The cap counts what waits behind the
            # batch being written, and a frame always fits an empty queue: one large stanza
            # (a big roster) goes out whole and does not make the next small ones overflow.
            self._overflow(len(data))
            if delivered is not None:
                _call(delivered, False)
            if item is not None:
                self._lose_item(item)
            return False
        self._push(data)
        if delivered is not None or item is not None:
            self._tracked.append((self._pushed, delivered, item))
        return True

    def _lose_item(self, item):
        if self.on_undelivered is not None:
            self._lost.append(item)
        else:  # after _finish (the session has ended): nobody to give it back to
            log.debug("websocket %s: a stanza for a finished connection dropped", self.remote_addr)

    def _ping(self, ping):
        """A ping from the Pinger; skipped while the socket is backed up (the peer is not
        reading, and the ping would only wait in the queue)."""
        if not self._closing and self._writer is None:
            self._push(ping)

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

    def _push(self, data):
        self._out.append(data)
        n = len(data)
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
                    callback = tracked.popleft()[1]
                    if callback is not None:
                        done.append(callback)
                if done:
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
                item = frame(OP_PONG, self._pong)
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
        gone = []
        while tracked and tracked[-1][0] > self._pushed:
            gone.append(tracked.pop())
        gone.reverse()
        self._lose(gone)

    def _lose(self, entries):
        """These tracked frames will never be written: callbacks get False, items are kept
        for on_undelivered."""
        lost = []
        for _, callback, item in entries:
            if callback is not None:
                lost.append(callback)
            if item is not None:
                self._lose_item(item)
        if lost:
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
            self._push(frame(OP_TEXT, text.encode("utf-8")))
        self.close_code = code
        self._close_frame = frame(OP_CLOSE, _close_payload(code, reason))
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
            entries = list(self._tracked)
            self._tracked.clear()
            self._lose(entries)

    def _give_back(self):
        """The connection is over (from _finish): hand the items of the frames never written
        to ``on_undelivered``, once."""
        handler, self.on_undelivered = self.on_undelivered, None
        lost, self._lost = self._lost, []
        if lost and handler is not None:
            log.info("websocket %s: %d stanza(s) queued but never written: given back",
                     self.remote_addr, len(lost))
            try:
                handler(lost)
            except Exception:  # a bug in the layer above must not break the handler's cleanup
                log.exception("websocket give-back failed")


def _call(callback, ok):
    try:
        callback(ok)
    except Exception:  # a bug in the layer above must not break this connection's writer
        log.exception("websocket delivery callback failed")


def _call_all(callbacks, ok):
    for callback in callbacks:
        _call(callback, ok)
