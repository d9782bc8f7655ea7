"""Per-user roster cache with single-flight fetching and a grace period.

The session core calls ``hold``/``release`` as resources come and go,
``get`` to answer a roster get, and ``refresh`` when the backend says a
roster changed; the HTTP refresh handler calls ``refresh`` for users who are
online or still cached, and ``drop`` when such a refresh fails for a user who
is offline (contract §4: no stale copy for the next login).

Revalidation at login (issue 10 point 14): a roster kept through the grace
period after a logout may have changed at the backend without a refresh (the
backend may not know the user is cached).  So when the first resource of a
user binds (``hold`` from 0 to 1, a login) while a copy is cached, the copy
is marked stale and the next ``get`` revalidates it: a conditional GET when
the backend sent an ETag or Last-Modified with it (304: keep the copy), a
full GET otherwise, as Prosody fetches at every first login.  The stale copy
is served only if the backend cannot be reached (``get`` raises, the caller
falls back to ``cached``).  Concurrent logins of one user share that one GET.

Fetch at bind (``prefetch``, the default): that login fetch (or revalidation)
starts when the resource binds, as Prosody loads the roster at bind, not when
the roster get arrives one client round trip later; the roster get joins it.
If it failed, the next ``get`` gets its error instead of a second GET at once.

Fetch at authentication (``prefetch_login``, issue 12): earlier still, when SASL
succeeds, so the GET overlaps the client's stream restart and bind (two round
trips).  The stream keeps the flight that call returned and hands it to
``hold`` at bind (``login_flight``): a bind whose login fetch is that flight,
still running or done and stored, is that login's revalidation; no second GET.
Anything else (the flight was dropped, failed, or replaced by a newer roster)
takes the bind path above.  A user who authenticates and never binds leaves a
cached roster that expires after the grace period, like one whose user logged out.
"""

from __future__ import annotations

import heapq
import logging
import time
from typing import Callable

import gevent
from gevent.event import AsyncResult

from boshroster.roster.model import Roster
from boshroster.roster.backend import RosterFetchError, Validators

log = logging.getLogger("boshroster.roster_cache")

__all__ = ["RosterCache"]


class _Flight:
    """One backend fetch for one user, and everyone waiting for it.

    ``result`` is set to ``(old, new)`` or to an exception.  ``started``
    turns true when the fetching greenlet runs (before that, the GET has not
    been issued, so anyone may join it and still see fresh data).  ``store``
    is false once ``drop()`` made the result stale.  ``followup`` is the
    fetch chained after this one by refreshes that arrived while it ran.
    ``conditional``: only a login's revalidation asked for this fetch, so it
    may be a conditional GET; a refresh that joins it makes it a full GET
    (the backend said the roster changed: no validator is needed to know)."""

    __slots__ = ("result", "started", "store", "followup", "conditional")

    def __init__(self, conditional: bool = False) -> None:
        self.result: AsyncResult = AsyncResult()
        self.started = False
        self.store = True
        self.followup: _Flight | None = None
        self.conditional = conditional


class RosterCache:
    """Greenlet-safe roster cache in front of a ``RosterBackend``.

    Shared state (all plain dicts on this object, keyed by prepared username):

    * ``_rosters``  username -> Roster currently cached;
    * ``_flights``  username -> the _Flight in progress (at most one; a
      refresh that must see newer data hangs a ``followup`` on it);
    * ``_holders``  username -> number of online resources (hold/release);
    * ``_expiry`` + ``_heap``  eviction time of cached rosters whose user has
      no holder (the heap may hold stale entries; ``_expiry`` is the truth);
    * ``_validators``  username -> the ETag/Last-Modified of the cached roster;
    * ``_stale``  users who logged in while their roster was cached: their
      next ``get`` revalidates (cleared when any fetch for them completes);
    * ``_prefetched``  username -> the flight a login started at bind, until
      the next ``get`` (or the last release) takes it: its error is served once.

    Who mutates it: the public methods (called from session and HTTP
    greenlets) and ``_run``, the one greenlet spawned per backend fetch,
    which stores the result and starts the follow-up.

    Why it is greenlet-safe: gevent switches greenlets only where code
    blocks.  In this class the only yields are (1) ``AsyncResult.get()`` in
    ``get``/``refresh``, which waits for a flight and touches no state
    afterwards except reading the result, and (2) ``backend.fetch()`` inside
    ``_run``, before which ``_run`` has changed nothing and after which it
    updates the state without yielding again.  ``gevent.spawn``, the clock,
    dict and heap operations never yield, so every method's read-check-write
    sequence is atomic with respect to other greenlets.  (Log calls are made
    only where the state is consistent, in case a handler does socket I/O.)
    Not thread-safe: use from one gevent hub.

    Eviction is lazy: every public call first evicts rosters whose grace has
    passed, so nothing grows without bound, and a stale roster is never
    returned.  Call ``hold`` before ``get`` at login, so a refresh that races
    with the login sees the user as online.
    """

    def __init__(self, backend, *, grace_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, prefetch: bool = True) -> None:
        self._backend = backend
        self._prefetch = prefetch
        self._grace = grace_seconds
        self._clock = clock
        self._rosters: dict[str, Roster] = {}
        self._flights: dict[str, _Flight] = {}
        self._holders: dict[str, int] = {}
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._validators: dict[str, Validators] = {}
        self._stale: set[str] = set()
        self._prefetched: dict[str, _Flight] = {}
        # fetch_validated (conditional GETs) if the backend has it; test stubs may have fetch only
        self._fetch_validated = getattr(backend, "fetch_validated", None)

    # -- reading ------------------------------------------------------------------
    def get(self, username: str) -> Roster:
        """The cached roster, else the result of the (single) fetch for it.

        After a login with a copy cached (see the module docstring), the copy
        is revalidated first: this waits for a fetch (joining one in flight).
        Raises RosterFetchError, shared with every caller waiting on the same
        fetch; the stale copy is then still ``cached()``."""
        self._evict_expired()
        prefetched = self._prefetched.pop(username, None)
        roster = self._rosters.get(username)
        if roster is not None and username not in self._stale:
            return roster
        flight = self._flights.get(username)
        if flight is None and prefetched is not None and prefetched.result.ready():
            # The fetch this login started at bind failed a moment ago (a success
            # would be cached): its error, not a second GET right away.
            return prefetched.result.get()[1]
        if flight is None or not flight.store:
            # Nothing in flight, or the fetch in flight was started before a
            # drop() and its data is stale: wait for a fresh one.
            flight = self._fresh_flight(username, conditional=roster is not None)
        return flight.result.get()[1]

    def refresh(self, username: str) -> tuple[Roster | None, Roster]:
        """Fetch the roster again, from a GET issued after this call began.

        Returns ``(old, new)``: ``new`` is now cached, ``old`` is the roster it
        replaced in the cache (None if there was none).  Transitions chain:
        successive refreshes return (r0, r1), (r1, r2)...  Refreshes coalesced
        into the same fetch return the very same tuple object: push its diff
        once (RosterService.refresh_user skips a tuple it has already applied;
        pushing it again would repeat every push and presence stanza).  Raises
        RosterFetchError; the cache then keeps what it had."""
        self._evict_expired()
        return self._fresh_flight(username, conditional=False).result.get()

    def cached(self, username: str) -> Roster | None:
        """The cached roster, or None; never fetches, never waits."""
        self._evict_expired()
        return self._rosters.get(username)

    def fetching(self, username: str) -> bool:
        """Whether a backend fetch for this user is in progress or queued."""
        return username in self._flights

    def __len__(self) -> int:
        """Number of cached rosters (for metrics)."""
        self._evict_expired()
        return len(self._rosters)

    # -- lifecycle ----------------------------------------------------------------
    def drop(self, username: str) -> None:
        """Forget the user's cached roster; a fetch already in flight will not
        be stored (its waiters still get its result), so the next get fetches
        afresh."""
        self._forget(username)
        flight = self._flights.get(username)
        if flight is not None and flight.started:
            flight.store = False

    def prefetch_login(self, username: str) -> _Flight | None:
        """A login authenticated: start its fetch or revalidation now (see the module
        docstring); returns the flight to hand to ``hold``, or None when nothing was
        started (the user is online already: the cached copy is current, or prefetching
        is off).  Never yields."""
        self._evict_expired()
        if not self._prefetch or self._holders.get(username, 0):
            return None
        cached = username in self._rosters
        if cached:
            self._stale.add(username)
        flight = self._flights.get(username)
        if flight is None or not flight.store:
            flight = self._fresh_flight(username, conditional=cached)
        self._prefetched[username] = flight
        return flight

    def _is_login_fetch(self, username: str, flight: _Flight | None) -> bool:
        """Whether ``flight`` (from ``prefetch_login``) still stands for this login's fetch:
        running (its result will be stored), failed (the roster get gets its error, as
        after a failed fetch at bind), or done and its roster the one cached."""
        if flight is None or not flight.store:
            return False
        if not flight.result.ready():
            current = self._flights.get(username)
            return current is flight or (current is not None and current.followup is flight)
        if not flight.result.successful():
            return True
        return self._rosters.get(username) is flight.result.get()[1] and username not in self._stale

    def hold(self, username: str, login_flight: _Flight | None = None) -> None:
        """One more online resource for this user: keep the roster cached.

        The first one (a login) marks a cached copy stale (see ``get``) and, with
        ``prefetch``, starts the login's fetch or revalidation now, unless
        ``login_flight`` (what ``prefetch_login`` returned at this login's
        authentication) already is that fetch; never yields."""
        self._evict_expired()
        count = self._holders.get(username, 0)
        self._holders[username] = count + 1
        self._expiry.pop(username, None)
        if count:
            return
        if self._is_login_fetch(username, login_flight):
            self._prefetched[username] = login_flight
            return
        cached = username in self._rosters
        if cached:
            self._stale.add(username)
        if self._prefetch:
            flight = self._flights.get(username)
            if flight is None or not flight.store:
                flight = self._fresh_flight(username, conditional=cached)
            self._prefetched[username] = flight

    def is_stale(self, username: str) -> bool:
        """Whether the cached copy waits for its login revalidation."""
        return username in self._stale

    def release(self, username: str) -> None:
        """One resource fewer; at zero the roster stays ``grace_seconds`` more."""
        count = self._holders.get(username, 0)
        if count <= 0:
            log.warning("roster cache: release(%r) without a matching hold", username)
            return
        if count > 1:
            self._holders[username] = count - 1
            return
        del self._holders[username]
        self._prefetched.pop(username, None)
        if username in self._rosters:
            self._schedule_expiry(username)
        self._evict_expired()

    def is_held(self, username: str) -> bool:
        return self._holders.get(username, 0) > 0

    # -- internals -------------------------------------------------------------------
    def _fresh_flight(self, username: str, *, conditional: bool) -> _Flight:
        """A flight whose GET has not been issued yet (new, joined or chained).

        ``conditional``: the caller only revalidates (a login); a refresh
        passes False, and a flight it joins becomes a full GET."""
        flight = self._flights.get(username)
        if flight is None:
            return self._launch(username, _Flight(conditional))
        if not flight.started:
            flight.store = True
            flight.conditional = flight.conditional and conditional
            return flight
        if flight.followup is None:
            flight.followup = _Flight(conditional)
        else:
            flight.followup.conditional = flight.followup.conditional and conditional
        return flight.followup

    def _launch(self, username: str, flight: _Flight) -> _Flight:
        self._flights[username] = flight
        gevent.spawn(self._run, username, flight)
        return flight

    def _run(self, username: str, flight: _Flight) -> None:
        flight.started = True
        error: BaseException | None = None
        # What a 304 confirms: the copy cached when the GET is issued (one
        # flight per user at a time, so nothing else replaces it meanwhile
        # except drop(), which clears flight.store).
        base = self._rosters.get(username) if flight.conditional else None
        validators = self._validators.get(username) if base is not None else None
        got: Validators | None = None
        try:
            if self._fetch_validated is not None:
                new, got = self._fetch_validated(username, validators)
                if new is None:  # 304 Not Modified
                    new, got = base, validators
            else:
                new = self._backend.fetch(username)
        except RosterFetchError as exc:
            error = exc
        except gevent.GreenletExit:
            error = RosterFetchError("connection", f"roster fetch for {username!r} aborted")
        except Exception as exc:  # a bug: log it, but never leave waiters hanging
            log.exception("roster cache: unexpected error fetching %r", username)
            error = RosterFetchError(
                "connection", f"internal error fetching roster of {username!r}: {exc!r}")
        # From here to the end: no yields.
        self._evict_expired()
        self._stale.discard(username)  # fetched, or the backend is down: serve what we have
        outcome: tuple[Roster | None, Roster] | None = None
        if error is None:
            if flight.store:
                old = self._rosters.get(username)
                self._rosters[username] = new
                if got is not None:
                    self._validators[username] = got
                else:
                    self._validators.pop(username, None)
                if self.is_held(username):
                    self._expiry.pop(username, None)
                else:
                    self._schedule_expiry(username)
                outcome = (old, new)
            else:
                outcome = (None, new)
        if error is not None and not self.is_held(username) and self._prefetched.get(username) is flight:
            # A login fetch that failed before its bind: hold() gets the flight from the
            # login itself; a stream that never binds leaves no entry behind.
            del self._prefetched[username]
        if self._flights.get(username) is flight:
            if flight.followup is not None:
                self._launch(username, flight.followup)
            else:
                del self._flights[username]
        if error is None:
            flight.result.set(outcome)
        else:
            flight.result.set_exception(error)

    def _schedule_expiry(self, username: str) -> None:
        when = self._clock() + self._grace
        self._expiry[username] = when
        heapq.heappush(self._heap, (when, username))

    def _evict_expired(self) -> None:
        heap = self._heap
        if not heap:
            return
        now = self._clock()
        while heap and heap[0][0] <= now:
            when, username = heapq.heappop(heap)
            if self._expiry.get(username) == when:
                self._forget(username)

    def _forget(self, username: str) -> None:
        self._prefetched.pop(username, None)
        self._rosters.pop(username, None)
        self._expiry.pop(username, None)
        self._validators.pop(username, None)
        self._stale.discard(username)
