"""XEP-0198 Stream Management: acks both ways, and resumption of a dropped stream.

``SmState`` is the per-stream bookkeeping, pure and sans-I/O (counters wrap at
2^32, §4): what the client handled (its ``<a h/>``), what we handled from it,
and the stanzas sent but not yet acknowledged (with their ``delivered``
callbacks: with SM, delivery means the client's ack, not a socket write).

``StreamManagement`` is the server side: ``<enable/>`` → ``<enabled/>``,
``<r/>``/``<a/>``, hibernation of a resumable session whose connection
dropped (its contacts see nothing; stanzas for it are queued, bounded), and
``<resume previd h/>`` → ``<resumed/>`` plus retransmission of exactly the
unacknowledged stanzas, or ``<failed/>`` (``item-not-found``) after which a
fresh bind works.  When hibernation ends unresumed, the session ends as if
it had dropped: unavailable is broadcast and the unacknowledged stanzas go
back through routing (``stanzas-undelivered``: other resources or offline
storage), so nothing vanishes.  Settings keep Prosody's mod_smacks names.

Acks are asked for early (as Prosody does by default): an ``<r/>`` as soon as
more than ``max_unacked`` stanzas (default 0) are unacknowledged and none is
outstanding, again after an ``<a/>`` that leaves some, and after a resumption's
retransmission.  One ``<r/>`` per round trip, and what a client has handled is
known within a round trip: a stanza the client got is not sent to it again
from offline storage when its stream is later lost for good, nor when it
closes without a final ``<a/>`` (XEP-0198 §4 only RECOMMENDS that one).

An expired session leaves a tombstone (its id and the count of stanzas handled
from the client, for an hour: clients back off exponentially, StanzaJS up to 32 s
between attempts, so they often come back well after the expiry): a late ``<resume/>`` gets
``<failed h/>`` (§5 allows the 'h'), so the client resends only what the
server never had instead of everything it holds (no duplicates that way).

Offered only to transports that keep a stream on one connection (WebSocket):
Converse.js and Strophe.js use SM over WebSocket only.

Greenlet safety: ``_resumable`` (id -> session), ``_hibernating`` (session ->
timer) and ``_tombstones`` (id -> (user, h, expiry)) are mutated by stream
greenlets (enable, end, resume) and by the hibernation timers, never across a
yield.  A session's ``sm`` state is mutated
by whoever sends to it (any greenlet, without yielding) and by its own stream
greenlet (acks).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

import gevent

from boshroster.xmpp.errors import stream_error_element
from boshroster.xmpp.events import EventBus
from boshroster.xmpp.tags import q
from boshroster.xmpp.xmlio import E, Element, NS_STANZAS

# stream.py imports this module, so sessions are typed loosely here.
ClientSession = FeaturesEvent = Any

log = logging.getLogger("boshroster.sm")

NS_SM = "urn:xmpp:sm:3"
SM_PREFIX = f"{{{NS_SM}}}"
ENABLE, ENABLED, RESUME, RESUMED, FAILED = (q(NS_SM, n) for n in ("enable", "enabled", "resume", "resumed", "failed"))
R, A = q(NS_SM, "r"), q(NS_SM, "a")
_WRAP = 1 << 32
_MAX_TOMBSTONES = 10000  # expired session ids remembered at most, server-wide
_TOMBSTONE_LIFETIME = 3600.0  # seconds an expired id is remembered (a few dozen bytes each)


class AckTooHigh(Exception):
    """The client acknowledged more stanzas than were sent (§4)."""


@dataclass
class SmSettings:
    hibernation_time: float = 600.0  # smacks_hibernation_time
    max_unacked: int = 0  # smacks_max_unacked_stanzas: request an ack when more than this many
    max_queue: int = 500  # smacks_max_queue_size: unacknowledged stanzas kept at most
    max_old_sessions: int = 1  # smacks_max_old_sessions: hibernating sessions per user


class SmState:
    """One stream's counters and unacknowledged queue (XEP-0198 §4)."""

    __slots__ = ("id", "handled_in", "sent", "acked", "queue", "requested", "requested_at", "lagging")

    def __init__(self, sm_id: str | None):
        self.id = sm_id  # None: enabled without resumption
        self.handled_in = 0  # stanzas received from the client, mod 2^32
        self.sent = 0  # stanzas sent to the client, mod 2^32
        self.acked = 0  # the client's last h, mod 2^32
        self.queue: deque[tuple[Element, Callable[[bool], None] | None]] = deque()
        self.requested = False  # an <r/> is outstanding
        self.requested_at = 0  # ``sent`` when our last <r/> went out
        self.lagging = False  # an ack's h was below the previous one (ignored; see on_ack)

    def received(self) -> None:
        self.handled_in = (self.handled_in + 1) % _WRAP

    def on_sent(self, stanza: Element, delivered: Callable[[bool], None] | None) -> None:
        self.sent = (self.sent + 1) % _WRAP
        self.queue.append((stanza, delivered))

    def on_ack(self, h: int) -> list:
        """Drop what ``h`` acknowledges; returns the acknowledged entries (oldest first).

        ``h`` counts modulo 2^32, so "how many new" is ``(h - acked) mod 2^32``;
        more than what is queued means more than was sent.  An ``h`` *below* the
        previous one (within half the counter range) acknowledges nothing and is
        ignored, as ejabberd does: xmpp.js 0.13 resets its count when its
        ``<enable/>`` promise resolves, after it already counted (and acked) the
        stanzas that came in the same read as ``<enabled/>``; ending its stream
        for that would cut every xmpp.js user right after login."""
        newly = (h - self.acked) % _WRAP
        if newly > len(self.queue):
            if (self.acked - h) % _WRAP < _WRAP // 2:
                self.lagging = True
                self.requested = False
                return []
            raise AckTooHigh(f"h={h} acknowledges {newly} stanzas, {len(self.queue)} were unacknowledged")
        self.acked = h % _WRAP
        self.requested = False
        return [self.queue.popleft() for _ in range(newly)]

    def unacked(self) -> list[Element]:
        return [stanza for stanza, _ in self.queue]

    def drop_all(self) -> list:
        entries = list(self.queue)
        self.queue.clear()
        return entries


def parse_h(el: Element) -> int | None:
    value = el.get("h", "")
    if not value.isascii() or not value.isdigit() or len(value) > 10 or int(value) >= _WRAP:
        return None
    return int(value)


def _failed(condition: str, h: int | None = None) -> Element:
    return E(FAILED, {"h": str(h) if h is not None else None}, E(f"{{{NS_STANZAS}}}{condition}"))


class _Detached:
    """The transport of a hibernating session: nothing is written anywhere
    (everything it would get is kept in the unacknowledged queue)."""

    tracks_delivery = True
    congested = False

    def __init__(self, kind: str):
        self.kind = kind

    def send(self, el: Element, delivered=None) -> None:
        pass

    def stream_error(self, el: Element) -> None:
        pass


class StreamManagement:
    """The server side of XEP-0198, shared by every stream."""

    def __init__(self, settings: SmSettings, bus: EventBus, spawn_later=gevent.spawn_later, clock=time.monotonic):
        self.settings = settings
        self.bus = bus
        self.spawn_later = spawn_later
        self.clock = clock
        self._resumable: dict[str, ClientSession] = {}
        self._hibernating: dict[ClientSession, object] = {}
        # expired ids, oldest first (all live as long): id -> (username, h handled from the client, expiry)
        self._tombstones: OrderedDict[str, tuple[str, int, float]] = OrderedDict()
        # A cluster (cluster/sm_handover.py) sets these; a single process leaves them alone.
        self.id_prefix = ""  # "<node_id>.": which node an id was issued by
        self.elsewhere: Callable[[ClientSession, str, int], None] | None = None  # an id not known here
        self.buried: Callable[[str, str, int], None] | None = None  # an expired id (id, username, h)

    def register(self, bus: EventBus) -> None:
        bus.hook("stream-features", self._features)

    def _features(self, event: FeaturesEvent) -> None:
        if event.session.transport.kind == "websocket":
            event.features.append(E(q(NS_SM, "sm")))

    # -- nonzas of an active stream ------------------------------------------------

    def handle(self, session: ClientSession, el: Element) -> None:
        """``<enable/>``, ``<r/>``, ``<a/>`` from a bound client."""
        sm = session.sm
        if el.tag == R:
            if sm is None:
                return session.fail("unsupported-stanza-type", "stream management is not enabled")
            return session.send_nonza(E(A, {"h": str(sm.handled_in)}))
        if el.tag == A:
            if sm is None:
                return session.fail("unsupported-stanza-type", "stream management is not enabled")
            return self.ack(session, el)
        if el.tag == ENABLE:
            return self.enable(session, el)
        session.fail("unsupported-stanza-type", f"unexpected element {el.tag}")

    def enable(self, session: ClientSession, el: Element) -> None:
        if session.sm is not None or session.transport.kind != "websocket":
            return session.send_nonza(_failed("unexpected-request"))
        resume = el.get("resume") in ("true", "1")
        sm_id = self.id_prefix + secrets.token_urlsafe(18) if resume else None
        session.sm = SmState(sm_id)
        attrs = {"id": sm_id}
        if resume:
            self._resumable[sm_id] = session
            attrs.update({"resume": "true", "max": str(int(self.settings.hibernation_time))})
        session.send_nonza(E(ENABLED, attrs))
        log.debug("stream management enabled for %s (resumable: %s)", session.jid_str, resume)

    def ack(self, session: ClientSession, el: Element) -> None:
        h = parse_h(el)
        if h is None:
            return session.fail("bad-format", "<a/> needs an 'h' between 0 and 2^32-1")
        was_lagging = session.sm.lagging
        try:
            entries = session.sm.on_ack(h)
        except AckTooHigh as exc:
            error = stream_error_element("undefined-condition", str(exc))
            error.append(E(q(NS_SM, "handled-count-too-high"), {"h": str(h), "send-count": str(session.sm.sent)}))
            return session.fail_with(error, "undefined-condition")
        if session.sm.lagging and not was_lagging:  # said once per stream
            log.warning("%s: <a h='%d'/> is below its previous ack (%d): ignored (a client that "
                        "reset its counter; its later acks lag behind)", session.jid_str, h, session.sm.acked)
        for _, delivered in entries:
            if delivered is not None:
                delivered(True)
        self._request_if_needed(session)  # what was sent after our last <r/> (Prosody's handle_a)

    def after_send(self, session: ClientSession) -> None:
        """Ask for an ack when enough is unacknowledged; end a stream that never acks."""
        sm = session.sm
        if len(sm.queue) > self.settings.max_queue:
            if session in self._hibernating:
                log.warning("%s: %d stanzas queued while hibernating; ending the session",
                            session.jid_str, len(sm.queue))
                self._expire(session, "too many stanzas while hibernating")
            else:
                session.fail("resource-constraint", "too many unacknowledged stanzas")
            return
        self._request_if_needed(session)

    def _request_if_needed(self, session: ClientSession, force: bool = False) -> None:
        """One outstanding ``<r/>`` at a time, sent once more than ``max_unacked`` stanzas
        are unacknowledged and something was sent since the last ``<r/>`` (``force``: once
        any is).  Without that last condition, a client whose acks lag behind (see
        ``SmState.on_ack``) and the server would trade ``<r/>`` and ``<a/>`` forever."""
        sm = session.sm
        if sm.requested or not sm.queue or session in self._hibernating:
            return
        if force or (len(sm.queue) > self.settings.max_unacked and sm.sent != sm.requested_at):
            sm.requested = True
            sm.requested_at = sm.sent
            session.send_nonza(E(R))

    # -- hibernation and resumption --------------------------------------------------

    def connection_lost(self, session: ClientSession) -> bool:
        """The connection of ``session`` dropped: hibernate it if it is resumable."""
        sm = session.sm
        if sm is None or sm.id is None or self._resumable.get(sm.id) is not session:
            return False
        others = [s for s in self._hibernating if s.username == session.username]
        while len(others) >= max(1, self.settings.max_old_sessions):
            self._expire(others.pop(0), "replaced by a newer hibernating session")
        session.transport = _Detached(session.transport.kind)
        self._hibernating[session] = self.spawn_later(self.settings.hibernation_time, self._expire, session,
                                                      "hibernation timed out")
        log.info("%s hibernating for up to %ss (%d unacknowledged)", session.jid_str,
                 self.settings.hibernation_time, len(sm.queue))
        return True

    def _expire(self, session: ClientSession, why: str) -> None:
        timer = self._hibernating.pop(session, None)
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)
        log.info("%s: %s", session.jid_str, why)
        sm = session.sm
        if sm.id is not None and self._resumable.get(sm.id) is session:
            self._bury(sm.id, session.username, sm.handled_in)
        session.end(why)

    def _bury(self, sm_id: str, username: str, handled: int) -> None:
        """Remember an expired id for a late ``<resume/>`` (§5: ``<failed h/>``); bounded
        per user (``max_old_sessions``), server-wide and in time (``_TOMBSTONE_LIFETIME``)."""
        now = self.clock()
        while self._tombstones and next(iter(self._tombstones.values()))[2] <= now:
            self._tombstones.popitem(last=False)
        mine = [key for key, (user, _, _) in self._tombstones.items() if user == username]
        for key in mine[:max(0, len(mine) - max(1, self.settings.max_old_sessions) + 1)]:
            del self._tombstones[key]
        if len(self._tombstones) >= _MAX_TOMBSTONES:
            log.warning("%d expired stream management sessions remembered: forgetting the oldest",
                        len(self._tombstones))
            self._tombstones.popitem(last=False)
        self._tombstones[sm_id] = (username, handled, now + _TOMBSTONE_LIFETIME)
        if self.buried is not None:
            self.buried(sm_id, username, handled)

    def ended(self, session: ClientSession) -> list:
        """The session is over (called once from ClientSession.end): forget it and
        hand back its unacknowledged entries."""
        sm = session.sm
        if sm.id is not None and self._resumable.get(sm.id) is session:
            del self._resumable[sm.id]
        timer = self._hibernating.pop(session, None)
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)
        return sm.drop_all()

    def claim(self, previd: str, username: str, h: int | None):
        """The resumable session ``previd`` of ``username``, with the client's ``h`` applied
        and out of hibernation: ``(session, acknowledged entries, was hibernating)``; or the
        ``<failed/>`` to answer (a remembered expired id, an ``h`` over what was sent); or
        None (unknown here, or another user's: nothing of it is touched)."""
        old = self._resumable.get(previd)
        if old is None or old.username != username or old.ended or h is None:
            tomb = self._tombstones.get(previd)
            if tomb is not None and tomb[0] == username and tomb[2] > self.clock():
                # §5: "the server MAY also include a 'h' attribute indicating the number of
                # stanzas received before the timeout": the client resends only the rest.
                del self._tombstones[previd]
                log.info("resume refused for %s: the session expired (h=%d)", username, tomb[1])
                return _failed("item-not-found", tomb[1])
            return None
        try:
            entries = old.sm.on_ack(h)
        except AckTooHigh:
            return _failed("unexpected-request", old.sm.handled_in)
        timer = self._hibernating.pop(old, None)
        if timer is not None:
            timer.kill(block=False)
        return old, entries, timer is not None

    def forget(self, session: ClientSession) -> None:
        """``session`` was handed to another node: its id is no longer answered here."""
        if session.sm.id is not None and self._resumable.get(session.sm.id) is session:
            del self._resumable[session.sm.id]

    def adopt(self, session: ClientSession) -> None:
        """A session rebuilt from another node's hand-over: resumable here, hibernating
        until a connection takes it (``resume``)."""
        self._resumable[session.sm.id] = session
        self.connection_lost(session)

    def resume(self, fresh: ClientSession, el: Element) -> None:
        """``<resume previd h/>`` on a stream that authenticated but did not bind (§5)."""
        previd, h = el.get("previd", ""), parse_h(el)
        claimed = self.claim(previd, fresh.username, h)
        if claimed is None:
            if self.elsewhere is not None and h is not None:
                return self.elsewhere(fresh, previd, h)  # cluster: another node may hold it
            log.info("resume refused for %s from %s: unknown or expired id", fresh.username, fresh.peer.ip)
            return fresh.send_nonza(_failed("item-not-found"))
        if not isinstance(claimed, tuple):
            return fresh.send_nonza(claimed)
        old, entries, hibernating = claimed
        previous = fresh.hand_over_to(old)
        if not hibernating:  # its old connection has not noticed it is dead yet: close it
            log.info("%s: closing the connection it was resumed from (still open)", old.jid_str)
            previous.stream_error(stream_error_element("conflict", "the session was resumed on another connection"))
        for _, delivered in entries:
            if delivered is not None:
                delivered(True)
        old.send_nonza(E(RESUMED, {"previd": previd, "h": str(old.sm.handled_in)}))
        for stanza in old.sm.unacked():  # §5: exactly what the client did not acknowledge
            old.transport.send(stanza)
        old.sm.requested = False  # an <r/> sent on the dead connection will never be answered
        self._request_if_needed(old, force=True)  # know soon what of it arrived (as Prosody does)
        log.info("%s resumed (%d stanzas retransmitted)", old.jid_str, len(old.sm.queue))
