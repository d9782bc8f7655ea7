"""Roster delegation, the mod_http_roster_admin contract, as a module that hooks in.

Rosters belong to the web application: fetched from the backend through
RosterCache (cache.py: single-flight fetches, grace period) and RosterBackend
(backend.py: timeouts, size limits, bounded concurrency), never changed by
clients.  Hooks, the way the Lua module does it:

  ``iq-get/self/jabber:iq:roster:query``   the roster (RFC 6121 §2.1.3, versioning §2.6)
  ``iq-set/self/jabber:iq:roster:query``   refused: ``service-unavailable``
  ``pre-presence/*`` (priority 200)        subscription requests dropped (mod_block_subscriptions)
  ``authenticated``                        start the login's fetch at SASL success (cache.prefetch_login)
  ``resource-bind`` / ``resource-unbind``  keep the user's roster cached while online
  ``stream-features``                      advertise roster versioning

and fires ``roster-item-added`` / ``roster-item-removed`` (presence both ways)
after pushes.  ``refresh_users`` is what ``POST /roster_admin/refresh`` calls.
``contacts``/``shares_with`` answer presence at once from the cache; a roster
not known yet is loaded in the background (presence never waits on the
backend, nor blocks the session's other stanzas).

Shared state, all mutated without yielding: ``_retrying`` (usernames with a
background retry greenlet), ``_loading`` (usernames with a background load
for presence), ``_awaiting`` (sessions whose roster get was
answered with an error: the retry owes them the contacts), ``_applied``
(the last few refresh transitions pushed per user: refreshes coalesced into
one fetch get the same ``(old, new)`` tuple from the cache, and its diff must
be pushed once), ``_login_flights`` (session -> the fetch its authentication
started, until it binds; weak keys: a stream that never binds leaves nothing)
and ``_push_id``.  Fetches yield (HTTP), so every caller
re-checks session state after ``cache.get``.
"""

from __future__ import annotations

import itertools
import logging
import types
import weakref
from collections import deque
from typing import TYPE_CHECKING, Iterable

import gevent
import gevent.event
import gevent.pool

from boshroster.im.presence import SUBSCRIPTION_TYPES, RosterChange
from boshroster.roster.backend import RosterFetchError
from boshroster.roster.model import Roster, RosterItem
from boshroster.xmpp.errors import StanzaError
from boshroster.xmpp.events import EventBus
from boshroster.xmpp.router import HANDLED, RESULT, StanzaEvent
from boshroster.xmpp.tags import IQ, ROSTER_GROUP, ROSTER_ITEM, ROSTER_QUERY
from boshroster.xmpp.xmlio import E, Element, NS_ROSTER, NS_ROSTERVER

if TYPE_CHECKING:
    from boshroster.roster.cache import RosterCache
    from boshroster.xmpp.sessions import SessionManager
    from boshroster.xmpp.stream import ClientSession, FeaturesEvent

log = logging.getLogger("boshroster.roster")

_EMPTY = types.MappingProxyType({})
_ROSTERVER = E(f"{{{NS_ROSTERVER}}}ver")


def item_element(item: RosterItem, subscription: str = "both") -> Element:
    el = E(ROSTER_ITEM, {"jid": item.jid, "name": item.name or None, "subscription": subscription})
    for group in item.groups:
        el.append(E(ROSTER_GROUP, text=group))
    return el


class RosterDelegation:
    def __init__(self, cache: "RosterCache", sessions: "SessionManager", bus: EventBus, *,
                 refresh_concurrency: int, retry_count: int, retry_backoff: float):
        self.cache = cache
        self.sessions = sessions
        self.bus = bus
        self.refresh_concurrency = max(1, refresh_concurrency)
        self.retry_count = retry_count
        self.retry_backoff = retry_backoff
        self._retrying: set[str] = set()
        self._loading: set[str] = set()
        self._awaiting: dict[str, set["ClientSession"]] = {}
        self._applied: dict[str, deque] = {}
        self._login_flights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._push_id = itertools.count(1)

    def register(self, bus: EventBus) -> None:
        query = f"{NS_ROSTER}:query"
        bus.hook(f"iq-get/self/{query}", self.handle_get)
        bus.hook(f"iq-set/self/{query}", self._refuse_set)
        for to_type in ("self", "bare", "full", "host"):
            bus.hook(f"pre-presence/{to_type}", self._drop_subscription, priority=200)
        bus.hook("authenticated", self._authenticated)
        bus.hook("resource-bind", self._bound)
        bus.hook("resource-unbind", self._user_offline)
        bus.hook("stream-features", self._features)

    def _authenticated(self, session) -> None:
        """SASL succeeded: start the login's roster fetch now (cache.prefetch_login), so it
        overlaps the client's restart and bind; ``_bound`` hands the flight to ``hold``."""
        flight = self.cache.prefetch_login(session.username)
        if flight is not None:
            self._login_flights[session] = flight

    def _bound(self, session) -> None:
        self.cache.hold(session.username, self._login_flights.pop(session, None))

    # -- what other modules ask --------------------------------------------

    def contacts(self, username: str):
        """Bare JIDs in ``username``'s roster, at once: a roster not cached yet is
        loaded in the background (presence is exchanged when it arrives)."""
        roster = self.cache.cached(username)
        if roster is None:
            self._load_in_background(username)
            return _EMPTY
        return roster.items

    def shares_with(self, owner: str, viewer_bare: str) -> bool:
        return viewer_bare in self.contacts(owner)

    # -- hooks -------------------------------------------------------------

    @staticmethod
    def _features(event: "FeaturesEvent") -> None:
        event.features.append(_ROSTERVER)

    @staticmethod
    def _drop_subscription(event: StanzaEvent):
        ptype = event.stanza.get("type")
        if ptype in SUBSCRIPTION_TYPES:
            log.debug("dropped %s presence from %s to %s (rosters belong to the backend)",
                      ptype, event.origin.jid_str, event.to)
            return True
        return None

    @staticmethod
    def _refuse_set(event: StanzaEvent):
        # The backend app owns rosters; mod_http_roster_admin answers this way too.
        raise StanzaError("service-unavailable", "cancel", "rosters are managed by the web application")

    def _user_offline(self, session: "ClientSession") -> None:
        username = session.username
        self.cache.release(username)
        if not self.sessions.is_online(username):
            self._applied.pop(username, None)

    # -- roster get (RFC 6121 §2.1.3, versioning §2.6) ------------------------

    def handle_get(self, event: StanzaEvent):
        origin, iq = event.origin, event.stanza
        origin.interested = True
        username = origin.username
        try:
            roster = self.cache.get(username)
        except RosterFetchError as exc:
            roster = self.cache.cached(username)
            if roster is None:
                # Never close the session, never leave the IQ unanswered: a retryable error.
                log.warning("roster of %s unavailable (%s); answering a retryable error", username, exc)
                if self._schedule_retry(username):
                    self._awaiting.setdefault(username, set()).add(origin)
                condition = "remote-server-timeout" if getattr(exc, "reason", "") == "timeout" else "internal-server-error"
                raise StanzaError(condition, "wait", "the contact list service is unavailable, retrying") from None
            log.warning("roster fetch for %s failed (%s); serving the cached copy", username, exc)
        if origin.ended:
            return HANDLED
        waiting = self._awaiting.get(username)
        if waiting:
            waiting.discard(origin)  # it gets the whole roster now
        client_ver = iq[0].get("ver")
        if client_ver is not None and client_ver == roster.ver:
            return RESULT
        query = E(ROSTER_QUERY, {"ver": roster.ver})
        for item in roster.items.values():  # Roster keeps its items sorted by JID
            query.append(item_element(item))
        return query

    # -- refresh (the backend says rosters changed) -----------------------------

    def refresh_users(self, usernames: Iterable[str], timeout: float) -> tuple[int, int]:
        """Re-fetch online and cached users, count the others as updated; (updated, errors).

        Bounded in time: the answer comes after ``timeout`` at the latest, and
        a user whose refresh has not finished by then counts as an error (a
        fetch already started goes on and its pushes still happen; users not
        started yet are not fetched: the caller was told they failed).  At most
        ``refresh_max_concurrency`` refreshes run at once, so a refresh of
        10,000 online users is paced instead of queueing 10,000 fetches that
        would time out waiting for a backend slot.
        """
        usernames = list(usernames)
        if not usernames:
            return 0, 0
        outcome: list[bool] = []
        done = gevent.event.Event()

        def run(name: str) -> None:
            try:
                ok = self.refresh_user(name)
            except Exception:  # a bug: count it as an error, never leave the request hanging
                log.exception("refresh of %s failed unexpectedly", name)
                ok = False
            outcome.append(ok)
            if len(outcome) == len(usernames):
                done.set()

        pool = gevent.pool.Pool(self.refresh_concurrency)

        def feed() -> None:
            for name in usernames:
                pool.spawn(run, name)  # waits while the pool is full

        # Spawning from a separate greenlet: Pool.spawn blocks when the pool is
        # full, and the answer must not wait for that beyond ``timeout``.
        feeder = gevent.spawn(feed)
        done.wait(timeout)
        feeder.kill(block=False)
        updated = sum(1 for ok in outcome if ok)
        return updated, len(usernames) - updated

    def refresh_user(self, username: str) -> bool:
        """True when the user's roster is up to date (or nothing was cached).

        An offline user whose roster is still cached (the grace period after a
        logout, when a page reload is likely) is re-fetched like an online one,
        so the reload finds the new roster without a fetch; if that fetch
        fails, the stale copy is dropped instead, so the next login fetches."""
        if (not self.sessions.is_online(username) and self.cache.cached(username) is None
                and not self.cache.fetching(username)):
            self._applied.pop(username, None)
            return True  # nothing cached: the next login fetches
        try:
            transition = self.cache.refresh(username)
        except RosterFetchError as exc:
            if not self.sessions.is_online(username):
                log.warning("refresh of %s (offline) failed: %s; cached copy dropped", username, exc)
                self.cache.drop(username)
                self._applied.pop(username, None)
                return True
            log.warning("refresh of %s failed: %s", username, exc)
            return False
        if not self.sessions.is_online(username):
            return True  # went offline meanwhile: the new roster is cached, no one to push to
        # Refreshes coalesced into one fetch all get this very tuple: push its diff once.
        applied = self._applied.setdefault(username, deque(maxlen=8))
        if any(seen is transition for seen in applied):
            return True
        applied.append(transition)
        old, new = transition
        self.apply_diff(username, old, new)
        return True

    def apply_diff(self, username: str, old: Roster | None, new: Roster) -> None:
        """Pushes, one <item/> each (RFC 6121 §2.1.6), then presence for added/removed contacts."""
        if old is None:
            added, removed, changed = tuple(new.items.values()), (), ()
            self._awaiting.pop(username, None)  # every interested session gets every contact now
        else:
            diff = old.diff(new)
            added, removed, changed = diff.added, diff.removed, diff.changed
        if not (added or removed or changed):
            return
        log.info(
            "roster of %s changed: %d added, %d removed, %d changed", username, len(added), len(removed), len(changed)
        )
        targets = [s for s in self.sessions.sessions_of(username) if s.interested]
        items = [item_element(item) for item in added + changed] + [item_element(item, "remove") for item in removed]
        self._push_all(targets, items, new.ver)
        for item in added:
            self.bus.fire("roster-item-added", RosterChange(username, item.jid))
        for item in removed:
            self.bus.fire("roster-item-removed", RosterChange(username, item.jid))

    def _push_all(self, sessions: list["ClientSession"], items: list[Element], ver: str) -> None:
        """One push per item.  RFC 6121 §2.6.3: a push's ver is the roster's version
        after that push, so only the last push carries ``ver`` (the new roster's);
        the earlier ones carry interim versions that match no roster, so a client
        that saw only some of the pushes gets the whole roster at its next get."""
        for index, item in enumerate(items, 1):
            push_ver = ver if index == len(items) else f"{ver}-{index}"
            for session in sessions:
                self._push(session, item, push_ver)

    def _push(self, session: "ClientSession", item: Element, ver: str) -> None:
        if not session.ended:
            session.send(
                E(
                    IQ,
                    {"type": "set", "id": f"push{next(self._push_id)}", "to": session.jid_str},
                    E(ROSTER_QUERY, {"ver": ver}, item),  # item elements are shared, never mutated
                )
            )

    # -- background retry after a failed first fetch -----------------------------

    def _schedule_retry(self, username: str) -> bool:
        """Start a background retry unless one runs; True if one is running now."""
        if username in self._retrying:
            return True
        if self.retry_count <= 0:
            return False
        self._retrying.add(username)
        gevent.spawn(self._retry, username)
        return True

    def _retry(self, username: str) -> None:
        delay = self.retry_backoff
        try:
            for attempt in range(1, self.retry_count + 1):
                gevent.sleep(delay)
                delay = min(delay * 2, 60.0)
                if not self.sessions.is_online(username):
                    return
                roster = self.cache.cached(username)  # another get may have fetched it meanwhile
                if roster is None:
                    try:
                        roster = self.cache.get(username)
                    except RosterFetchError as exc:
                        log.warning("roster retry %d for %s failed: %s", attempt, username, exc)
                        continue
                    log.info("roster of %s fetched on retry %d", username, attempt)
                self._deliver_late(username, roster)
                return
            log.error("giving up fetching the roster of %s after %d retries", username, self.retry_count)
        finally:
            self._retrying.discard(username)
            self._awaiting.pop(username, None)

    def _deliver_late(self, username: str, roster: Roster) -> None:
        """The roster is known at last: push it to the sessions that got an error
        instead, and exchange presence with every contact (initial presence sent
        while the roster was unknown reached no one and probed no one)."""
        waiting = self._awaiting.pop(username, set())
        targets = [s for s in waiting if s.interested and not s.ended]
        items = [item_element(item) for item in roster.items.values()]
        if targets and items:
            self._push_all(targets, items, roster.ver)
        for jid in roster.items:
            self.bus.fire("roster-item-added", RosterChange(username, jid))

    def _load_in_background(self, username: str) -> None:
        """Fetch a roster presence asked for before it was known (single flight:
        joins a fetch already running), then exchange presence with the contacts."""
        if username in self._retrying or username in self._loading or not self.sessions.is_online(username):
            return
        self._loading.add(username)
        gevent.spawn(self._load, username)

    def _load(self, username: str) -> None:
        try:
            roster = self.cache.get(username)
        except RosterFetchError as exc:
            log.warning("roster of %s unavailable for presence (%s); retrying in the background", username, exc)
            self._schedule_retry(username)
            return
        finally:
            self._loading.discard(username)
        if self.sessions.is_online(username):
            self._deliver_late(username, roster)

