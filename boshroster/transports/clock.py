"""Time and timers for transports, injectable so tests can drive them (issue 9 point 5).

A clock has three methods:

    now() -> float                     seconds, monotonic
    call_later(delay, fn, *args)       run ``fn(*args)`` in a new greenlet after ``delay``; returns a handle
    cancel(handle)                     the timer will not fire (None and fired handles are fine)

``GeventClock`` is the real one; tests/bosh_inprocess.py has ``FakeClock``,
whose time moves only when the test says so.
"""

from __future__ import annotations

from typing import Callable

import gevent


class GeventClock:
    """gevent's loop: ``call_later`` starts a loop timer (no greenlet until it fires),
    then runs ``fn`` in a new greenlet, so ``fn`` may block (ending a session may
    fetch a roster)."""

    def now(self) -> float:
        return gevent.get_hub().loop.now()

    def call_later(self, delay: float, fn: Callable, *args):
        timer = gevent.get_hub().loop.timer(max(0.0, delay))
        timer.start(gevent.spawn, fn, *args)
        return timer

    def cancel(self, handle) -> None:
        if handle is not None:
            handle.close()
