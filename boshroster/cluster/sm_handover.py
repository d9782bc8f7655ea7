"""XEP-0198 resumption on another node: the owner hands the hibernating session over.

Behind a load balancer without stickiness a client's ``<resume previd/>`` may
reach any node.  SM ids name the node that issued them (``<node_id>.<random>``,
``StreamManagement.id_prefix``, as BOSH sids do); a session handed over since
is found through ``br:sm-owner:<id>`` (it keeps its id, XEP-0198 §5).  An id
that this node does not know (``StreamManagement.elsewhere``):

1. a tombstone in Redis (``br:sm-tomb:<id>``, written by whichever node let the
   session expire, an hour long) answers ``<failed h/>`` (§5), on any node;
2. otherwise the owner is asked, ``POST <cluster_internal_url>/_cluster/sm-handover``
   with the cluster secret (``br:cluster-secret``, shared through Redis, compared
   in constant time) and ``{id, user, h, to}``.  The owner (``give``) checks the
   user, applies ``h`` (what the client acknowledged is delivered), serialises
   the session (resource, presence, priority, carbons, roster interest,
   directed presence, the SM counters, the unacknowledged stanzas as XML),
   ends it silently (its presence is cleared first: no ``unavailable`` goes
   out), switches its directory entry to the new node in one MULTI/EXEC (a
   ``set`` naming the new node: contacts' nodes just re-point the resource),
   and mirrors it there, so whatever arrives for it later is forwarded to the
   new node's inbox.  The stanzas it hands over are the new node's to deliver
   or give back (their offline rows, if any, are deleted on the owner once
   its answer is written: ``_Answer``).
3. the new node rebuilds the session (bound under the same full JID,
   hibernating), then resumes it on the client's stream with the local code:
   ``<resumed h/>`` and exactly the unacknowledged stanzas.  Stanzas that the
   owner forwarded while the answer travelled are held here (``hold``,
   bounded by smacks_max_queue_size) and queued into the session once it exists.

An owner that is dead or unreachable: ``<failed/>`` (item-not-found) within
``cluster_sm_handover_timeout``; the client binds anew.  A session dies with a
node killed -9: its unacknowledged stanzas that came from offline storage are
still claimed rows there (freed when the node is found dead, delivered at the
next login); those routed to it live are lost to delivery (the archive has
the messages).  If the new node's request fails after the owner handed the
session over (the owner died or stalled before answering), the session is
lost the same way (logged on both sides), and the directory entry the owner
moved here names a session that does not exist: ``_orphans`` (when the
request fails: the owner wrote the move already) and ``_moved_here`` (the
owner's move announced later) remove it and send ``unavailable`` on its
behalf, as for a session of a dead node.  What was held for it is routed
(``_release``: offline storage when the user has no other resource).

Greenlet safety: ``give`` runs in the owner's HTTP request greenlet and does
not yield between claiming the session and mirroring it elsewhere (the MULTI
comes after).  ``resume_elsewhere`` runs in the resuming stream's reader
greenlet and yields (Redis, HTTP); it re-checks the stream after.  ``_held``
(username -> [(resource, stanza)]) is written by it and by the inbox greenlet
(``hold``), never across a yield; it always leaves ``_held`` (finally).
``_moved_here`` runs in the pub/sub greenlet (no yield) and spawns the check.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
from collections import deque

import gevent
import redis
import requests
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from boshroster.cluster import keys
from boshroster.cluster.directory import entry_of
from boshroster.transports.http_limits import ClientGone
from boshroster.transports.request_body import read_body
from boshroster.xmpp import xmlio
from boshroster.xmpp.errors import StanzaError, stream_error_element
from boshroster.xmpp.stream import ClientSession
from boshroster.xmpp.stream_management import FAILED, RESUME, SmState
from boshroster.xmpp.xmlio import E, NS_STANZAS

log = logging.getLogger("boshroster.cluster.sm")

PATH = "/_cluster/sm-handover"
SECRET_HEADER = "X-Boshroster-Cluster"
_WRAP = 1 << 32
_MAX_REQUEST = 4096  # bytes of a hand-over request
_MAX_ANSWER = 1 << 26  # bytes of a hand-over answer (smacks_max_queue_size stanzas of stanza_size_limit)
_NODE = re.compile(r"[A-Za-z0-9_-]{1,64}")
OWNER_SECONDS = 86400  # br:sm-owner:<id> lives a day: a session moved and resumed again later than that fails
TOMB_SECONDS = 3600  # as the local tombstones (stream_management._TOMBSTONE_LIFETIME)


def _failed(condition: str = "item-not-found", h: int | None = None):
    return E(FAILED, {"h": str(h) if h is not None else None}, E(f"{{{NS_STANZAS}}}{condition}"))


class _Nowhere:
    """The transport of a session being rebuilt (replaced by hibernation at once)."""

    kind = "websocket"
    tracks_delivery = True
    congested = False

    def send(self, el, delivered=None) -> None:
        pass

    def stream_error(self, el) -> None:
        pass


class _Gauges:
    """/metrics: hand-overs under way to this node and the stanzas held for them (0 when idle)."""

    def __init__(self, handover: "SmHandover"):
        self.handover = handover

    def collect(self):
        held = self.handover._held
        yield GaugeMetricFamily("boshroster_cluster_sm_handovers_pending",
                                "XEP-0198 hand-overs to this node waiting for the owner", value=len(held))
        yield GaugeMetricFamily("boshroster_cluster_sm_held_stanzas",
                                "Stanzas held for sessions being handed to this node",
                                value=sum(len(v) for v in held.values()))
        yield CounterMetricFamily("boshroster_cluster_sm_orphans",
                                  "Entries moved here by an owner that did not answer, removed",
                                  value=self.handover.orphans)


class SmHandover:
    def __init__(self, node, sm, sessions, timeout: float, metrics=None, test_stall: float = 0.0,
                 test_stall_at: str = "answer"):
        self.node = node  # ClusterNode: redis, node id, directory, live_nodes, url_of, messages
        self.sm = sm  # StreamManagement
        self.sessions = sessions  # the local SessionManager
        self.timeout = (min(2.0, timeout), timeout)
        self.max_held = max(1, sm.settings.max_queue)
        self.http = requests.Session()
        self._held: dict[str, list] = {}
        self._secret_value: str | None = None
        self.handed = self.taken = self.failed = self.orphans = 0
        # TESTS ONLY (cluster_sm_handover_test_stall): the owner waits this long at test_stall_at.
        self.test_stall, self.test_stall_at = test_stall, test_stall_at
        if test_stall:
            log.warning("cluster_sm_handover_test_stall = %.1f s (%s): a test-only setting, hand-overs stall",
                        test_stall, test_stall_at)
        if metrics is not None:
            metrics.registry.register(_Gauges(self))
        sm.id_prefix = f"{node.node}."
        sm.elsewhere = self.resume_elsewhere
        sm.buried = self._bury
        node.handover = self
        node.directory.moved_here = self._moved_here

    def routes(self) -> dict:
        return {PATH: self.wsgi}

    def _secret(self) -> str:
        """The cluster secret: read (or created) in Redis once, then kept (it never changes)."""
        if self._secret_value is None:
            r = self.node.redis
            secret = r.get(keys.CLUSTER_SECRET)
            if secret is None:
                r.set(keys.CLUSTER_SECRET, secrets.token_urlsafe(32), nx=True)
                secret = r.get(keys.CLUSTER_SECRET)
            self._secret_value = secret
        return self._secret_value

    # -- tombstones ----------------------------------------------------------------

    def _bury(self, sm_id: str, username: str, handled: int) -> None:
        gevent.spawn(self._store_tomb, sm_id, username, handled)  # _bury runs where yielding is not allowed

    def _store_tomb(self, sm_id: str, username: str, handled: int) -> None:
        try:
            pipe = self.node.redis.pipeline(transaction=True)
            pipe.set(keys.sm_tombstone(sm_id), json.dumps({"u": username, "h": handled}), ex=TOMB_SECONDS)
            pipe.delete(keys.sm_owner(sm_id))
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("cluster: expired XEP-0198 id of %s not written to Redis (%s): a late resume on"
                        " another node gets <failed/> without h", username, exc)

    # -- the new node ----------------------------------------------------------------

    def resume_elsewhere(self, fresh, previd: str, h: int) -> None:
        """``<resume/>`` for an id this node does not hold (stream_management.resume)."""
        username = fresh.username
        owner = previd.partition(".")[0] if "." in previd else ""
        if len(previd) > 128:  # ours are ~30 characters: not one of them, and no such key in Redis
            log.info("resume refused for %s from %s: an id of %d characters", username, fresh.peer.ip, len(previd))
            return fresh.send_nonza(_failed())
        try:
            pipe = self.node.redis.pipeline(transaction=False)
            pipe.get(keys.sm_tombstone(previd))
            pipe.get(keys.sm_owner(previd))
            tomb, moved = pipe.execute()
        except redis.RedisError as exc:
            log.warning("cluster: resume of %s: Redis unreachable (%s): <failed/>", username, exc)
            return fresh.send_nonza(_failed())
        if tomb is not None:
            data = json.loads(tomb)
            if data.get("u") == username:
                try:
                    self.node.redis.delete(keys.sm_tombstone(previd))  # answered once, as the local ones
                except redis.RedisError:
                    pass
                log.info("resume refused for %s from %s: the session expired (h=%d)", username, fresh.peer.ip,
                         data.get("h", 0))
                return fresh.send_nonza(_failed("item-not-found", int(data.get("h", 0))))
        owner = moved or owner
        if not owner or owner == self.node.node or not _NODE.fullmatch(owner) or tomb is not None:
            log.info("resume refused for %s from %s: unknown or expired id", username, fresh.peer.ip)
            return fresh.send_nonza(_failed())
        try:
            pipe = self.node.redis.pipeline(transaction=False)
            pipe.exists(keys.heartbeat(owner))
            pipe.get(keys.node_url(owner))
            alive, url = pipe.execute()
        except redis.RedisError:
            alive = url = None
        if not alive or not url:
            log.info("resume refused for %s: its node %s is not in the cluster", username, owner)
            return fresh.send_nonza(_failed())
        self._held.setdefault(username, [])
        state = None
        try:
            state = self._ask(owner, url, previd, username, h)
        finally:
            if state is None or "failed" in state:
                self._release(username)
        if state is None:
            self.failed += 1
            self._orphans(username, previd)  # before <failed/>: the fresh bind comes after
            return fresh.send_nonza(_failed())
        if "failed" in state:
            try:
                answer = xmlio.parse(state["failed"], 4096)
            except xmlio.XMLError:
                answer = _failed()
            return fresh.send_nonza(answer if answer.tag == FAILED else _failed())
        session = self._rebuild(fresh, previd, state)
        if session is None:
            self._orphans(username, previd)  # moved here, not rebuilt: nobody else removes its entry
            return fresh.send_nonza(_failed())
        self.taken += 1
        log.info("%s handed over from node %s (%d unacknowledged)", session.jid_str, owner, len(session.sm.queue))
        if fresh.ended:  # its stream went away meanwhile: the session hibernates here
            return
        self.sm.resume(fresh, E(RESUME, {"previd": previd, "h": str(session.sm.acked)}))

    def _ask(self, owner: str, url: str, previd: str, username: str, h: int) -> dict | None:
        try:
            with self.http.post(
                    url.rstrip("/") + PATH, timeout=self.timeout, stream=True,
                    json={"id": previd, "user": username, "h": h, "to": self.node.node},
                    headers={SECRET_HEADER: self._secret()}) as response:
                body = response.raw.read(_MAX_ANSWER + 1, decode_content=True)  # bounded before parsing
                if response.status_code == 403:  # read the secret again next time (Redis emptied?)
                    self._secret_value = None
                if response.status_code != 200 or len(body) > _MAX_ANSWER:
                    log.warning("resume of %s: node %s answered HTTP %d (%d bytes): <failed/>", username, owner,
                                response.status_code, len(body))
                    return None
            state = json.loads(body)
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            return state
        except (requests.RequestException, redis.RedisError, ValueError) as exc:
            log.warning("resume of %s: node %s did not hand the session over (%s): <failed/>; if it had"
                        " given it already, its unacknowledged stanzas are lost", username, owner, exc)
            return None

    def _release(self, username: str) -> None:
        """No session came: what was held for it goes where it would have gone."""
        held = self._held.pop(username, [])
        if held:
            log.info("cluster: %d stanza(s) held for %s during a failed hand-over routed again", len(held), username)
        for resource, el in held:
            self.node._gone(username, resource, el)

    def _orphans(self, username: str, previd: str) -> None:
        """The hand-over request failed: if the owner moved the session here anyway (it died
        or stalled after its MULTI), the entries naming this node have no session."""
        try:
            pipe = self.node.redis.pipeline(transaction=False)
            pipe.get(keys.sm_owner(previd))
            pipe.hgetall(keys.user(username))
            moved, entries = pipe.execute()
        except redis.RedisError as exc:
            log.warning("cluster: failed hand-over of %s: directory not checked (%s)", username, exc)
            return
        if moved != self.node.node:
            return  # not moved: the owner still has it (its cleanup, if it died, says unavailable)
        for resource in entries:
            self._orphan(username, resource, entries[resource])

    def _moved_here(self, username: str, resource: str) -> None:
        """(pub/sub greenlet, no yield) Another node announced ``username/resource`` as moved here."""
        if username not in self._held and self.sessions.get(username, resource) is None:
            gevent.spawn(self._recheck, username, resource)  # a move after this node gave up

    def _recheck(self, username: str, resource: str) -> None:
        try:
            raw = self.node.redis.hget(keys.user(username), resource)
        except redis.RedisError as exc:
            log.warning("cluster: entry of %s/%s moved here not checked (%s)", username, resource, exc)
            return
        if raw is not None and username not in self._held:
            self._orphan(username, resource, raw)

    def _orphan(self, username: str, resource: str, raw: str) -> None:
        """An entry naming this node for a resource bound nowhere (no yield before the check
        is done): removed (the writer's del) and ``unavailable`` sent on its behalf."""
        try:
            entry = json.loads(raw)
        except ValueError:
            return
        if not isinstance(entry, dict) or entry.get("n") != self.node.node \
                or self.sessions.get(username, resource) is not None or self.node.directory.pending(username, resource):
            return
        self.orphans += 1
        log.warning("cluster: %s/%s was handed to this node by a node that did not answer: no such session"
                    " here, its entry removed and unavailable sent", username, resource)
        self.node.directory._mark((username, resource))
        self.node._announce_gone(self.node.node, username, resource, entry)

    def hold(self, username: str, resource: str, el) -> bool:
        """A stanza from the inbox for a resource not bound here: kept if a hand-over of
        ``username``'s session to this node is under way."""
        held = self._held.get(username)
        if held is None:
            return False
        if len(held) >= self.max_held:
            log.warning("cluster: %d stanzas held for %s during a hand-over: no more held", len(held), username)
            return False
        held.append((resource, el))
        log.info("cluster: stanza for %s/%s held during its hand-over", username, resource)
        return True

    def _rebuild(self, fresh, previd: str, state: dict):
        """The handed-over session, bound here under its full JID and hibernating (no yield)."""
        username = fresh.username
        try:
            resource = state["resource"]
            queue = [xmlio.parse(text, 1 << 22) for text in state["queue"]]
            presence = xmlio.parse(state["presence"], 1 << 20) if state.get("presence") else None
            counters = [int(state[k]) % _WRAP for k in ("handled_in", "sent", "acked")]
        except (KeyError, TypeError, ValueError, xmlio.XMLError) as exc:
            log.error("resume of %s: unreadable hand-over (%s)", username, exc)
            self._release(username)
            return None
        held = self._held.pop(username, [])
        session = ClientSession(fresh.ctx, _Nowhere(), fresh.peer)
        session.username = username
        if self.sessions.get(username, resource) is not None:
            log.warning("resume of %s: %s is bound here already; its stanzas go back through routing",
                        username, resource)
            self.node.messages.reroute(username, queue + [el for _, el in held])
            return None
        try:
            self.sessions.bind(session, resource)
        except StanzaError as err:
            log.warning("resume of %s: cannot bind %s here (%s); its stanzas go back through routing",
                        username, resource, err.condition)
            self.node.messages.reroute(username, queue + [el for _, el in held])
            return None
        fresh.ctx.metrics.session_opened(session.transport.kind)
        self.node.directory.taken_over(username, resource)
        session.state = "active"
        session.presence, session.priority = presence, int(state.get("priority", 0))
        session.carbons, session.interested = bool(state.get("carbons")), bool(state.get("interested"))
        session.directed = set(state.get("directed") or ())
        sm = SmState(previd)
        sm.handled_in, sm.sent, sm.acked = counters
        sm.queue = deque((el, None) for el in queue)
        session.sm = sm
        self.sm.adopt(session)
        self.node.directory.touch(session)  # presence and carbons as handed over
        for held_resource, el in held:  # what the owner forwarded meanwhile, in order
            if held_resource == resource:
                session.send(el)
            else:
                self.node._gone(username, held_resource, el)
        return session

    # -- the owner ----------------------------------------------------------------------

    def wsgi(self, environ, start_response):
        status, answer, handed = self._handle(environ)
        body = json.dumps(answer).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return _Answer(body, handed)

    def _handle(self, environ) -> tuple[str, dict, list]:
        if environ.get("REQUEST_METHOD") != "POST":
            return "405 Method Not Allowed", {"error": "POST only"}, []
        peer = environ.get("REMOTE_ADDR", "")
        given = environ.get("HTTP_" + SECRET_HEADER.upper().replace("-", "_"), "").encode()
        try:
            matches = hmac.compare_digest(given, self._secret().encode())
            if not matches:  # Redis may have been emptied and the secret made anew: read it again
                self._secret_value = None
                matches = hmac.compare_digest(given, self._secret().encode())
        except redis.RedisError:
            return "503 Service Unavailable", {"error": "Redis unreachable"}, []
        if not matches:
            log.warning("cluster: XEP-0198 hand-over request from %s without the cluster secret: refused", peer)
            return "403 Forbidden", {"error": "not a node of this cluster"}, []
        try:
            data = read_body(environ, _MAX_REQUEST)
            if not data:
                raise ValueError("no body" if data is not None else f"body over {_MAX_REQUEST} bytes")
            request = json.loads(data)
            previd, username, h, to = request["id"], request["user"], request["h"], request["to"]
            if not (isinstance(previd, str) and isinstance(username, str) and isinstance(h, int)
                    and isinstance(to, str) and _NODE.fullmatch(to) and 0 <= h < _WRAP):
                raise ValueError("bad field")
        except (ValueError, KeyError, TypeError, ClientGone) as exc:
            log.warning("cluster: bad XEP-0198 hand-over request from %s: %s", peer, exc)
            return "400 Bad Request", {"error": "bad request"}, []
        self._test_stall("request", username, to)
        answer, handed = self.give(previd, username, h, to)
        self._test_stall("answer", username, to)
        return "200 OK", answer, handed

    def _test_stall(self, at: str, username: str, to: str) -> None:
        """TESTS ONLY (cluster_sm_handover_test_stall, default off): a known point to kill the owner at."""
        if self.test_stall and self.test_stall_at == at:
            log.warning("cluster: test stall: hand-over of %s to node %s waits %.1f s at %s", username, to,
                        self.test_stall, at)
            gevent.sleep(self.test_stall)

    def give(self, previd: str, username: str, h: int, to: str) -> tuple[dict, list]:
        """Hand ``previd`` to node ``to``: the session's state, or ``{"failed": xml}``; and the
        delivery reports of the stanzas handed over (called once the answer is written)."""
        claimed = self.sm.claim(previd, username, h)
        if claimed is None:
            log.info("cluster: node %s asked for XEP-0198 session of %s: unknown here", to, username)
            return {"failed": xmlio.tostring(_failed())}, []
        if not isinstance(claimed, tuple):
            return {"failed": xmlio.tostring(claimed)}, []
        session, acknowledged, hibernating = claimed
        sm = session.sm
        jid = session.jid
        entry = entry_of(session, to)  # its directory entry, naming the new node
        state = {
            "resource": jid.resource,
            "presence": entry["x"],
            "priority": session.priority, "carbons": session.carbons, "interested": session.interested,
            "directed": sorted(session.directed),
            "handled_in": sm.handled_in, "sent": sm.sent, "acked": sm.acked,
            "queue": [xmlio.tostring(el) for el in sm.unacked()],
        }
        handed = sm.drop_all()
        self.sm.forget(session)
        previous = session.transport
        session.presence, session.directed = None, set()  # ends silently: contacts see nothing
        session.end(f"handed over to node {to}")
        # Offline rows: what the client acknowledged is deleted here now; what the new node
        # delivers or gives back (routing, offline storage) once the answer carrying it is
        # written (_Answer): an owner that dies before leaves them stored, for the next login.
        # Ended first, so that a delivery paging through more rows leaves the next ones stored
        # (for the next login) instead of queueing them behind the hand-over.
        for _, delivered in acknowledged:
            if delivered is not None:
                delivered(True)
        if not hibernating:  # its connection here is still open: it is no longer this session's
            previous.stream_error(stream_error_element("conflict", "the session was resumed on another node"))
        directory = self.node.directory
        directory.handed_over(username, jid.resource, entry)
        self.handed += 1
        log.info("%s handed over to node %s (%d unacknowledged)", session.jid_str, to, len(state["queue"]))
        try:
            pipe = self.node.redis.pipeline(transaction=True)
            directory.write_move(pipe, username, jid.resource, entry)
            pipe.set(keys.sm_owner(previd), to, ex=OWNER_SECONDS)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("cluster: directory move of %s to %s not written (%s): node %s writes it",
                        session.jid_str, to, exc, to)
        return state, [delivered for _, delivered in handed if delivered is not None]


class _Answer:
    """The hand-over answer's WSGI body: the handed-over stanzas' delivery reports (offline rows
    deleted, or kept stored) once the server wrote it (it asks for more only then), or kept
    if it could not (``close`` without that; PEP 3333).  In the request's greenlet."""

    def __init__(self, body: bytes, handed: list):
        self.body, self.handed = body, handed

    def __iter__(self):
        yield self.body
        self._report(True)

    def close(self) -> None:
        self._report(False)

    def _report(self, written: bool) -> None:
        handed, self.handed = self.handed, []
        for delivered in handed:
            delivered(written)

