"""Rosters as XMPP sees them: roster get (with versioning), pushes, refresh, retry.

The data comes from the backend app through RosterCache (roster_cache.py:
single-flight fetches, grace period) and RosterBackend (roster_backend.py:
timeouts, size limits, bounded concurrency).  This module turns it into
RFC 6121 §2 traffic and tells presence.py about added/removed contacts.

Shared state: ``_retrying`` (usernames with a background retry greenlet) and
``_push_id``; both are mutated without yielding.  Fetches yield (HTTP), so
every caller re-checks session state after ``cache.get``.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Iterable

import gevent
import gevent.pool

from .errors import error_element
from .roster import Roster, RosterItem
from .roster_backend import RosterFetchError
from .xmlio import E, Element, NS_CLIENT, NS_ROSTER

if TYPE_CHECKING:
    from .core import Core
    from .roster_cache import RosterCache
    from .session import ClientSession

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
                self._schedule_retry(username)
                condition = "remote-server-timeout" if getattr(exc, "reason", "") == "timeout" else "internal-server-error"
                reply = E(_IQ, {"type": "error", "id": iq.get("id"), "to": origin.jid_str})
                reply.append(error_element(condition, "wait", "the contact list service is unavailable, retrying"))
                return origin.send(reply)
            log.warning("roster fetch for %s failed (%s); serving the cached copy", username, exc)
        if origin.ended:
            return
        query = E(f"{{{NS_ROSTER}}}query", {"ver": roster.ver})
        client_ver = iq[0].get("ver")
        if client_ver is not None and client_ver == roster.ver:
            return origin.send(E(_IQ, {"type": "result", "id": iq.get("id"), "to": origin.jid_str}))
        for item in sorted(roster.items.values(), key=lambda i: i.jid):
            query.append(item_element(item))
        origin.send(E(_IQ, {"type": "result", "id": iq.get("id"), "to": origin.jid_str}, query))

    # -- refresh (the backend says rosters changed) -----------------------------

    def refresh_users(self, usernames: Iterable[str], timeout: float) -> tuple[int, int]:
        """Re-fetch online users, drop cached copies of offline ones; (updated, errors).

        Bounded in time: a user whose fetch has not finished by ``timeout`` counts
        as an error (the fetch itself goes on and its pushes still happen).
        """
        usernames = list(usernames)
        pool = gevent.pool.Pool(max(1, self.core.config.roster_max_concurrency))
        jobs = [pool.spawn(self.refresh_user, name) for name in usernames]
        gevent.joinall(jobs, timeout=timeout)
        updated = sum(1 for job in jobs if job.ready() and job.successful() and job.value)
        return updated, len(usernames) - updated

    def refresh_user(self, username: str) -> bool:
        """True when the user's roster is up to date (or nothing was cached)."""
        if not self.core.registry.is_online(username):
            self.cache.drop(username)
            return True
        try:
            old, new = self.cache.refresh(username)
        except RosterFetchError as exc:
            log.warning("refresh of %s failed: %s", username, exc)
            return False
        self.apply_diff(username, old, new)
        return True

    def apply_diff(self, username: str, old: Roster | None, new: Roster) -> None:
        """Pushes, one <item/> each (RFC 6121 §2.1.6), then presence for added/removed contacts."""
        if old is None:
            added, removed, changed = tuple(new.items.values()), (), ()
        else:
            diff = old.diff(new)
            added, removed, changed = diff.added, diff.removed, diff.changed
        if not (added or removed or changed):
            return
        log.info(
            "roster of %s changed: %d added, %d removed, %d changed", username, len(added), len(removed), len(changed)
        )
        for item in added + changed:
            self._push(username, item_element(item), new.ver)
        for item in removed:
            self._push(username, item_element(item, "remove"), new.ver)
        presence = self.core.presence
        for item in added:
            presence.contact_added(username, item.jid)
        for item in removed:
            presence.contact_removed(username, item.jid)

    def _push(self, username: str, item: Element, ver: str) -> None:
        for session in self.core.registry.sessions_of(username):
            if session.interested:
                session.send(
                    E(
                        _IQ,
                        {"type": "set", "id": f"push{next(self._push_id)}", "to": session.jid_str},
                        E(f"{{{NS_ROSTER}}}query", {"ver": ver}, item),
                    )
                )

    # -- background retry after a failed first fetch -----------------------------

    def _schedule_retry(self, username: str) -> None:
        if username in self._retrying or self.core.config.roster_retry_count <= 0:
            return
        self._retrying.add(username)
        gevent.spawn(self._retry, username)

    def _retry(self, username: str) -> None:
        delay = self.core.config.roster_retry_backoff
        try:
            for attempt in range(1, self.core.config.roster_retry_count + 1):
                gevent.sleep(delay)
                delay = min(delay * 2, 60.0)
                if not self.core.registry.is_online(username):
                    return
                if self.cache.cached(username) is not None:
                    return  # someone else's fetch succeeded meanwhile
                try:
                    roster = self.cache.get(username)
                except RosterFetchError as exc:
                    log.warning("roster retry %d for %s failed: %s", attempt, username, exc)
                    continue
                log.info("roster of %s fetched on retry %d", username, attempt)
                self.apply_diff(username, None, roster)
                return
            log.error("giving up fetching the roster of %s after %d retries", username, self.core.config.roster_retry_count)
        finally:
            self._retrying.discard(username)

