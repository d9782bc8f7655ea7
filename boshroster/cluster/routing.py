"""Stanzas between nodes: a Redis Stream per node as its inbox, at least once.

Sending (``Writer``): ``RemoteSession.send`` queues ``[username, resource,
xml]`` per destination node without yielding; one writer greenlet flushes
what accumulated (a presence broadcast to 500 contacts on node B is one XADD
to B, not 500) together with the directory changes, in one MULTI/EXEC, so a
receiver never sees a stanza before the directory change that preceded it
(directory.py, ``wait_seen``).  ``XADD … NOMKSTREAM``: a node that was cleaned
up has no inbox any more, and what was meant for it comes back as undeliverable
(stored offline) instead of filling a stream nobody reads.

Receiving (``Inbox``): one reader greenlet, ``XREADGROUP … BLOCK`` on its own
connection; each entry is delivered to the local sessions (or routed again, or
stored offline, when the resource is gone) and then ``XACK``ed, in the same
pipeline as the next XREADGROUP (one round trip per batch).  The blocking
connection has a socket timeout (node.py, ``cluster_redis_timeout``): a Redis that
stops answering is noticed, logged, and retried.  Entries are
deduplicated by their id (``m``): after a redelivery a stanza is delivered once.

A dead node's inbox (``drain``): pending entries are taken over with XAUTOCLAIM,
unread ones read through the dead node's group, and every message is routed
again (its user may be online elsewhere by now) or stored offline; then the
stream is deleted.

Bounded: ``MAX_PENDING`` stanzas wait for the writer (more: undeliverable,
logged); an inbox stream is capped at ``INBOX_MAXLEN`` entries (approximate
trim; a node that far behind is logged as such by the reader's lag check).

Shared state: ``Writer.pending`` (node -> list) and ``Writer.extra`` (deferred
commands), appended by any greenlet, swapped out by the writer, never across a
yield.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import OrderedDict
from typing import Callable

import gevent
import gevent.event
import redis

from boshroster.cluster import keys
from boshroster.cluster.directory import Directory
from boshroster.xmpp import xmlio

log = logging.getLogger("boshroster.cluster.routing")

MAX_PENDING = 50_000
INBOX_MAXLEN = 200_000
READ_COUNT = 200
BLOCK_MS = 2000  # XREADGROUP BLOCK; below the blocking connection's socket timeout (node.py)
DEDUP_WINDOW = 50_000
RETRY_FOR = 3.0  # seconds a failed flush is retried before its stanzas count as undeliverable

Item = list  # [username, resource, xml]
Undeliverable = Callable[[list[Item], str], None]


class Writer:
    def __init__(self, client: redis.Redis, directory: Directory, node: str, boot: str, undeliverable: Undeliverable):
        self.redis = client
        self.directory = directory
        self.node = node
        self.boot = boot
        self.undeliverable = undeliverable
        self.pending: dict[str, list[Item]] = {}
        self.extra: list[Callable[[object], None]] = []  # defer(): commands for the next MULTI
        self.count = 0
        self._ids = itertools.count(1)
        self._wake = gevent.event.Event()
        self._idle = gevent.event.Event()
        self._idle.set()
        self.running = True
        self.sent_entries = 0
        self.sent_stanzas = 0
        directory.wakeup = self._wake.set

    def push(self, node: str, username: str, resource: str, el: xmlio.Element) -> None:
        """Queue ``el`` for ``username/resource`` on ``node`` (never yields)."""
        item = [username, resource, xmlio.tostring(el)]
        if self.count >= MAX_PENDING:
            log.warning("cluster: %d stanzas already wait for Redis; one for %s/%s is undeliverable",
                        MAX_PENDING, username, resource)
            self.undeliverable([item], node)
            return
        self.pending.setdefault(node, []).append(item)
        self.count += 1
        self._wake.set()

    def defer(self, queue: Callable[[object], None]) -> None:
        """Have ``queue(pipe)`` add its commands to the next flush's MULTI: a write nobody
        waits for (the roster's store-and-unlock) costs no round trip of its own."""
        if len(self.extra) >= MAX_PENDING:
            log.warning("cluster: %d deferred Redis writes already wait; one is dropped", MAX_PENDING)
            return
        self.extra.append(queue)
        self._wake.set()

    def _busy(self) -> bool:
        return bool(self.pending or self.extra or self.directory.has_dirty())

    def run(self) -> None:
        while self.running or self._busy():
            next_due = self.directory.due()  # fresh binds whose presence did not come in time
            self._wake.wait(1.0 if next_due is None else min(1.0, next_due + 0.001))
            self._wake.clear()
            self.directory.due()
            while self._busy():
                self._idle.clear()
                self.flush()
            self._idle.set()

    def wait_idle(self, timeout: float) -> None:
        """Wait until what was queued so far is written (shutdown, tests)."""
        self._wake.set()
        gevent.sleep(0)
        self._idle.wait(timeout)

    def flush(self) -> None:
        batches, self.pending, self.count = self.pending, {}, 0
        extra, self.extra = self.extra, []
        pipe = self.redis.pipeline(transaction=True)
        try:
            self.directory.write_dirty(pipe)
        except Exception:
            log.exception("cluster: directory write failed")
            self.directory.resync_needed = True
        for queue in extra:
            queue(pipe)
        sent: list[tuple[str, list[Item]]] = []
        for node, items in batches.items():
            if node in self.directory.dead:
                self.undeliverable(items, node)
                continue
            fields = {"m": f"{self.node}:{self.boot}:{next(self._ids)}", "f": self.node, "b": self.boot,
                      "q": self.directory.seq, "s": json.dumps(items, separators=(",", ":"))}
            pipe.xadd(keys.inbox(node), fields, maxlen=INBOX_MAXLEN, approximate=True, nomkstream=True)
            sent.append((node, items))
        if not pipe.command_stack:
            return
        results = self._execute(pipe)
        if results is None:
            self.directory.resync_needed = True
            for node, items in sent:
                self.undeliverable(items, node)
            return
        for (node, items), result in zip(sent, results[len(results) - len(sent):]):
            if result is None or isinstance(result, Exception):
                log.warning("cluster: inbox of %s is gone (%s): %d stanza(s) routed here instead",
                            node, result or "node cleaned up", len(items))
                self.undeliverable(items, node)
            else:
                self.sent_entries += 1
                self.sent_stanzas += len(items)

    def _execute(self, pipe):
        """Run the MULTI, retrying a lost connection for RETRY_FOR seconds; None if Redis stays away."""
        delay, waited = 0.1, 0.0
        while True:
            try:
                return pipe.execute(raise_on_error=False)
            except redis.RedisError as exc:
                if waited >= RETRY_FOR:
                    log.warning("cluster: Redis unreachable for %.0f s (%s): degraded, stanzas for other nodes"
                                " are stored offline", waited, exc)
                    pipe.reset()
                    return None
                gevent.sleep(delay)
                waited += delay
                delay = min(delay * 2, 1.0)


class Inbox:
    """This node's inbox reader (one greenlet, its own blocking connection)."""

    def __init__(self, client: redis.Redis, blocking: redis.Redis, directory: Directory, node: str,
                 deliver: Callable[[str, str, xmlio.Element], None],
                 orphan: Callable[[str, str, xmlio.Element], None], on_lost_group: Callable[[], None],
                 block_ms: int = BLOCK_MS):
        self.redis = client
        self.block_ms = block_ms  # below the blocking connection's socket timeout (node.py)
        self.blocking = blocking
        self.directory = directory
        self.node = node
        self.key = keys.inbox(node)
        self.deliver = deliver
        self.orphan = orphan
        self.on_lost_group = on_lost_group
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.running = True
        self.received_entries = 0
        self.duplicates = 0

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.key, keys.GROUP, id="$", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, to_ack: list[str]):
        """XREADGROUP (blocking); the XACK of what the previous read delivered rides in the
        same pipeline, so a batch costs one round trip, not two."""
        if not to_ack:
            return self.blocking.xreadgroup(keys.GROUP, "c", {self.key: ">"}, count=READ_COUNT, block=self.block_ms)
        pipe = self.blocking.pipeline(transaction=False)
        pipe.xack(self.key, keys.GROUP, *to_ack)
        pipe.xreadgroup(keys.GROUP, "c", {self.key: ">"}, count=READ_COUNT, block=self.block_ms)
        return pipe.execute()[1]

    def run(self) -> None:
        delay = 0.2
        to_ack: list[str] = []  # delivered, acknowledged with the next read
        while self.running:
            try:
                response = self._read(to_ack)
                to_ack = []
                delay = 0.2
            except redis.ResponseError as exc:
                to_ack = []  # NOGROUP: the group (and its pending list) is gone
                if "NOGROUP" in str(exc) and self.running:
                    log.warning("cluster: this node's inbox was removed (declared dead?): rejoining")
                    try:
                        self.ensure_group()
                        self.on_lost_group()
                    except redis.RedisError as again:
                        log.warning("cluster: cannot recreate the inbox: %s", again)
                        gevent.sleep(delay)
                    continue
                log.error("cluster: inbox read failed: %s", exc)
                gevent.sleep(delay)
                continue
            except redis.RedisError as exc:  # to_ack kept: acknowledged once Redis answers again
                if not self.running:
                    if to_ack:
                        self._ack(self.key, to_ack)
                    return
                log.warning("cluster: inbox read failed (%s); retrying in %.1f s", exc, delay)
                gevent.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            for _stream, entries in response or ():
                for entry_id, fields in entries:
                    self.handle(fields, self.deliver)
                    to_ack.append(entry_id)
            if to_ack and not self.running:
                self._ack(self.key, to_ack)

    def _ack(self, key: str, ids: list[str]) -> None:
        try:
            self.redis.xack(key, keys.GROUP, *ids)
        except redis.RedisError as exc:  # redelivered later; deduplicated then
            log.warning("cluster: XACK of %d entries failed: %s", len(ids), exc)

    def handle(self, fields: dict, deliver: Callable[[str, str, xmlio.Element], None], wait: bool = True) -> None:
        mid = fields.get("m", "")
        if mid in self._seen:
            self.duplicates += 1
            return
        self._seen[mid] = None
        if len(self._seen) > DEDUP_WINDOW:
            self._seen.popitem(last=False)
        self.received_entries += 1
        if wait and not self.directory.wait_seen(fields.get("f", ""), fields.get("b", ""), int(fields.get("q", 0))):
            log.debug("cluster: directory of %s not caught up; delivering anyway", fields.get("f"))
        try:
            items = json.loads(fields.get("s", "[]"))
        except ValueError:
            log.error("cluster: unreadable inbox entry %s dropped", mid)
            return
        for username, resource, text in items:
            try:
                el = xmlio.parse(text, 1 << 22)
            except xmlio.XMLError:
                log.error("cluster: unreadable stanza for %s/%s dropped", username, resource)
                continue
            try:
                deliver(username, resource, el)
            except Exception:  # one stanza, never the reader
                log.exception("cluster: delivering a stanza to %s/%s failed", username, resource)

    def drain(self, node: str) -> int:
        """Take over a dead node's inbox: every entry is handled as an orphan; the stream is deleted."""
        key = keys.inbox(node)
        consumer = f"claim-{self.node}"
        handled = 0
        try:
            start = "0-0"
            while True:
                answer = self.redis.xautoclaim(key, keys.GROUP, consumer, min_idle_time=0, start_id=start,
                                               count=READ_COUNT)
                start, entries = answer[0], answer[1]
                handled += self._orphans(key, entries)
                if start in ("0-0", b"0-0") or not entries:
                    break
            while True:
                response = self.redis.xreadgroup(keys.GROUP, consumer, {key: ">"}, count=READ_COUNT)
                entries = response[0][1] if response else []
                if not entries:
                    break
                handled += self._orphans(key, entries)
        except redis.ResponseError as exc:  # no group: read the stream as it is
            if "NOGROUP" not in str(exc):
                raise
            for _entry_id, fields in self.redis.xrange(key):
                self.handle(fields, self.orphan, wait=False)
                handled += 1
        self.redis.delete(key)
        return handled

    def _orphans(self, key: str, entries) -> int:
        ids = []
        for entry_id, fields in entries:
            if fields:  # a trimmed entry comes back empty
                self.handle(fields, self.orphan, wait=False)
            ids.append(entry_id)
        if ids:
            self._ack(key, ids)
        return len(ids)
