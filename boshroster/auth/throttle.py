"""Failed-login throttling: a client guessing passwords is slowed down."""

from __future__ import annotations

import time
from collections import deque


class AuthThrottle:
    """Counts failed logins per source address in a sliding window.

    Shared state: ``_failures`` (address -> deque of times), mutated only by
    ``failed`` and ``blocked``, which never yield.
    """

    def __init__(self, limit: int, window: float, clock=time.monotonic):
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque] = {}

    def _recent(self, address: str) -> deque | None:
        times = self._failures.get(address)
        if times is None:
            return None
        cutoff = self.clock() - self.window
        while times and times[0] < cutoff:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def blocked(self, address: str) -> bool:
        if self.limit <= 0:
            return False
        times = self._recent(address)
        return times is not None and len(times) >= self.limit

    def failed(self, address: str) -> None:
        times = self._recent(address)
        if times is None:
            times = self._failures[address] = deque()
        times.append(self.clock())
        if len(self._failures) > 100000:  # bound memory under a spray of addresses
            self._failures.pop(next(iter(self._failures)))
