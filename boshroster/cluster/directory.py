"""The session directory: which resource is bound on which node, with its presence.

In Redis (ejabberd's Redis session backend layout): a hash per user
(``br:user:<u>``: resource -> JSON entry) and a set per node
(``br:node:<n>:sessions``) for cleanup, written together in MULTI/EXEC with a
PUBLISH on ``br:dir`` so that every node can mirror the others' entries.

Reads never touch Redis: each node keeps ``remote`` (username -> {resource:
RemoteSession}) for the *other* nodes' resources, so presence and message
delivery look them up as cheaply as local sessions (view.py).  The mirror is
loaded at start (and after a lost subscription) and kept current by the
``br:dir`` messages.

Writes are asynchronous: the hooks only mark (username, resource) dirty
(``touch``); the writer greenlet (routing.Writer) reads the session's state at
flush time from the local registry and writes what is true then.  So a burst
of changes costs one round trip, and a bind, presence, carbons toggle and
unbind in quick succession never leave Redis in a state that was never true.
One flush is one PUBLISH on ``br:dir`` carrying every change of the flush (a
list), so a node applying the others' changes parses one message per flush.

A fresh bind is written ``BIND_DEFER`` seconds later (``touch_bound``) unless
something else (its initial presence, carbons, unbind) touches it first: a
login is then one directory write instead of two (bind, then presence).  Until
then the other nodes do not see the resource, which is what they would do with
it anyway: a resource without presence gets no bare-JID messages (RFC 6121
§8.5.2.1) and a full-JID message for it is handled as for an unknown resource
(§8.5.3.2.1: the bare JID's rules, offline storage included, delivered at its
initial presence).  A resource unbound before its deferred write never
reaches Redis.

Ordering with the inboxes: every ``br:dir`` message carries the writer's
sequence number, and every inbox entry the sequence of the directory writes
flushed before it (same MULTI), so a receiver can wait until its mirror has
seen the sender's directory changes before acting on its stanzas
(``wait_seen``): bob never answers alice's presence while still believing she
is offline.

Shared state: ``remote``, ``seen`` (node -> (boot, seq)), ``_dirty`` and
``_deferred``, all mutated without yielding by the pub/sub greenlet (apply),
the hooks (touch, touch_bound) and the writer (write_dirty, due).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Callable

import gevent.event

from boshroster.cluster import keys
from boshroster.xmpp import xmlio

if TYPE_CHECKING:
    from boshroster.xmpp.sessions import SessionRegistry
    from boshroster.xmpp.stream import ClientSession

log = logging.getLogger("boshroster.cluster.directory")

MAX_DIRTY = 100_000  # marks waiting for the writer; past it, a full resync is scheduled instead
BIND_DEFER = 1.0  # seconds a fresh bind waits for its initial presence before it is written alone


class RemoteSession:
    """A resource bound on another node, as presence and message delivery see it.

    ``send`` queues the stanza for that node's inbox (routing.Outbox): it never
    yields, like a local session's send.  The IM fields come from the
    directory; ``presence`` is parsed when first asked for (most remote entries
    are never looked at on a given node: bench "cluster", parsing every one
    as it arrived was ~3% of a node's CPU per login)."""

    __slots__ = ("node", "username", "resource", "jid_str", "priority", "_presence", "_presence_text", "carbons",
                 "interested", "directed", "_send")

    congested = False  # the owner node bounces for its own congested sessions
    ended = False
    remote = True

    def __init__(self, node: str, username: str, resource: str, domain: str, entry: dict,
                 send: Callable[[str, str, str, xmlio.Element], None]):
        self.node = node
        self.username = username
        self.resource = resource
        self.jid_str = f"{username}@{domain}/{resource}"
        self.priority = int(entry.get("p", 0))
        self._presence = None
        self._presence_text = entry.get("x") or None
        self.carbons = bool(entry.get("c"))
        self.interested = bool(entry.get("i"))
        self.directed: set[str] = set()
        self._send = send

    @property
    def presence(self) -> xmlio.Element | None:
        text = self._presence_text
        if text is not None:
            self._presence_text = None
            try:
                self._presence = xmlio.parse(text, 1 << 20)
            except xmlio.XMLError:
                log.error("unreadable presence of %s in the directory", self.jid_str)
        return self._presence

    @presence.setter
    def presence(self, value: xmlio.Element | None) -> None:
        self._presence_text, self._presence = None, value

    @property
    def available(self) -> bool:
        return self.presence is not None

    @property
    def has_presence(self) -> bool:
        """``available`` without parsing the presence."""
        return self._presence_text is not None or self._presence is not None

    def send(self, el: xmlio.Element, delivered=None) -> None:
        self._send(self.node, self.username, self.resource, el)
        if delivered is not None:
            delivered(True)  # handed to the owner node's inbox (at-least-once from here)

    def __repr__(self) -> str:
        return f"<RemoteSession {self.jid_str} on {self.node}>"


def entry_of(session: "ClientSession", node: str) -> dict:
    """What the directory keeps of a local session."""
    return {
        "n": node,
        "p": session.priority,
        "x": xmlio.tostring(session.presence) if session.presence is not None else None,
        "c": 1 if session.carbons else 0,
        "i": 1 if session.interested else 0,
    }


class Directory:
    def __init__(self, node: str, boot: str, domain: str, registry: "SessionRegistry",
                 send: Callable[[str, str, str, xmlio.Element], None]):
        self.node = node
        self.boot = boot
        self.domain = domain
        self.registry = registry
        self._send = send
        self.remote: dict[str, dict[str, RemoteSession]] = {}
        self.seen: dict[str, tuple[str, int]] = {}  # node -> (boot, last directory seq applied)
        self._seen_changed = gevent.event.Event()
        self._dirty: dict[tuple[str, str], None] = {}
        self._deferred: dict[tuple[str, str], float] = {}  # fresh binds -> when to write them anyway
        self.wakeup: Callable[[], None] = lambda: None  # set by the writer
        self.resync_needed = False
        self.seq = 0
        self.loaded_at = 0.0
        self.loaded_nodes: set[str] = set()  # nodes that had entries in the last load
        self.dead: set[str] = set()  # nodes cleaned up: their entries are ignored until they rejoin
        # Called (pub/sub greenlet, must not yield) when a remote resource becomes available in
        # the mirror: arrivals.py sends it the presences it may have missed.
        self.arrived: Callable[[RemoteSession], None] | None = None
        # Called (pub/sub greenlet, must not yield) when another node announces one of its
        # resources as moved to this node (a XEP-0198 hand-over, sm_handover.py): a move whose
        # hand-over failed here leaves an entry naming this node with no session behind it.
        self.moved_here: Callable[[str, str], None] | None = None

    # -- local changes (hooks) ----------------------------------------------

    def touch(self, session: "ClientSession") -> None:
        """``session`` changed (presence, carbons, roster interest, unbound)."""
        if session.jid is None:
            return
        key = (session.jid.local, session.jid.resource)
        if self._deferred.pop(key, None) is not None and self.registry.get(*key) is None:
            return  # bound and unbound before its write: Redis never knew it
        self._mark(key)

    def touch_bound(self, session: "ClientSession") -> None:
        """``session`` was just bound: written at its initial presence or after BIND_DEFER."""
        if session.jid is None:
            return
        key = (session.jid.local, session.jid.resource)
        if key in self._dirty:
            return  # a rebind of a resource whose previous session's change is not written yet
        if len(self._deferred) >= MAX_DIRTY:
            self._mark(key)
            return
        self._deferred[key] = gevent.get_hub().loop.now() + BIND_DEFER
        self.wakeup()  # the writer sets its timer to the first deadline

    def _mark(self, key: tuple[str, str]) -> None:
        if len(self._dirty) >= MAX_DIRTY:
            if not self.resync_needed:
                log.warning("directory: %d changes waiting for Redis; a full resync will follow", MAX_DIRTY)
            self.resync_needed = True
            self._dirty.clear()
        else:
            self._dirty[key] = None
        self.wakeup()

    def due(self) -> float | None:
        """Move the deferred binds whose time came to the dirty set; seconds until the next one."""
        if not self._deferred:
            return None
        now = gevent.get_hub().loop.now()
        deferred = self._deferred
        while deferred:  # in bind order, so deadlines increase: stop at the first not due (no copy)
            key, deadline = next(iter(deferred.items()))
            if deadline > now:
                return deadline - now
            del deferred[key]
            self._mark(key)
        return None

    def pending(self, username: str, resource: str) -> bool:
        """A change of this resource waits for the writer."""
        return (username, resource) in self._dirty or (username, resource) in self._deferred

    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def write_dirty(self, pipe) -> int:
        """Queue the Redis writes of every dirty key on ``pipe`` (a MULTI) and one PUBLISH
        carrying all of them; returns how many."""
        dirty, self._dirty = self._dirty, {}
        msgs = [self._write_one(pipe, username, resource) for username, resource in dirty]
        if msgs:
            pipe.publish(keys.DIR_CHANNEL, json.dumps(msgs if len(msgs) > 1 else msgs[0], separators=(",", ":")))
        return len(dirty)

    def _write_one(self, pipe, username: str, resource: str) -> dict:
        """Queue one resource's HSET+SADD (or HDEL+SREM); returns its br:dir message."""
        session = self.registry.get(username, resource)
        member = f"{username}/{resource}"
        self.seq += 1
        if session is not None and not session.ended:
            entry = entry_of(session, self.node)
            pipe.hset(keys.user(username), resource, json.dumps(entry))
            pipe.sadd(keys.node_sessions(self.node), member)
            msg = {"op": "set", "n": self.node, "b": self.boot, "q": self.seq, "u": username, "r": resource, "e": entry}
        else:
            pipe.hdel(keys.user(username), resource)
            pipe.srem(keys.node_sessions(self.node), member)
            msg = {"op": "del", "n": self.node, "b": self.boot, "q": self.seq, "u": username, "r": resource}
        return msg

    def resync(self, redis) -> None:
        """Make Redis hold exactly this node's bound sessions (after a Redis outage,
        a restart of Redis, or being declared dead by mistake)."""
        listed = redis.smembers(keys.node_sessions(self.node))
        pipe = redis.pipeline(transaction=True)
        current = set()
        msgs = []
        self._deferred.clear()  # every bound session is written now
        for session in self.registry.all_sessions():
            if session.jid is not None:
                current.add(f"{session.jid.local}/{session.jid.resource}")
                msgs.append(self._write_one(pipe, session.jid.local, session.jid.resource))
        for member in set(listed) - current:
            username, _, resource = member.partition("/")
            msgs.append(self._write_one(pipe, username, resource))
        for start in range(0, len(msgs), 500):  # bounded PUBLISH payloads
            pipe.publish(keys.DIR_CHANNEL, json.dumps(msgs[start:start + 500], separators=(",", ":")))
        pipe.execute()
        self.resync_needed = False
        log.info("directory: resynchronised %d local session(s) in Redis", len(current))

    # -- XEP-0198 hand-over between nodes (sm_handover.py) -----------------------

    def handed_over(self, username: str, resource: str, entry: dict) -> None:
        """A local session went to node ``entry["n"]``: no pending write of it (that would
        delete the new node's entry), and the mirror sends what comes for it there."""
        self._dirty.pop((username, resource), None)
        self._deferred.pop((username, resource), None)
        self.remote.setdefault(username, {})[resource] = self._remote(entry["n"], username, resource, entry)

    def write_move(self, pipe, username: str, resource: str, entry: dict) -> None:
        """On ``pipe`` (a MULTI): the entry now names the new node, in both nodes' indexes,
        announced as a change (no del, so nobody sees the resource go)."""
        member = f"{username}/{resource}"
        self.seq += 1
        pipe.hset(keys.user(username), resource, json.dumps(entry))
        pipe.srem(keys.node_sessions(self.node), member)
        pipe.sadd(keys.node_sessions(entry["n"]), member)
        pipe.publish(keys.DIR_CHANNEL, json.dumps(
            {"op": "set", "n": self.node, "b": self.boot, "q": self.seq, "u": username, "r": resource, "e": entry}))

    def taken_over(self, username: str, resource: str) -> None:
        """The resource is (now) bound here: not in the mirror of the others' any more."""
        resources = self.remote.get(username)
        if resources is not None and resources.pop(resource, None) is not None and not resources:
            del self.remote[username]

    # -- the mirror of the other nodes ----------------------------------------

    def load(self, redis) -> None:
        """Rebuild the mirror from Redis (subscribe to br:dir first, then call this)."""
        remote: dict[str, dict[str, RemoteSession]] = {}
        nodes: set[str] = set()
        count = 0
        for key in redis.scan_iter(match=keys.user("*"), count=1000):
            username = key[len(keys.user("")):]
            for resource, raw in redis.hgetall(key).items():
                entry = json.loads(raw)
                node = entry.get("n")
                if node == self.node or node in self.dead:
                    continue
                remote.setdefault(username, {})[resource] = self._remote(node, username, resource, entry)
                nodes.add(node)
                count += 1
        self.remote = remote
        self.loaded_nodes = nodes
        self.loaded_at = gevent.get_hub().loop.now()
        log.info("directory: mirror loaded, %d remote resource(s)", count)

    def _remote(self, node, username, resource, entry) -> RemoteSession:
        return RemoteSession(node, username, resource, self.domain, entry, self._send)

    def apply(self, data) -> None:
        """One br:dir message from another node: a change, or a list of them (one flush)."""
        for msg in data if isinstance(data, list) else (data,):
            if isinstance(msg, dict):
                self._apply_one(msg)
        self._seen_changed.set()  # wait_seen's waiters look again
        self._seen_changed = gevent.event.Event()

    def _apply_one(self, msg: dict) -> None:
        node = msg.get("n")
        if node == self.node:
            return
        op = msg.get("op")
        if op == "node-down":
            self.forget_node(node)
            return
        boot, seq = msg.get("b"), msg.get("q", 0)
        if op in ("set", "del"):
            if node in self.dead:
                self.dead.discard(node)  # it came back (rejoined after being declared dead)
            username, resource = msg["u"], msg["r"]
            if op == "set":
                # A session handed over for XEP-0198 resumption (sm_handover.py) is announced by
                # its old node with the new one in the entry; the new node keeps it locally.
                owner = msg["e"].get("n") or node
                if owner != self.node:
                    resources = self.remote.setdefault(username, {})
                    before = resources.get(resource)
                    remote = resources[resource] = self._remote(owner, username, resource, msg["e"])
                    if msg["e"].get("x") and (before is None or not before.has_presence) and self.arrived:
                        self.arrived(remote)  # arrivals.py: it may have missed our newest presences
                else:
                    self.taken_over(username, resource)  # and drop what an older message of the old node said
                    if self.moved_here is not None:
                        self.moved_here(username, resource)
            else:
                resources = self.remote.get(username)
                if resources is not None and resources.get(resource) is not None \
                        and resources[resource].node == node:
                    del resources[resource]
                    if not resources:
                        del self.remote[username]
        self.seen[node] = (boot, seq)

    def forget_node(self, node: str) -> list[RemoteSession]:
        """Drop a dead node's entries from the mirror; returns them."""
        self.dead.add(node)
        self.seen.pop(node, None)
        gone = []
        for username in list(self.remote):
            resources = self.remote[username]
            for resource in [r for r, s in resources.items() if s.node == node]:
                gone.append(resources.pop(resource))
            if not resources:
                del self.remote[username]
        return gone

    def wait_seen(self, node: str, boot: str, seq: int, timeout: float = 1.0) -> bool:
        """Wait (bounded) until the mirror applied ``node``'s directory change ``seq``."""
        deadline = None
        while True:
            if node not in self.seen and node in self.loaded_nodes \
                    and gevent.get_hub().loop.now() - self.loaded_at < 2.0:
                # The mirror was just loaded from Redis: it holds this node's entries
                # without their sequence numbers.  Take it as seen from here on.  (Not for a
                # node that had no entry in the load, e.g. one started since: what it writes
                # comes through the pub/sub, and taking it as seen would let a stanza from it
                # overtake the directory change it depends on.)
                self.seen[node] = (boot, seq)
            seen_boot, seen_seq = self.seen.get(node, (None, 0))
            if seq <= 0 or (seen_boot == boot and seen_seq >= seq):
                return True
            if deadline is None:
                deadline = gevent.get_hub().loop.now() + timeout
            left = deadline - gevent.get_hub().loop.now()
            if left <= 0:
                return False
            self._seen_changed.wait(left)

    def remote_entries_of(self, node: str) -> int:
        return sum(1 for resources in self.remote.values() for s in resources.values() if s.node == node)
