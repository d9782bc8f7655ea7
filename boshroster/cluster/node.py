"""One node of a cluster: joins Redis, hooks the bus, watches the other nodes.

Built by the wiring when ``cluster_redis_url`` is set (Redis unreachable at
start: StartupError, the server does not start).  ``start`` runs four
greenlets:

  writer    directory changes + stanzas for other nodes (routing.Writer)
  inbox     this node's inbox stream (routing.Inbox)
  pubsub    br:dir (the directory mirror) and br:ctl (refresh requests)
  janitor   heartbeat every ``cluster_heartbeat_interval``; a node whose
            heartbeat expired (``cluster_node_timeout``) is cleaned up by
            whichever live node takes its cleanup lock first: its sessions
            leave the directory, their contacts get ``unavailable`` as if each
            had dropped (RFC 6121 §4.5 on their behalf), and its inbox is
            drained (messages routed again or stored offline).

A node that comes back after being declared dead (a long Redis blip)
rejoins: its inbox group is recreated, its sessions are written again and
their presence broadcast again.  A node restarting with the same node_id
first cleans up what its previous life left.

Hooks (observers, they never stop an event): ``resource-bind``,
``resource-unbind``, ``presence/self`` (priority 300, before the presence
module), carbons enable/disable: each only marks the session dirty for the
writer.  ``iq/full``: an IQ for a resource on another node goes there.

Shared state: ``_live`` (node ids seen alive by the janitor), written by the
janitor only.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import gevent
import gevent.event
import redis

from boshroster.cluster import keys
from boshroster.cluster.arrivals import Arrivals
from boshroster.cluster.directory import Directory, RemoteSession
from boshroster.cluster.routing import Inbox, Writer
from boshroster.cluster.view import ClusterSessions
from boshroster.config import StartupError
from boshroster.xmpp.errors import StanzaError, error_reply
from boshroster.xmpp.jid import JID
from boshroster.xmpp.tags import BODY, IQ, MESSAGE
from boshroster.xmpp.xmlio import NS_CARBONS

if TYPE_CHECKING:
    from boshroster.xmpp.events import EventBus
    from boshroster.xmpp.sessions import SessionManager

log = logging.getLogger("boshroster.cluster")


def redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def redis_client(url: str, **options) -> redis.Redis:
    """A client that skips CLIENT SETINFO on connect (redis-py >= 7: ``driver_info=None``;
    before: ``lib_name=None``): each new pooled connection then costs no extra round trips
    and no package-metadata lookup (~3 ms of CPU each, bench "cluster", when the pool grows
    under a burst of logins)."""
    try:
        import redis.driver_info  # noqa: F401 - only to know which option this redis-py has
        options["driver_info"] = None
    except ImportError:
        options.update(lib_name=None, lib_version=None)
    return redis.Redis.from_url(url, decode_responses=True, **options)


class ClusterNode:
    def __init__(self, config, sessions: "SessionManager", bus: "EventBus"):
        self.config = config
        self.node = config.node_id or keys.default_node_id()
        self.boot = secrets.token_hex(4)
        self.domain = config.domain
        self.sessions = sessions
        self.bus = bus
        url = config.cluster_redis_url
        timeout = config.cluster_redis_timeout
        self.redis = redis_client(url, socket_timeout=timeout, socket_connect_timeout=min(3.0, timeout))
        # Blocking reads (XREADGROUP BLOCK, pub/sub) on connections of their own.  Bounded too:
        # a Redis that stops answering (stopped, or its host gone without a RST) is noticed by
        # the inbox reader (its read blocks ``block`` at most, the socket waits ``timeout`` more)
        # and by the subscriber (it pings after timeout/2 of silence and gives up after
        # ``timeout``), which then log and retry like on a lost connection.
        self.block_seconds = min(2.0, timeout)
        self.pubsub_silence = timeout
        self.blocking = redis_client(url, socket_timeout=timeout + self.block_seconds,
                                     socket_connect_timeout=min(3.0, timeout), socket_keepalive=True)
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise StartupError(f"cluster_redis_url {redacted(url)}: cannot reach Redis: {exc}") from None
        self.internal_url = config.cluster_internal_url or \
            f"http://{config.http_interfaces[0]}:{config.http_ports[0]}"
        self.directory = Directory(self.node, self.boot, self.domain, sessions.registry, self._push)
        self.writer = Writer(self.redis, self.directory, self.node, self.boot, self._undeliverable)
        self.inbox = Inbox(self.redis, self.blocking, self.directory, self.node, self._deliver_local,
                           self._orphan, self._rejoin, block_ms=int(self.block_seconds * 1000))
        self.view = ClusterSessions(sessions, self.directory)
        self.messages = self.presence = self.roster = self.mailbox = self.fanout = None
        self.arrivals: Arrivals | None = None  # set by attach (needs the presence handler)
        self.handover = None  # sm_handover.SmHandover: holds stanzas for a session being handed here
        self._live: set[str] = {self.node}
        self._greenlets: list[gevent.Greenlet] = []
        self._running = False
        self._redis_down_since: float | None = None
        self.cleaned_nodes: list[str] = []

    def _push(self, node, username, resource, el) -> None:
        self.writer.push(node, username, resource, el)

    # -- wiring ------------------------------------------------------------------

    def attach(self, *, messages, presence, roster, mailbox, fanout=None) -> None:
        self.messages, self.presence, self.roster, self.mailbox, self.fanout = messages, presence, roster, mailbox, fanout
        self.arrivals = Arrivals(presence, self.domain)
        self.directory.arrived = self.arrivals.arrived

    def register(self, bus: "EventBus") -> None:
        touch = self.directory.touch
        bus.hook("resource-bind", self.directory.touch_bound, priority=-100)
        bus.hook("resource-unbind", touch, priority=-100)
        bus.hook("presence/self", lambda event: touch(event.origin), priority=300)
        for target in ("host", "self"):
            for verb in ("enable", "disable"):
                bus.hook(f"iq-set/{target}/{NS_CARBONS}:{verb}", lambda event: touch(event.origin), priority=300)
        bus.hook("iq/full", self._iq_full)
        bus.hook("presence-initial", self._presence_initial)

    def _presence_initial(self, session) -> None:
        if self.arrivals is not None:
            self.arrivals.initial(session)

    def _iq_full(self, event):
        target = self.view.get(event.to.local, event.to.resource)
        if isinstance(target, RemoteSession):
            target.send(event.stanza)
            return True
        return None

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        r = self.redis
        self._running = True
        self._subscribed = gevent.event.Event()
        for target in (self.writer.run, self._listen):
            self._greenlets.append(gevent.spawn(target))
        if not self._subscribed.wait(5):
            raise StartupError("cluster: cannot subscribe to the directory channel in Redis")
        if r.sismember(keys.NODES, self.node) or r.exists(keys.node_sessions(self.node)):
            if r.exists(keys.heartbeat(self.node)):
                log.warning("cluster: node_id %r has a live heartbeat: another process with the same node_id,"
                            " or a restart within cluster_node_timeout; taking over", self.node)
            log.info("cluster: cleaning up what this node's previous run left")
            self.cleanup(self.node, force=True)
        self.inbox.ensure_group()
        pipe = r.pipeline(transaction=True)
        pipe.set(keys.node_url(self.node), self.internal_url)
        pipe.sadd(keys.NODES, self.node)
        pipe.set(keys.heartbeat(self.node), self.boot, px=int(self.config.cluster_node_timeout * 1000))
        pipe.execute()
        for target in (self.inbox.run, self._janitor):
            self._greenlets.append(gevent.spawn(target))
        log.info("cluster: node %s joined (%s), %d remote resource(s)", self.node, redacted(
            self.config.cluster_redis_url), sum(len(v) for v in self.directory.remote.values()))

    def shutdown(self) -> None:
        """After the sessions ended: flush, hand this node's inbox to offline storage, leave."""
        if not self._running:
            return
        self._running = False
        self.inbox.running = False
        self.writer.wait_idle(3.0)
        try:
            self.cleanup(self.node, force=True)
        except redis.RedisError as exc:
            log.warning("cluster: could not leave cleanly (%s): the others will clean up after the timeout", exc)
        self.writer.running = False
        self.writer.wait_idle(1.0)
        for greenlet in self._greenlets:
            greenlet.kill(block=False)
        log.info("cluster: node %s left", self.node)

    def live_nodes(self) -> set[str]:
        return set(self._live)

    def url_of(self, node: str) -> str | None:
        try:
            return self.redis.get(keys.node_url(node))
        except redis.RedisError:
            return None

    # -- receiving ---------------------------------------------------------------------

    def _deliver_local(self, username: str, resource: str, el) -> None:
        """A stanza from another node for one of this node's resources."""
        session = self.sessions.get(username, resource)
        if session is not None and not session.ended:
            session.send(el)
            return
        if self.handover is not None and self.handover.hold(username, resource, el):
            return
        self._gone(username, resource, el)

    def _gone(self, username: str, resource: str, el) -> None:
        """The resource is not here (any more): RFC 6121 §8.5.3.2 for what was sent to it."""
        kind = el.tag
        if kind == MESSAGE:
            try:
                self.messages.deliver(el, JID.make(username, self.domain, resource))
            except StanzaError as err:
                log.info("cluster: message for %s/%s not delivered: %s", username, resource, err.condition)
        elif kind == IQ and el.get("type") in ("get", "set"):
            self._reply(el, StanzaError("service-unavailable"))

    def _reply(self, stanza, err: StanzaError) -> None:
        reply = error_reply(stanza, err)
        try:
            to = JID.parse(reply.get("to") or "")
        except Exception:
            return
        if to.local and to.resource:
            target = self.view.get(to.local, to.resource)
            if target is not None:
                target.send(reply)

    def _orphan(self, username: str, resource: str, el) -> None:
        """A stanza from a dead node's inbox: messages are routed again like a dead session's
        (their user may be online elsewhere), else stored offline, else bounced to their
        sender (im/messages.py ``reroute``); nothing else is worth keeping."""
        self.messages.reroute(username, [el])

    def _undeliverable(self, items: list, node: str) -> None:
        """Stanzas that could not reach ``node`` (gone, or Redis down): messages are
        stored offline here (the mailbox is shared when database_url is set)."""
        from boshroster.xmpp import xmlio

        for username, resource, text in items:
            try:
                el = xmlio.parse(text, 1 << 22)
            except xmlio.XMLError:
                continue
            if el.tag == MESSAGE and el.get("type", "normal") in ("chat", "normal") and el.find(BODY) is not None:
                if self.mailbox is not None and self.mailbox.store(username, el):
                    log.info("cluster: message for %s/%s (on %s) stored offline", username, resource, node)
                    continue
                log.warning("cluster: message for %s/%s (on %s) lost", username, resource, node)

    # -- pub/sub -----------------------------------------------------------------------

    def _listen(self) -> None:
        delay = 0.2
        while self._running:
            pubsub = self.blocking.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.DIR_CHANNEL, keys.CTL_CHANNEL, keys.ping_channel(self.node))
                self.directory.load(self.redis)
                self._subscribed.set()
                delay = 0.2
                self._receive(pubsub)
            except redis.RedisError as exc:
                if self._running:
                    log.warning("cluster: directory subscription lost (%s); again in %.1f s", exc, delay)
                    gevent.sleep(delay)
                    delay = min(delay * 2, 5.0)
            finally:
                try:
                    pubsub.close()
                except Exception:
                    pass

    def _receive(self, pubsub) -> None:
        """Apply br:dir / br:ctl messages.  When quiet for half of cluster_redis_timeout,
        publish to this node's own ping channel (a round trip through the subscription: a
        PING on the subscribed connection would do, but redis-py 8 misparses its answer
        with decode_responses); give the connection up (ConnectionError: logged, subscribed
        again) when nothing came for cluster_redis_timeout."""
        silence = self.pubsub_silence
        ping = keys.ping_channel(self.node)
        heard = pinged = time.monotonic()
        while self._running:
            message = pubsub.get_message(timeout=silence / 4)
            now = time.monotonic()
            if message is not None:
                heard = now
                if message.get("type") == "message" and message.get("channel") != ping:
                    self._on_message(message)
                continue
            if now - heard >= silence:
                raise redis.ConnectionError(f"no answer from Redis for {now - heard:.1f} s")
            if now - heard >= silence / 2 and now - pinged >= silence / 2:
                self.redis.publish(ping, "1")
                pinged = now

    def _on_message(self, message) -> None:
        try:
            data = json.loads(message["data"])
        except (ValueError, TypeError):
            return
        if message["channel"] == keys.DIR_CHANNEL:
            self.directory.apply(data)
        elif data.get("op") == "refresh" and self.fanout is not None:
            gevent.spawn(self.fanout.on_request, data)

    # -- heartbeats and dead nodes --------------------------------------------------------

    def _janitor(self) -> None:
        interval = self.config.cluster_heartbeat_interval
        while self._running:
            try:
                self._beat()
                if self._redis_down_since is not None:
                    log.warning("cluster: Redis is back after %.1f s", time.monotonic() - self._redis_down_since)
                    self._redis_down_since = None
            except redis.RedisError as exc:
                if self._redis_down_since is None:
                    self._redis_down_since = time.monotonic()
                    log.warning("cluster: Redis unreachable (%s): degraded (local delivery only,"
                                " stanzas for other nodes stored offline); retrying", exc)
                self.directory.resync_needed = True
            except Exception:
                log.exception("cluster: janitor error")
            gevent.sleep(interval)

    def _beat(self) -> None:
        r = self.redis
        timeout_ms = int(self.config.cluster_node_timeout * 1000)
        r.set(keys.heartbeat(self.node), self.boot, px=timeout_ms)
        if not r.sismember(keys.NODES, self.node):
            self._rejoin()
        if self.directory.resync_needed:
            self.directory.resync(r)
        nodes = sorted(r.smembers(keys.NODES))
        pipe = r.pipeline(transaction=False)
        for node in nodes:
            pipe.exists(keys.heartbeat(node))
        alive = pipe.execute()
        self._live = {node for node, ok in zip(nodes, alive) if ok} | {self.node}
        for node, ok in zip(nodes, alive):
            if not ok and node != self.node:
                self.cleanup(node)

    def _rejoin(self) -> None:
        """This node was declared dead while alive: come back with every session."""
        log.warning("cluster: node %s was declared dead by the others: rejoining", self.node)
        self.inbox.ensure_group()
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(keys.node_url(self.node), self.internal_url)
        pipe.sadd(keys.NODES, self.node)
        pipe.execute()
        self.directory.resync(self.redis)
        for session in list(self.sessions.all_sessions()):
            if session.presence is not None and self.presence is not None:
                self.presence.available(session, session.presence)  # not initial: a broadcast again

    def cleanup(self, node: str, force: bool = False) -> None:
        """Remove a dead node's sessions (announcing them unavailable) and drain its inbox."""
        r = self.redis
        if not r.set(keys.cleanup_lock(node), self.node, nx=True, px=120_000):
            return  # another node is on it
        try:
            if not force and r.exists(keys.heartbeat(node)):
                return  # it came back
            started = time.monotonic()
            members = sorted(r.smembers(keys.node_sessions(node)))
            pipe = r.pipeline(transaction=False)
            for member in members:
                username, _, resource = member.partition("/")
                pipe.hget(keys.user(username), resource)
            raw_entries = pipe.execute() if members else []
            gone = []
            pipe = r.pipeline(transaction=True)
            for member, raw in zip(members, raw_entries):
                username, _, resource = member.partition("/")
                entry = json.loads(raw) if raw else None
                if entry is not None and entry.get("n") == node:
                    pipe.hdel(keys.user(username), resource)
                    gone.append((username, resource, entry))
            pipe.delete(keys.node_sessions(node), keys.heartbeat(node))
            pipe.publish(keys.DIR_CHANNEL, json.dumps({"op": "node-down", "n": node}))
            pipe.execute()
            if node != self.node:
                self.directory.forget_node(node)
            for username, resource, entry in gone:
                self._announce_gone(node, username, resource, entry)
            drained = self.inbox.drain(node)
            release = getattr(self.mailbox, "release_node", None)  # PostgreSQL: its offline claims
            if release is not None and node != self.node:
                release(node)
            pipe = r.pipeline(transaction=True)
            pipe.srem(keys.NODES, node)
            pipe.delete(keys.node_url(node))
            pipe.execute()
            self.cleaned_nodes.append(node)
            log.warning("cluster: node %s %s: %d session(s) removed, %d inbox entries handled in %.0f ms",
                        node, "left" if node == self.node else "is dead", len(gone), drained,
                        1000 * (time.monotonic() - started))
        finally:
            r.delete(keys.cleanup_lock(node))

    def _announce_gone(self, node: str, username: str, resource: str, entry: dict) -> None:
        """Unavailable on behalf of a dead node's session, as if it had dropped (RFC 6121 §4.5)."""
        if self.presence is None or not entry.get("x"):
            return
        ghost = RemoteSession(node, username, resource, self.domain, entry, lambda *a: None)
        if self.roster is not None:
            try:
                self.roster.cache.get(username)  # its contacts: from the shared copy, else one GET
            except Exception as exc:
                log.warning("cluster: contacts of %s unknown (%s): its unavailable reaches only"
                            " its own resources", username, exc)
        self.presence.unavailable(ghost)
