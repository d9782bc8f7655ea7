"""Failed-login throttling that slows a guesser down without locking out an office.

Issue 10 point 13: counting failures per source address alone means five typos
behind one NAT (or one unlisted proxy) lock every user of that address out.
So there are two independent counters:

* **per (address, username)**: after ``limit`` consecutive failures for the
  pair, that pair is locked for ``lockout`` seconds; every further failure
  doubles the lockout, up to ``lockout_max`` (exponential backoff, as OWASP's
  authentication cheat sheet recommends).  The pair is forgotten after a quiet
  ``window`` following its last failure or lockout, or at once on a successful
  login.  Guessing one account from one address is thereby capped at about one
  try per ``lockout_max``; user B never pays for user A's typos.
* **per address**: at most ``address_limit`` failures (any usernames) in a
  sliding ``address_window`` (ejabberd's mod_fail2ban: 20 per hour).  When it
  is reached the address may no longer try *new* usernames (password
  spraying); users who have already logged in successfully from that address
  since the server started keep their own per-pair budget, so an office is
  not locked out by one colleague's bad script.

Addresses in ``exempt`` (loopback by default: a same-host proxy or the app
itself) are never throttled.  Both checks happen where the username becomes
known, inside the SASL exchange (sasl.py), and a throttled attempt is answered
``<temporary-auth-failure/>`` (RFC 6120 §6.5.12) without checking the
password.  A throttled attempt is not itself counted as a failure.

Every limit hit is logged at WARNING with the address and the username (never
a password).  Usernames are attacker-controlled: they are logged with ``%r``
and cut to 64 characters.

Shared state: ``_pairs``, ``_addresses`` and ``_known``, mutated only by
``check``, ``failed`` and ``succeeded``, which never yield to the gevent hub,
so no lock is needed.  Each map is bounded (``max_entries``): the oldest entry
is dropped first, so a spray of addresses or names costs bounded memory.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

log = logging.getLogger("boshroster.auth")

DEFAULT_EXEMPT = ("127.0.0.0/8", "::1/128")


def _name(username: str | None) -> str:
    if username is None:
        return "(invalid username)"
    return repr(username if len(username) <= 64 else username[:64] + "...")


@dataclass
class _Pair:
    failures: int = 0
    last: float = 0.0
    until: float = 0.0  # locked while clock() < until


class AuthThrottle:
    """See the module docstring.  ``limit <= 0`` turns throttling off entirely."""

    def __init__(
        self,
        limit: int = 5,
        window: float = 900.0,
        *,
        lockout: float = 60.0,
        lockout_max: float = 900.0,
        address_limit: int = 50,
        address_window: float = 3600.0,
        exempt: tuple[str, ...] | list[str] = DEFAULT_EXEMPT,
        max_entries: int = 100_000,
        clock=time.monotonic,
    ):
        self.limit = limit
        self.window = window
        self.lockout = lockout
        self.lockout_max = max(lockout_max, lockout)
        self.address_limit = address_limit
        self.address_window = address_window
        self.exempt = tuple(ipaddress.ip_network(n, strict=False) for n in exempt)
        self.max_entries = max_entries
        self.clock = clock
        self._pairs: OrderedDict[tuple[str, str | None], _Pair] = OrderedDict()
        self._addresses: OrderedDict[str, deque] = OrderedDict()
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()  # pairs that logged in

    @classmethod
    def from_config(cls, config) -> "AuthThrottle":
        return cls(
            config.auth_failure_limit,
            config.auth_failure_window,
            lockout=config.auth_lockout_seconds,
            lockout_max=config.auth_lockout_max_seconds,
            address_limit=config.auth_address_failure_limit,
            address_window=config.auth_address_failure_window,
            exempt=config.auth_throttle_exempt,
        )

    # -- helpers -----------------------------------------------------------

    def _exempt(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if getattr(ip, "ipv4_mapped", None) is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.exempt)

    def _off(self, address: str) -> bool:
        return self.limit <= 0 or self._exempt(address)

    def _pair(self, key) -> _Pair | None:
        pair = self._pairs.get(key)
        if pair is not None and self.clock() > max(pair.last, pair.until) + self.window:
            del self._pairs[key]
            return None
        return pair

    def _address_failures(self, address: str) -> deque | None:
        times = self._addresses.get(address)
        if times is None:
            return None
        cutoff = self.clock() - self.address_window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._addresses[address]
            return None
        return times

    def _address_full(self, address: str) -> bool:
        if self.address_limit <= 0:
            return False
        times = self._address_failures(address)
        return times is not None and len(times) >= self.address_limit

    def _bound(self, table: OrderedDict) -> None:
        while len(table) > self.max_entries:
            table.popitem(last=False)

    # -- API used by sasl.SaslExchange -------------------------------------

    def check(self, address: str, username: str | None) -> float | None:
        """None if ``username`` may try to log in from ``address`` now, else the
        seconds to wait (logged at WARNING).  ``username`` is the prepared
        localpart, or None when it is not a valid one."""
        if self._off(address):
            return None
        now = self.clock()
        pair = self._pair((address, username))
        if pair is not None and pair.until > now:
            wait = pair.until - now
            log.warning(
                "login throttled: %s from %s has %d failed logins; refused for another %.0f s",
                _name(username), address, pair.failures, wait,
            )
            return wait
        if self._address_full(address) and (address, username) not in self._known:
            times = self._addresses[address]
            wait = max(times[0] + self.address_window - now, 0.0)
            log.warning(
                "login throttled: %s from %s refused, the address reached %d failed logins in %.0f s "
                "(password spraying?); users who logged in from there before are still let in",
                _name(username), address, len(times), self.address_window,
            )
            return wait
        return None

    def failed(self, address: str, username: str | None) -> None:
        """Count one failed login (wrong password, bad token, unknown user)."""
        if self._off(address):
            return
        now = self.clock()
        key = (address, username)
        pair = self._pair(key)
        if pair is None:
            pair = self._pairs[key] = _Pair()
        else:
            self._pairs.move_to_end(key)
        pair.failures += 1
        pair.last = now
        if pair.failures >= self.limit:
            seconds = min(self.lockout * 2 ** min(pair.failures - self.limit, 32), self.lockout_max)
            pair.until = now + seconds
            log.warning(
                "login throttled: %d failed logins for %s from %s; that pair is locked for %.0f s",
                pair.failures, _name(username), address, seconds,
            )
        self._bound(self._pairs)

        if self.address_limit <= 0:
            return
        times = self._address_failures(address)
        if times is None:
            # maxlen: only the newest address_limit times matter for the ceiling.
            times = self._addresses[address] = deque(maxlen=self.address_limit)
        else:
            self._addresses.move_to_end(address)
        times.append(now)
        if len(times) == self.address_limit:
            log.warning(
                "login throttled: %s reached %d failed logins in %.0f s; it may not try new usernames "
                "until the oldest failure is %.0f s old",
                address, self.address_limit, self.address_window, self.address_window,
            )
        self._bound(self._addresses)

    def succeeded(self, address: str, username: str) -> None:
        """A login succeeded: forget the pair's failures and remember it as known."""
        if self._off(address):
            return
        self._pairs.pop((address, username), None)
        key = (address, username)
        self._known.pop(key, None)
        self._known[key] = self.clock()
        self._bound(self._known)
