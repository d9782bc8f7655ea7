"""Rosters as XMPP sees them: roster get (with versioning), pushes, refresh, retry.

The data comes from the backend app through RosterCache (roster_cache.py:
single-flight fetches, grace period) and RosterBackend (roster_backend.py:
timeouts, size limits, bounded concurrency).  This module turns it into
RFC 6121 §2 traffic and tells presence.py about added/removed contacts.

Shared state, all mutated without yielding: ``_retrying`` (usernames with a
background retry greenlet), ``_awaiting`` (sessions whose roster get was
answered with an error: the retry owes them the contacts), ``_applied``
(the last few refresh transitions pushed per user: refreshes coalesced into
one fetch get the same ``(old, new)`` tuple from the cache, and its diff must
be pushed once) and ``_push_id``.  Fetches yield (HTTP), so every caller
re-checks session state after ``cache.get``.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import TYPE_CHECKING, Iterable

import gevent
import gevent.event
import gevent.pool

from boshroster.xmpp.errors import error_element
from boshroster.roster.model import Roster, RosterItem
from boshroster.roster.backend import RosterFetchError
from boshroster.xmpp.xmlio import E, Element, NS_CLIENT, NS_ROSTER

if TYPE_CHECKING:
    from boshroster.wiring import Core
    from boshroster.roster.cache import RosterCache
    from boshroster.xmpp.stream import ClientSession

log = logging.getLogger("boshroster.roster")

_IQ = f"{{{NS_CLIENT}}}iq"
_EMPTY = frozenset()


def item_element(item: RosterItem, subscription: str = "both") -> Element:
    el = E(f"{{{NS_ROSTER}}}item", {"jid": item.jid, "name": item.name or None, "subscription": subscription})
    for group in item.groups:
        el.append(E(f"{{{NS_ROSTER}}}group", text=group))
    return el


class RosterService:
    def __init__(self, core: "Core", cache: "RosterCache"):
        self.core = core
        self.cache = cache
        self._retrying: set[str] = set()
        self._awaiting: dict[str, set["ClientSession"]] = {}
        self._applied: dict[str, deque] = {}
        self._push_id = itertools.count(1)

    # -- what other modules ask --------------------------------------------

    def contacts(self, username: str) -> frozenset:
        """Bare JIDs in ``username``'s roster; empty if the backend cannot be reached."""
        roster = self.cache.cached(username)
        if roster is None:
            try:
                roster = self.cache.get(username)
            except RosterFetchError:
                self._schedule_retry(username)
                return _EMPTY
        return frozenset(roster.items)

    def shares_with(self, owner: str, viewer_bare: str) -> bool:
        return viewer_bare in self.contacts(owner)

    def user_online(self, username: str) -> None:
        self.cache.hold(username)

    def user_offline(self, username: str) -> None:
        self.cache.release(username)
        if not self.core.registry.is_online(username):
            self._applied.pop(username, None)

    # -- roster get (RFC 6121 §2.1.3, versioning §2.6) ------------------------

    def handle_get(self, origin: "ClientSession", iq: Element) -> None:
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
                reply = E(_IQ, {"type": "error", "id": iq.get("id"), "to": origin.jid_str})
                reply.append(error_element(condition, "wait", "the contact list service is unavailable, retrying"))
                return origin.send(reply)
            log.warning("roster fetch for %s failed (%s); serving the cached copy", username, exc)
        if origin.ended:
            return
        waiting = self._awaiting.get(username)
        if waiting:
            waiting.discard(origin)  # it gets the whole roster now
        query = E(f"{{{NS_ROSTER}}}query", {"ver": roster.ver})
        client_ver = iq[0].get("ver")
        if client_ver is not None and client_ver == roster.ver:
            return origin.send(E(_IQ, {"type": "result", "id": iq.get("id"), "to": origin.jid_str}))
        for item in sorted(roster.items.values(), key=lambda i: i.jid):
            query.append(item_element(item))
        origin.send(E(_IQ, {"type": "result", "id": iq.get("id"), "to": origin.jid_str}, query))

    # -- refresh (the backend says rosters changed) -----------------------------

    def refresh_users(self, usernames: Iterable[str], timeout: float) -> tuple[int, int]:
        """Re-fetch online and cached users, count the others as updated; (updated, errors).

        Bounded in time: the answer comes after ``timeout`` at the latest, and
        a user whose refresh has not finished by then counts as an error (a
        fetch already started goes on and its pushes still happen; users not
        started yet are not fetched: the caller was told they failed).  At most
        ``roster_max_concurrency`` refreshes run at once, so a refresh of
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

        pool = gevent.pool.Pool(max(1, self.core.config.roster_max_concurrency))

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
        if (not self.core.registry.is_online(username) and self.cache.cached(username) is None
                and not self.cache.fetching(username)):
            self._applied.pop(username, None)
            return True  # nothing cached: the next login fetches
        try:
            transition = self.cache.refresh(username)
        except RosterFetchError as exc:
            if not self.core.registry.is_online(username):
                log.warning("refresh of %s (offline) failed: %s; cached copy dropped", username, exc)
                self.cache.drop(username)
                self._applied.pop(username, None)
                return True
            log.warning("refresh of %s failed: %s", username, exc)
            return False
        if not self.core.registry.is_online(username):
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
        targets = [s for s in self.core.registry.sessions_of(username) if s.interested]
        items = [item_element(item) for item in added + changed] + [item_element(item, "remove") for item in removed]
        self._push_all(targets, items, new.ver)
        presence = self.core.presence
        for item in added:
            presence.contact_added(username, item.jid)
        for item in removed:
            presence.contact_removed(username, item.jid)

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
                    _IQ,
                    {"type": "set", "id": f"push{next(self._push_id)}", "to": session.jid_str},
                    E(f"{{{NS_ROSTER}}}query", {"ver": ver}, item),  # item elements are shared, never mutated
                )
            )

    # -- background retry after a failed first fetch -----------------------------

    def _schedule_retry(self, username: str) -> bool:
        """Start a background retry unless one runs; True if one is running now."""
        if username in self._retrying:
            return True
        if self.core.config.roster_retry_count <= 0:
            return False
        self._retrying.add(username)
        gevent.spawn(self._retry, username)
        return True

    def _retry(self, username: str) -> None:
        delay = self.core.config.roster_retry_backoff
        try:
            for attempt in range(1, self.core.config.roster_retry_count + 1):
                gevent.sleep(delay)
                delay = min(delay * 2, 60.0)
                if not self.core.registry.is_online(username):
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
            log.error("giving up fetching the roster of %s after %d retries", username, self.core.config.roster_retry_count)
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
            self.core.presence.contact_added(username, jid)

