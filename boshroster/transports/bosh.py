"""BOSH (XEP-0124) carrying XMPP (XEP-0206): HTTP requests in, stanzas to the session core.

This module owns framing, timing and flow control only: the rid window,
held requests, replayed responses, inactivity and overactivity.  Errors go
out as HTTP 200 ``<body type='terminate' condition='…'/>`` because Strophe
drops the session on any 4xx (XEP-0124 §17.2).

Greenlet safety: each HTTP request runs in its own greenlet.  A BoshSession's
fields are mutated by those greenlets, the inactivity timer and the session
core (``send``), all without yielding except at the documented waits
(``_wait_turn`` and ``AsyncResult.get``), after which state is re-checked.
Payloads are processed strictly in rid order: a request waits for its turn.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict, deque
from typing import Callable

import gevent
from gevent.event import AsyncResult, Event

from boshroster.xmpp import xmlio
from boshroster.xmpp.errors import StreamError
from boshroster.xmpp.stream import ClientSession, Peer
from boshroster.xmpp.xmlio import Element, NS_BOSH, NS_CLIENT, NS_STREAM, NS_XBOSH

log = logging.getLogger("boshroster.bosh")

_BODY = f"{{{NS_BOSH}}}body"
_RESTART = f"{{{NS_XBOSH}}}restart"
_BODY_OPEN = (
    f'<body xmlns="{NS_BOSH}" xmlns:stream="{NS_STREAM}"'
)
_DECLARED = frozenset({NS_STREAM})
# BOSH conditions that stream errors map to directly (XEP-0124 §17.2); others are remote-stream-error.
_DIRECT_CONDITIONS = {"system-shutdown", "policy-violation", "host-unknown", "improper-addressing", "bad-request"}


def terminate_body(condition: str | None, children: str = "") -> bytes:
    cond = f' condition="{condition}"' if condition else ""
    return f'{_BODY_OPEN} type="terminate"{cond}>{children}</body>'.encode("utf-8")


EMPTY_BODY = f"{_BODY_OPEN}/>".encode("utf-8")


def _to_client_ns(el: Element) -> None:
    """Stanzas written without xmlns inherit the body's namespace: they mean jabber:client."""
    for node in el.iter():
        if node.tag.startswith(f"{{{NS_BOSH}}}"):
            node.tag = f"{{{NS_CLIENT}}}" + node.tag[len(NS_BOSH) + 2 :]


def _int_attr(body: Element, name: str) -> int | None:
    value = body.get(name)
    if value is None or not value.isdigit() or len(value) > 16:
        return None
    return int(value)


class _Held:
    __slots__ = ("rid", "result")

    def __init__(self, rid: int):
        self.rid = rid
        self.result = AsyncResult()


class BoshSession:
    """One BOSH session: the transport object the ClientSession writes into."""

    kind = "bosh"

    def __init__(self, manager: "BoshManager", sid: str, rid: int, wait: int, hold: int, peer: Peer):
        self.manager = manager
        cfg = manager.config
        self.sid = sid
        self.wait = wait
        self.hold = hold
        self.requests = max(cfg.bosh_max_requests, hold + 1)
        self.inactivity = cfg.bosh_max_inactivity
        self.last_rid = rid
        self.pending: list[Element] = []
        self.held: deque[_Held] = deque()
        self.responses: OrderedDict[int, bytes] = OrderedDict()
        self.in_flight = 0
        self.terminal: bytes | None = None  # set once the stream is over
        self._turn = Event()
        self._inactivity_timer = None
        self._flush_scheduled = False
        self.session = ClientSession(manager.core, self, peer)

    # -- called by the session core -------------------------------------------

    def send(self, el: Element) -> None:
        if self.terminal is not None:
            return
        self.pending.append(el)
        if len(self.pending) > self.manager.config.bosh_max_pending:
            self.pending.clear()
            self.session.fail("policy-violation", "too many undelivered stanzas; the client stopped polling")
            return
        if self.held and not self._flush_scheduled:
            # Answer once the current greenlet step is done, so that everything
            # it produced (a roster result and its presences, a burst of
            # messages) leaves in one response instead of one response each.
            self._flush_scheduled = True
            gevent.get_hub().loop.run_callback(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.held and self.pending and self.terminal is None:
            self._answer(self.held.popleft())

    def stream_error(self, error: Element) -> None:
        condition_el = error[0] if len(error) else None
        cond = xmlio.split_tag(condition_el.tag)[1] if condition_el is not None else "undefined-condition"
        condition = cond if cond in _DIRECT_CONDITIONS else "remote-stream-error"
        self._finish(condition, error)

    # -- helpers ---------------------------------------------------------------

    def _render(self, stanzas: list[Element]) -> bytes:
        if not stanzas:
            return EMPTY_BODY
        inner = "".join(xmlio.tostring(el, NS_BOSH, _DECLARED) for el in stanzas)
        return f"{_BODY_OPEN}>{inner}</body>".encode("utf-8")

    def _answer(self, held: _Held) -> None:
        """Answer a held request with everything pending (or the terminal body)."""
        if self.terminal is not None:
            data = self.terminal
        else:
            data = self._render(self.pending)
            self.pending = []
        self._remember(held.rid, data)
        held.result.set(data)

    def _remember(self, rid: int, data: bytes) -> None:
        self.responses[rid] = data
        while len(self.responses) > self.requests + 1:
            self.responses.popitem(last=False)

    def _finish(self, condition: str | None, error: Element | None = None, linger: bool = True) -> None:
        """The stream is over: build the terminal body, answer held requests, forget the sid."""
        if self.terminal is not None:
            return
        children = list(self.pending)
        if error is not None:
            children.append(error)
        self.pending = []
        inner = "".join(xmlio.tostring(el, NS_BOSH, _DECLARED) for el in children)
        self.terminal = terminate_body(condition, inner)
        if self.held:
            self._answer(self.held.popleft())
        while self.held:
            held = self.held.popleft()
            held.result.set(terminate_body(None))
        keep = linger and not self._delivered_terminal()
        self.manager.forget(self.sid, linger=self.terminal if keep else None)
        self._cancel_inactivity()

    def _delivered_terminal(self) -> bool:
        return any(data is self.terminal for data in self.responses.values())

    def _cancel_inactivity(self) -> None:
        if self._inactivity_timer is not None:
            self._inactivity_timer.kill(block=False)
            self._inactivity_timer = None

    def _request_done(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0 and self.terminal is None:
            self._cancel_inactivity()
            self._inactivity_timer = gevent.spawn_later(self.inactivity, self._inactive)

    def _inactive(self) -> None:
        self._inactivity_timer = None
        if self.in_flight > 0 or self.terminal is not None:
            return
        log.info("BOSH session of %s timed out after %ss of inactivity", self.session.jid_str or "(unbound)", self.inactivity)
        undelivered = self.pending
        self.pending = []
        self._finish(None, linger=False)  # XEP-0124 §10: later requests get item-not-found
        self.session.end("BOSH inactivity timeout")
        self.session.return_undelivered(undelivered)

    # -- one HTTP request --------------------------------------------------------

    def handle(self, body: Element, rid: int) -> bytes:
        cached = self.responses.get(rid)
        if cached is not None:
            return cached  # XEP-0124 §14.3: a repeated rid gets the same answer
        if self.terminal is not None:
            return self.terminal
        if rid <= self.last_rid:
            for held in self.held:
                if held.rid == rid:  # the client re-sent a held request: the newer one takes over
                    self.held.remove(held)
                    held.result.set(EMPTY_BODY)
                    return self._hold(rid)
            return self._terminate_request("item-not-found", f"rid {rid} is no longer available")
        if rid > self.last_rid + self.requests:
            return self._terminate_request("item-not-found", f"rid {rid} is outside the window")
        is_terminate = body.get("type") == "terminate"
        if self.in_flight + 1 > self.requests + (1 if is_terminate else 0):
            return self._terminate_request("policy-violation", "too many simultaneous requests")
        self.in_flight += 1
        self._cancel_inactivity()
        try:
            if not self._wait_turn(rid):
                return self._terminate_request("item-not-found", f"rid {rid - 1} never arrived")
            if self.terminal is not None:
                return self.terminal
            return self._process(body, rid, is_terminate)
        finally:
            self._request_done()

    def _wait_turn(self, rid: int) -> bool:
        """Hold a request that came early until the requests before it are processed."""
        deadline = self.wait + 1
        while self.last_rid + 1 < rid:
            self._turn.clear()
            if not self._turn.wait(timeout=deadline):
                return False
        return True

    def _process(self, body: Element, rid: int, is_terminate: bool) -> bytes:
        try:
            if body.get(_RESTART) == "true":
                features = self.session.restart()  # XEP-0206 §5: payloads of a restart are ignored
                self.send(features)
            else:
                for child in list(body):
                    _to_client_ns(child)
                    self.session.feed(child)
                    if self.terminal is not None:
                        break
        except StreamError as err:
            self.session.fail(err.condition, err.text)
        finally:
            self.last_rid = rid
            self._turn.set()
        if self.terminal is not None:
            self._remember(rid, self.terminal)
            return self.terminal
        if is_terminate:
            log.info("BOSH session of %s terminated by the client", self.session.jid_str or "(unbound)")
            self._finish(None)
            self.session.end("client terminated the BOSH session")
            data = terminate_body(None, "")
            self._remember(rid, data)
            return data
        if self.pending or self.hold == 0 or self.wait == 0:
            data = self._render(self.pending)
            self.pending = []
            self._remember(rid, data)
            return data
        return self._hold(rid)

    def _hold(self, rid: int) -> bytes:
        held = _Held(rid)
        self.held.append(held)
        while len(self.held) > self.hold:
            self._answer(self.held.popleft())  # XEP-0124 §11: never hold more than 'hold'
        try:
            # Answer a little before 'wait' so no client or proxy gives up first.
            return held.result.get(timeout=max(0.2, self.wait - min(1.0, self.wait * 0.1)))
        except gevent.Timeout:
            if held in self.held:
                self.held.remove(held)
                self._answer(held)
            return held.result.get()

    def _terminate_request(self, condition: str, why: str) -> bytes:
        log.info("BOSH %s for session of %s: %s", condition, self.session.jid_str or "(unbound)", why)
        undelivered = self.pending
        self.pending = []
        self._finish(condition)
        self.session.end(f"BOSH {condition}: {why}")
        self.session.return_undelivered(undelivered)
        return terminate_body(condition)


class BoshManager:
    """All BOSH sessions by sid, and the creation of new ones."""

    def __init__(self, core):
        self.core = core
        self.config = core.config
        self.sessions: dict[str, BoshSession] = {}
        self._lingering: dict[str, bytes] = {}
        self.sid_prefix = ""  # a cluster node's "<node_id>." (cluster/bosh_forward.py finds the owner by it)

    def forget(self, sid: str, linger: bytes | None = None) -> None:
        self.sessions.pop(sid, None)
        if linger is not None:
            # Keep the terminal body for the next request of a client that was not polling.
            self._lingering[sid] = linger
            gevent.spawn_later(self.config.bosh_max_wait + 5, self._lingering.pop, sid, None)

    def handle(self, body: Element, peer_of: Callable[[], Peer]) -> bytes:
        """Answer one BOSH request body (already parsed); never raises for client errors.

        ``peer_of`` gives the client's address and security; it is called only
        when the body creates a session (the only time the peer matters), so
        the many polls of a session do not pay for parsing addresses."""
        if body.tag != _BODY:
            return terminate_body("bad-request")
        rid = _int_attr(body, "rid")
        if rid is None:
            return terminate_body("bad-request")
        sid = body.get("sid")
        if sid is None:
            return self._create(body, rid, peer_of())
        bosh = self.sessions.get(sid)
        if bosh is None:
            lingering = self._lingering.pop(sid, None)
            return lingering if lingering is not None else terminate_body("item-not-found")
        return bosh.handle(body, rid)

    def _create(self, body: Element, rid: int, peer: Peer) -> bytes:
        cfg = self.config
        to = body.get("to")
        if not to:
            return terminate_body("improper-addressing")
        wait = _int_attr(body, "wait")
        hold = _int_attr(body, "hold")
        if body.get("wait") is not None and wait is None or body.get("hold") is not None and hold is None:
            return terminate_body("bad-request")
        wait = min(cfg.bosh_max_wait, cfg.bosh_max_wait if wait is None else wait)
        hold = min(cfg.bosh_hold, 1 if hold is None else hold)
        sid = self.sid_prefix + secrets.token_urlsafe(24)  # XEP-0124 §19.3: a bearer token, unguessable
        bosh = BoshSession(self, sid, rid, wait, hold, peer)
        try:
            features = bosh.session.open_stream(to)
        except StreamError as err:
            return terminate_body("host-unknown" if err.condition == "host-unknown" else "bad-request")
        self.sessions[sid] = bosh
        bosh.in_flight = 1
        bosh._request_done()  # starts the inactivity timer
        attrs = {
            "sid": sid,
            "wait": str(wait),
            "requests": str(bosh.requests),
            "hold": str(hold),
            "inactivity": str(bosh.inactivity),
            "polling": str(cfg.bosh_polling),
            "ver": "1.11",
            "from": cfg.domain,
            "authid": bosh.session.stream_id,
            "secure": "true" if peer.secure else "false",
            "xmpp:version": "1.0",
            "xmpp:restartlogic": "true",
        }
        if body.get("content"):
            attrs["content"] = body.get("content")
        log.info("BOSH session created for %s (wait %s, hold %s)", peer.ip, wait, hold)
        opening = "".join(f' {name}="{xmlio.escape_attr(value)}"' for name, value in attrs.items())
        inner = xmlio.tostring(features, NS_BOSH, _DECLARED)
        data = f'{_BODY_OPEN} xmlns:xmpp="{NS_XBOSH}"{opening}>{inner}</body>'.encode("utf-8")
        bosh._remember(rid, data)
        return data

    def shutdown(self) -> None:
        for bosh in list(self.sessions.values()):
            bosh.session.fail("system-shutdown", "the server is shutting down")
