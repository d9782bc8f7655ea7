"""Noticing that a client closed the connection of its held BOSH request, without reading it.

A browser that reloads the page (or navigates away) closes the connection of the
request BOSH is holding.  If that request were answered afterwards, its stanzas
would go into a dead socket, and the next request of the session (the reloaded
page resuming the session with its stored sid and rid, XEP-0206 §5 / XEP-0124 §9)
would acknowledge them (a new request acknowledges every response sent before it,
bosh_outbox.py): lost.  So while a request is held, its socket is watched for
read-readiness (the hub's ``loop.io``; nothing is read: the next request on that
connection must stay in the socket for pywsgi).  Readable with nothing to read
(end of file) or reset means the client is gone; readable with data means it
pipelined something, which says it is alive: the watch then stops (it would fire
on every loop turn otherwise).  ``closed()`` is the same check done at once,
right before a held request is answered with stanzas (a close and a stanza can
arrive in the same loop turn, the stanza's flush first).

Headless Chromium closes a reloading page's connections when the new page
commits, about when the new page sends its first request: whichever the server
sees first, nothing is lost (the close: this watch; the new request: the old one
is answered by the hold limit, §11, with what is pending, usually nothing).

pywsgi gives the application no socket; ``http_handler.ServerHandler`` puts it in
the environ under ``ENVIRON_KEY``.

Greenlet safety: a watch belongs to one held request; ``start``/``stop`` run in
that request's greenlet, the readiness callback in the hub (it must not block:
the peek is a non-blocking syscall on the underlying socket object, never
gevent's cooperative ``recv``, which would wait in the hub); ``on_close`` runs
in a greenlet spawned from there.
"""

from __future__ import annotations

import socket
from typing import Callable

import gevent

ENVIRON_KEY = "boshroster.socket"
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def _peek(sock) -> bytes | None:
    """b"" when the peer closed (end of file) or reset the connection, one byte when
    data is waiting, None when nothing is.  Never reads, never blocks."""
    raw = getattr(sock, "_sock", sock)  # gevent's socket wraps the real one (its recv would wait)
    try:
        return raw.recv(1, _PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:  # ECONNRESET, ENOTCONN, a closed descriptor: gone
        return b""


def peer_closed(sock) -> bool:
    return _peek(sock) == b""


class ConnectionWatch:
    """The read-readiness watch of one held request's connection."""

    __slots__ = ("sock", "_watcher", "_on_close")

    def __init__(self, sock):
        self.sock = sock
        self._watcher = None
        self._on_close: Callable[[], None] | None = None

    def closed(self) -> bool:
        return peer_closed(self.sock)

    def start(self, on_close: Callable[[], None]) -> None:
        """Call ``on_close`` (once, in a greenlet of its own) when the client closes the connection."""
        try:
            fd = self.sock.fileno()
        except OSError:
            fd = -1
        if fd < 0:
            return
        self._on_close = on_close
        self._watcher = gevent.get_hub().loop.io(fd, 1)
        self._watcher.start(self._readable)

    def _readable(self) -> None:
        seen = _peek(self.sock)
        if seen is None:
            return  # a spurious wakeup: keep watching
        on_close = self._on_close
        self.stop()  # closed, or data (alive): either way nothing more to learn here
        if seen == b"" and on_close is not None:
            gevent.spawn(on_close)  # out of the hub: it logs, and a log handler may block

    def stop(self) -> None:
        watcher, self._watcher, self._on_close = self._watcher, None, None
        if watcher is not None:
            watcher.stop()
            watcher.close()
