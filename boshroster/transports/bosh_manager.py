"""All BOSH sessions of the server by sid, and the creation of new ones (XEP-0124 §7).

One session's framing and timing is bosh.py.  Greenlet safety: ``sessions``,
``_lingering`` and the per-address groups are mutated by request greenlets
(creation, end) and clock timers (lingering bodies), never across a yield.
"""

from __future__ import annotations

import logging
import secrets
from typing import Callable

import gevent

from boshroster.transports.bosh import BadAttribute, BoshSession, _int_attrs, terminate_body
from boshroster.transports.bosh_outbox import BODY_OPEN as _BODY_OPEN, DECLARED as _DECLARED
from boshroster.transports.clock import GeventClock
from boshroster.xmpp import xmlio
from boshroster.xmpp.errors import StreamError
from boshroster.xmpp.stream import Peer, StreamContext
from boshroster.xmpp.xmlio import Element, NS_BOSH, NS_XBOSH

log = logging.getLogger("boshroster.bosh")

_BODY = f"{{{NS_BOSH}}}body"


class BoshManager:
    """All BOSH sessions by sid, and the creation of new ones.

    ``_unauthenticated`` maps a client address to its sessions that had not
    authenticated when last looked at (pruned at each creation from that
    address, emptied as sessions end): the per-address cap (issue 10 points 8, 16)."""

    def __init__(self, ctx: StreamContext, clock=None):
        self.ctx = ctx
        self.config = ctx.config
        self.clock = clock or GeventClock()
        self.sessions: dict[str, BoshSession] = {}
        self._lingering: dict[str, bytes] = {}
        self._unauthenticated: dict[str, set[BoshSession]] = {}
        self._refused_unauthenticated: dict[str, int] = {}
        self.sid_prefix = ""  # a cluster node's "<node_id>." (cluster/bosh_forward.py finds the owner by it)

    def forget(self, bosh: BoshSession, linger: bytes | None = None) -> None:
        sid = bosh.sid
        self.sessions.pop(sid, None)
        group = self._unauthenticated.get(bosh.ip)
        if group is not None:
            group.discard(bosh)
            if not group:
                del self._unauthenticated[bosh.ip]
                self._refused_unauthenticated.pop(bosh.ip, None)  # else one entry per address ever refused
        if linger is not None:
            # Keep the terminal body for the next request of a client that was not polling.
            self._lingering[sid] = linger
            self.clock.call_later(self.config.bosh_max_wait + 5, self._lingering.pop, sid, None)

    def handle(self, body: Element, peer_of: Callable[[], Peer], sock=None) -> bytes:
        """Answer one BOSH request body (already parsed); never raises for client errors.
        ``sock`` is the request's connection (watched while the request is held, bosh_watch.py).

        ``peer_of`` gives the client's address and security; it is called only
        when the body creates a session (the only time the peer matters), so
        the many polls of a session do not pay for parsing addresses."""
        if body.tag != _BODY:
            return terminate_body("bad-request")
        sid = body.get("sid")
        try:
            values = _int_attrs(body)
            if values["rid"] is None:
                raise BadAttribute("no rid")
        except BadAttribute as bad:
            bosh = self.sessions.get(sid) if sid is not None else None
            if bosh is not None:
                return bosh._terminate_request("bad-request", str(bad))
            log.info("BOSH bad-request: %s", bad)
            return terminate_body("bad-request")
        rid, ack = values["rid"], values["ack"]
        if sid is None:
            return self._create(body, rid, values["wait"], values["hold"], ack, peer_of())
        bosh = self.sessions.get(sid)
        if bosh is None:
            lingering = self._lingering.pop(sid, None)
            return lingering if lingering is not None else terminate_body("item-not-found")
        return bosh.handle(body, rid, ack, sock, values["pause"])

    def _admit_unauthenticated(self, peer: Peer) -> tuple[bool, set | None]:
        """(admitted, the address's group of unauthenticated sessions to join or None when not counted)."""
        cfg = self.config
        cap = cfg.bosh_max_unauthenticated_per_address
        if cap <= 0 or (peer.is_loopback and not cfg.bosh_unauthenticated_limit_loopback):
            return True, None
        group = self._unauthenticated.get(peer.ip)
        if group is None:
            group = self._unauthenticated[peer.ip] = set()
        else:
            for bosh in [b for b in group if b.session.username is not None or b.terminal is not None]:
                group.discard(bosh)
        if len(group) < cap:
            self._refused_unauthenticated.pop(peer.ip, None)
            return True, group
        refused = self._refused_unauthenticated.get(peer.ip, 0) + 1
        self._refused_unauthenticated[peer.ip] = refused
        if refused == 1 or refused % 1000 == 0:
            log.warning("BOSH: %d unauthenticated sessions from %s: new session refused "
                        "(bosh_max_unauthenticated_per_address=%d; %d refused so far)", len(group), peer.ip, cap, refused)
        return False, None

    def _create(self, body: Element, rid: int, wait: int | None, hold: int | None, ack: int | None,
                peer: Peer) -> bytes:
        cfg = self.config
        to = body.get("to")
        if not to:
            return terminate_body("improper-addressing")
        wait = min(cfg.bosh_max_wait, cfg.bosh_max_wait if wait is None else wait)
        hold = min(cfg.bosh_hold, 1 if hold is None else hold)
        admitted, group = self._admit_unauthenticated(peer)
        if not admitted:
            return terminate_body("policy-violation")
        sid = self.sid_prefix + secrets.token_urlsafe(24)  # XEP-0124 §19.3: a bearer token, unguessable
        bosh = BoshSession(self, sid, rid, wait, hold, peer, acks=ack is not None)
        try:
            features = bosh.session.open_stream(to)
        except StreamError as err:
            return terminate_body("host-unknown" if err.condition == "host-unknown" else "bad-request")
        self.sessions[sid] = bosh
        if group is not None:
            group.add(bosh)
        bosh.in_flight = 1
        bosh._request_done()  # starts the inactivity timer
        attrs = {"sid": sid, "wait": str(wait), "requests": str(bosh.requests), "hold": str(hold),
                 "inactivity": str(bosh.inactivity), "polling": str(cfg.bosh_polling), "ver": "1.11",
                 "from": cfg.domain, "authid": bosh.session.stream_id, "secure": "true" if peer.secure else "false",
                 "xmpp:version": "1.0", "xmpp:restartlogic": "true"}
        if cfg.bosh_max_pause > 0:
            attrs["maxpause"] = str(cfg.bosh_max_pause)  # XEP-0124 §10
        if body.get("content"):
            attrs["content"] = body.get("content")
        log.info("BOSH session created for %s (wait %s, hold %s%s)", peer.ip, wait, hold, ", acks" if bosh.acks else "")
        opening = "".join(f' {name}="{xmlio.escape_attr(value)}"' for name, value in attrs.items())
        inner = xmlio.tostring(features, NS_BOSH, _DECLARED)
        data = f'{_BODY_OPEN} xmlns:xmpp="{NS_XBOSH}"{opening}>{inner}</body>'.encode("utf-8")
        bosh._remember(rid, data)
        return data

    def shutdown(self, grace: float = 0.5) -> None:
        """system-shutdown for every session.  First, for up to ``grace`` seconds, responses
        carry nothing new while the clients' next requests acknowledge the responses
        already sent: what is unacknowledged at the end goes back to offline storage
        and would be a duplicate for a client that did read it; what was never sent
        goes there too, exactly once."""
        for bosh in self.sessions.values():
            bosh.outbox.frozen = True
        waited = 0.0
        while waited < grace and any(bosh.outbox.unacked for bosh in self.sessions.values()):
            gevent.sleep(0.02)
            waited += 0.02
        for bosh in list(self.sessions.values()):
            bosh.session.fail("system-shutdown", "the server is shutting down")
