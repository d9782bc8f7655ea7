"""Rosters in a cluster: one backend GET per user for all nodes, refresh everywhere.

``SharedRosterBackend`` sits between a node's RosterCache and the real
RosterBackend: a roster fetched by one node is kept in Redis
(``br:roster:<u>``, JSON, ``TTL``), and the GET itself is single-flighted across
nodes by ``SET br:roster-lock:<u> NX PX``: the node holding the lock fetches,
the others wait for the shared copy.  Redis down: each node fetches for
itself (degraded, logged once per outage).

``ClusterContacts`` answers presence (im/presence.py ``Contacts``) for users
whose sessions are all on other nodes, from the shared copy (kept a short
while in memory), so a local user's probe of a remote contact is answered
here without a GET.

``RefreshFanout``: ``POST /roster_admin/refresh`` on any node drops the shared
copies, asks every live node (``br:ctl``) to refresh the users it holds
(online or cached), and adds up the answers: a user counts as updated when
every node that held it refreshed it (one GET in all, thanks to the lock),
and as an error when a node holding it failed or did not answer in time.
Each node pushes to its own sessions, so every session on every node gets
its pushes once.

Shared state: ``ClusterContacts._copies`` (username -> (expiry, items)),
mutated without yielding by presence lookups and ``br:ctl`` messages.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Iterable

import gevent
import gevent.event
import gevent.pool
import redis

from boshroster.cluster import keys
from boshroster.roster.model import Roster, RosterItem

if TYPE_CHECKING:
    from boshroster.cluster.view import ClusterSessions
    from boshroster.roster.delegation import RosterDelegation

log = logging.getLogger("boshroster.cluster.rosters")

SHARED_TTL = 24 * 3600  # a shared copy lives this long unless a refresh replaces it
LOCK_MS = 15_000  # the single-flight lock outlives one backend GET (timeouts: connect + read)
COPY_SECONDS = 30.0  # a remote user's contacts kept in memory this long
MAX_COPIES = 10_000


def encode(roster: Roster) -> str:
    return json.dumps([[i.jid, i.name, list(i.groups)] for i in roster.items.values()], separators=(",", ":"))


def decode(raw: str) -> Roster:
    return Roster(RosterItem(jid, name, tuple(groups)) for jid, name, groups in json.loads(raw))


# The single-flight steps as server-side scripts (EVALSHA: one round trip each, atomic).
# get-or-lock: {HIT, copy} | {LOCKED, ""} (we hold the lock: fetch) | {BUSY, ""} (another holds it).
HIT, LOCKED, BUSY = 1, 2, 0
GET_OR_LOCK = """
local copy = redis.call('GET', KEYS[1])
if copy then return {1, copy} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, ''} end
return {0, ''}
"""
# store-and-unlock: only while we still hold the lock, keep the copy (unless ARGV[1] is empty:
# the GET failed) and free the lock.  A refresh deletes copy and lock (RefreshFanout), so a
# fetch that started before it cannot store what it got afterwards.
STORE_UNLOCK = """
if redis.call('GET', KEYS[2]) == ARGV[3] then
  if ARGV[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
  redis.call('DEL', KEYS[2])
end
return 1
"""


class SharedRosterBackend:
    def __init__(self, backend, client: redis.Redis, defer=None):
        self.backend = backend
        self.redis = client
        self.defer = defer  # routing.Writer.defer: the store-and-unlock rides on the writer's next MULTI
        self._get_or_lock = client.register_script(GET_OR_LOCK)
        self._store_unlock = client.register_script(STORE_UNLOCK)
        self.shared_hits = 0
        self._degraded = False

    def __getattr__(self, name):  # counters and settings of the real backend
        return getattr(self.backend, name)

    def fetch(self, username: str) -> Roster:
        try:
            return self._fetch(username)
        except redis.RedisError as exc:
            if not self._degraded:
                log.warning("cluster: Redis unreachable for the roster cache (%s): fetching without it", exc)
                self._degraded = True
            return self.backend.fetch(username)

    def fetch_validated(self, username: str, validators) -> tuple[Roster, None]:
        """The cache's login fetch/revalidation (roster/cache.py) goes through the shared
        copy and its single-flight lock too: without this, ``__getattr__`` handed the cache
        the real backend's method and every node fetched on its own, leaving no shared copy
        for the other nodes' presence lookups.  No validators are kept: the shared copy is
        replaced by every refresh, on any node."""
        return self.fetch(username), None

    def _fetch(self, username: str) -> Roster:
        """One Redis round trip for a miss or a hit (bench "cluster": each round trip is
        ~0.1-0.2 ms of redis-py CPU; this was five, a quarter of a cluster login's cost): the
        store-and-unlock of a miss is handed to the writer (``defer``), which sends it in its
        next MULTI, so the login does not wait for it.  A node waiting for our copy polls
        until it is there; if the writer cannot reach Redis the lock expires (LOCK_MS)."""
        key = keys.roster(username)
        lock = keys.roster_lock(username)
        token = secrets.token_hex(8)
        state, raw = self._get_or_lock(keys=[key, lock], args=[token, LOCK_MS])
        if state == HIT:
            self._degraded = False
            self.shared_hits += 1
            return decode(raw)
        if state == BUSY:  # another node is fetching it: wait for its copy
            deadline = time.monotonic() + LOCK_MS / 1000
            while time.monotonic() < deadline:
                gevent.sleep(0.02)
                raw = self.redis.get(key)
                if raw is not None:
                    self.shared_hits += 1
                    return decode(raw)
                if not self.redis.exists(lock):
                    break  # the other node's GET failed: try ours
            if not self.redis.set(lock, token, nx=True, px=LOCK_MS):
                return self.backend.fetch(username)  # the lock outlived its GET: do not wait forever
        stored = False
        try:
            roster = self.backend.fetch(username)  # RosterFetchError goes to the cache's waiters
            copy = encode(roster)
            if self.defer is not None:
                self.defer(lambda pipe: pipe.eval(STORE_UNLOCK, 2, key, lock, copy, SHARED_TTL, token))
            else:
                self._store_unlock(keys=[key, lock], args=[copy, SHARED_TTL, token])
            stored = True
            return roster
        finally:
            if not stored:
                self._store_unlock(keys=[key, lock], args=["", 0, token])  # only unlocks

    def shared(self, username: str) -> Roster | None:
        raw = self.redis.get(keys.roster(username))
        return decode(raw) if raw is not None else None


class ClusterContacts:
    """im/presence.py's Contacts over the cluster (see the module docstring)."""

    def __init__(self, delegation: "RosterDelegation", view: "ClusterSessions", shared: SharedRosterBackend):
        self.delegation = delegation
        self.view = view
        self.shared = shared
        self._copies: dict[str, tuple[float, object]] = {}

    def contacts(self, username: str):
        if self.view.is_online_locally(username) or username not in self.view.directory.remote:
            return self.delegation.contacts(username)
        if self.delegation.cache.cached(username) is not None:
            return self.delegation.contacts(username)
        now = time.monotonic()
        copy = self._copies.get(username)
        if copy is not None and copy[0] > now:
            return copy[1]
        try:
            roster = self.shared.shared(username)  # one Redis GET (yields)
        except redis.RedisError as exc:
            log.warning("cluster: contacts of %s unknown here (%s)", username, exc)
            roster = None
        if roster is None:
            gevent.spawn(self._load, username)
            return {}
        if len(self._copies) >= MAX_COPIES:
            self._copies.clear()  # crude but bounded: they are re-read on demand
        self._copies[username] = (now + COPY_SECONDS, roster.items)
        return roster.items

    def _load(self, username: str) -> None:
        try:
            self.delegation.cache.get(username)  # through SharedRosterBackend: stores the shared copy
        except Exception as exc:
            log.warning("cluster: roster of remote user %s unavailable: %s", username, exc)

    def shares_with(self, owner: str, viewer_bare: str) -> bool:
        return viewer_bare in self.contacts(owner)

    def forget(self, usernames: Iterable[str]) -> None:
        for name in usernames:
            self._copies.pop(name, None)


class RefreshFanout:
    def __init__(self, node: str, client: redis.Redis, delegation: "RosterDelegation", view: "ClusterSessions",
                 contacts: ClusterContacts, live_nodes, concurrency: int):
        self.node = node
        self.redis = client
        self.delegation = delegation
        self.view = view
        self.contacts = contacts
        self.live_nodes = live_nodes  # () -> set of node ids with a heartbeat
        self.concurrency = max(1, concurrency)

    def refresh_users(self, usernames: Iterable[str], timeout: float) -> tuple[int, int]:
        """What POST /roster_admin/refresh calls on any node: (updated, errors) for the cluster."""
        users = list(dict.fromkeys(usernames))
        if not users:
            return 0, 0
        request_id = secrets.token_hex(8)
        deadline = time.monotonic() + timeout
        try:
            others = self.live_nodes() - {self.node}
            pipe = self.redis.pipeline(transaction=False)
            for name in users:
                pipe.delete(keys.roster(name), keys.roster_lock(name))  # a fetch in flight stores nothing
            pipe.publish(keys.CTL_CHANNEL, json.dumps(
                {"op": "refresh", "n": self.node, "id": request_id, "users": users, "t": timeout}))
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("cluster: refresh on this node only, Redis unreachable: %s", exc)
            others = set()
        self.contacts.forget(users)
        mine = self.refresh_here(users, timeout)
        results = [mine]
        answered = {self.node}
        while others - answered:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                popped = self.redis.blpop([keys.refresh_reply(request_id)], timeout=max(1, int(left + 0.999)))
            except redis.RedisError as exc:
                log.warning("cluster: refresh answers lost: %s", exc)
                break
            if popped is None:
                break
            answer = json.loads(popped[1])
            answered.add(answer["n"])
            results.append(answer["r"])
        silent = others - answered
        if silent:
            log.warning("cluster: refresh: no answer in time from %s", ", ".join(sorted(silent)))
        updated = errors = 0
        for name in users:
            outcomes = [r[name] for r in results if name in r]
            held_by_silent = any(s.node in silent for s in self.view.directory.remote.get(name, {}).values())
            if held_by_silent or (outcomes and not all(outcomes)):
                errors += 1
            else:
                updated += 1
        return updated, errors

    def on_request(self, msg: dict) -> None:
        """Another node's refresh request (br:ctl): refresh what this node holds, answer."""
        if msg.get("n") == self.node:
            return
        users = msg.get("users", [])
        self.contacts.forget(users)
        mine = self.refresh_here(users, float(msg.get("t", 30.0)))
        try:
            key = keys.refresh_reply(msg["id"])
            pipe = self.redis.pipeline(transaction=False)
            pipe.rpush(key, json.dumps({"n": self.node, "r": mine}))
            pipe.expire(key, 120)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("cluster: could not answer a refresh request: %s", exc)

    def refresh_here(self, users: list[str], timeout: float) -> dict[str, bool]:
        """Refresh the users this node holds (online here, cached or being fetched); user -> ok."""
        cache = self.delegation.cache
        held = [u for u in users if self.view.is_online_locally(u) or cache.cached(u) is not None or cache.fetching(u)]
        outcome: dict[str, bool] = {}
        if not held:
            return outcome
        done = gevent.event.Event()

        def run(name: str) -> None:
            try:
                outcome[name] = self.delegation.refresh_user(name)
            except Exception:
                log.exception("refresh of %s failed unexpectedly", name)
                outcome[name] = False
            if len(outcome) == len(held):
                done.set()

        pool = gevent.pool.Pool(self.concurrency)
        feeder = gevent.spawn(lambda: [pool.spawn(run, name) for name in held])
        done.wait(timeout)
        feeder.kill(block=False)
        return {name: outcome.get(name, False) for name in held}
