"""The c2s traffic shaper (``Shaper``), and pacing a BOSH session's stanzas to it without
holding its HTTP requests (``PacedInput``).

Over WebSocket the shaper (stream.py ``Shaper``) makes the reader greenlet sleep:
the server stops reading the socket, TCP pushes back on the client, as
ejabberd's c2s shaper does.  A BOSH body has already been read whole when its
stanzas are processed, and sleeping there holds the HTTP request: a
10,000-stanza body kept its request open ~90 s (past the client's and nginx's
~60 s timeouts) and, since requests are processed in rid order (XEP-0124 §14.2),
every later request of the session with it.

So a BOSH session paces instead: the stanzas the bucket has tokens for are
processed at once, in the request's greenlet (the usual case: a response carries
their results); the rest wait in ``queue`` and a clock timer processes them as
tokens come (``c2s_stanza_rate``).  The request is answered as usual (XEP-0124
§11: at once if something is pending, else at 'wait'), and later requests are
processed at once too: their stanzas go behind the queue, so the session's
order is kept (RFC 6120 §10.1).  The queue is bounded (``bosh_shaper_queue``,
the rate x a few seconds): a stanza that finds it full is refused with a
``resource-constraint`` (type ``wait``) error (RFC 6120 §8.3.3.18), so nothing
accepted is lost and nothing is processed behind the client's back for long.
When the stream ends, the queued messages are routed at once (the client was
answered: they were accepted); queued IQs and presences die with the stream.

Greenlet safety: the state (``queue``, ``busy``, ``timer``) is mutated by the
request greenlet holding the session's rid turn (``submit``), the timer's
greenlet (``_tick``) and ``stop`` (the session's end); ``busy`` makes sure only
one of them processes stanzas at a time, and in queue order.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable

import gevent

from boshroster.xmpp.xmlio import Element

log = logging.getLogger("boshroster.session")

_MIN_TICK = 0.05  # seconds between two batches at most 20 timers/s per paced session
_YIELD_EVERY = 100  # stanzas processed between two yields to other greenlets


class Shaper:
    """Token bucket of stanzas a client may send (like ejabberd's c2s shaper):
    ``burst`` at once, then ``rate`` per second.  Over the rate, the stream's own
    greenlet waits (``sleep``) before routing more: the client is slowed down,
    nothing is dropped, and nobody else waits."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "clock", "sleep", "throttled")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float], sleep: Callable[[float], None]):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.clock, self.sleep = clock, sleep
        self.stamp = clock()
        self.throttled = False

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self) -> float:
        """Account for one stanza; returns how long the stream waited."""
        self._refill()
        self.tokens -= 1
        if self.tokens >= 0:
            if self.tokens >= self.burst - 1:
                self.throttled = False  # a quiet spell refilled the bucket: warn again next time
            return 0.0
        delay = -self.tokens / self.rate
        self.sleep(delay)
        return delay

    def try_take(self) -> bool:
        """Take one token if there is one, never waiting (pacing.py: BOSH)."""
        self._refill()
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def wait_time(self) -> float:
        """Seconds until the next token (as of the last take)."""
        return max(0.0, (1 - self.tokens) / self.rate)


class PacedInput:
    """``process(el)`` handles one stanza; ``refuse(el)`` answers one that finds the queue full;
    ``shaper`` is the session's token bucket, on ``clock`` (transports/clock.py)."""

    def __init__(self, shaper, clock, limit: int, process: Callable[[Element], None],
                 refuse: Callable[[Element], None], who: Callable[[], str]):
        self.shaper = shaper
        shaper.clock = clock.now  # the transport's clock (a fake one in tests), not the wall
        shaper.stamp = clock.now()
        self.clock = clock
        self.limit = max(1, limit)
        self.process = process
        self.refuse = refuse
        self.who = who
        self.queue: deque[Element] = deque()  # bounded by ``limit``
        self.busy = False  # some greenlet is processing stanzas of this session
        self.timer = None
        self.stopped = False
        self._warned_slow = self._warned_full = False

    def submit(self, el: Element) -> None:
        """One stanza from the client: processed now if the bucket allows and nothing waits."""
        if self.stopped:
            return
        if not self.queue and not self.busy and self.shaper.try_take():
            if self.shaper.tokens >= self.shaper.burst - 1:
                self._warned_slow = self._warned_full = False  # quiet again: warn at the next flood
            self.busy = True
            try:
                self.process(el)
            finally:
                self.busy = False
            return
        if len(self.queue) >= self.limit:
            if not self._warned_full:
                self._warned_full = True
                log.warning("%s: %d stanzas already wait for the shaper (bosh_shaper_queue): "
                            "more are refused with resource-constraint", self.who(), len(self.queue))
            self.refuse(el)
            return
        if not self._warned_slow:
            self._warned_slow = True
            log.warning("%s sends faster than %s stanzas/s: paced", self.who(), self.shaper.rate)
        self.queue.append(el)
        if self.timer is None and not self.busy:
            self._schedule()

    def _schedule(self) -> None:
        self.timer = self.clock.call_later(max(self.shaper.wait_time(), _MIN_TICK), self._tick)

    def _tick(self) -> None:
        self.timer = None
        if self.stopped or self.busy:
            return
        self.busy = True
        try:
            done = 0
            while self.queue and not self.stopped and self.shaper.try_take():
                self.process(self.queue.popleft())
                done += 1
                if done % _YIELD_EVERY == 0:
                    gevent.sleep(0)  # one paced session must not stall everyone else
        finally:
            self.busy = False
        if self.queue and not self.stopped and self.timer is None:
            self._schedule()

    def stop(self) -> list[Element]:
        """The stream is ending: no more processing; returns what was still queued."""
        self.stopped = True
        self.clock.cancel(self.timer)
        self.timer = None
        left, self.queue = list(self.queue), deque()
        return left
