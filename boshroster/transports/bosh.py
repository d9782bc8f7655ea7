"""BOSH (XEP-0124) carrying XMPP (XEP-0206): HTTP requests in, stanzas to the session core.

This module owns framing, timing and flow control: the rid window, held
requests, replayed responses, inactivity, overactivity and the limits on
input (integer attributes, stanzas per body, unauthenticated sessions per
address).  What a session owes its client (bounded queue, acknowledgements
XEP-0124 §9.2) is bosh_outbox.py.  Errors go out as HTTP 200 ``<body
type='terminate' condition='…'/>``: Strophe drops the session on any 4xx
(§17.2).  A terminal body carries no stanzas: what the session still owed
goes back to routing.  Every wait (``wait``, early rids, inactivity,
lingering terminal bodies) is a timer of an injectable clock (clock.py).
A request whose client closed its connection is never answered with stanzas
(bosh_watch.py): they wait for the session's next request (a reloaded page).
``pause`` (§10, up to ``bosh_max_pause``) answers every request at once,
empty, and makes the inactivity timeout the pause until the next request.

Greenlet safety: each HTTP request runs in its own greenlet.  A BoshSession's
fields are mutated by those greenlets, the clock's timer greenlets, the
session core (``send``, from any user's greenlet) and the hub callback
``_flush``, none of which yield except at the documented waits
(``_wait_turn``, ``_hold``'s ``AsyncResult.get``, a yield every
``_YIELD_EVERY`` stanzas of a body, the shutdown grace), after which state is
re-checked.  Payloads are processed in rid order (a request waits for its
turn) and responses are sent in rid order (§14.2: an older held request is
always answered first).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict, deque
from typing import Callable

import gevent
from gevent.event import AsyncResult, Event

from boshroster.transports.bosh_watch import ConnectionWatch, peer_closed
from boshroster.transports.bosh_outbox import BODY_OPEN as _BODY_OPEN, DECLARED as _DECLARED, EMPTY_BODY, Outbox
from boshroster.xmpp import xmlio
from boshroster.xmpp.errors import StreamError
from boshroster.xmpp.stream import ClientSession, Peer
from boshroster.xmpp.xmlio import Element, NS_BOSH, NS_CLIENT, NS_XBOSH

log = logging.getLogger("boshroster.bosh")

_RESTART = f"{{{NS_XBOSH}}}restart"
# BOSH conditions that stream errors map to directly (XEP-0124 §17.2); others are remote-stream-error.
_DIRECT_CONDITIONS = {"system-shutdown", "policy-violation", "host-unknown", "improper-addressing", "bad-request"}
# XEP-0124 §14.1: rids stay below 2**53, so 16 ASCII digits are plenty.  Only ASCII:
# str.isdigit() accepts '²' (which int() refuses) and int() accepts '١' (Arabic-Indic one).
_DIGITS = re.compile(r"[0-9]{1,16}")
# Integer attributes a client may send (XEP-0124 §7.1, §9.2, §10); each is checked.
_INT_ATTRIBUTES = ("rid", "wait", "hold", "ack", "pause")
_YIELD_EVERY = 100  # stanzas of one body processed between two yields to other greenlets


def terminate_body(condition: str | None, children: str = "") -> bytes:
    cond = f' condition="{condition}"' if condition else ""
    return f'{_BODY_OPEN} type="terminate"{cond}>{children}</body>'.encode("utf-8")


def _to_client_ns(el: Element) -> None:
    """Stanzas written without xmlns inherit the body's namespace: they mean jabber:client."""
    for node in el.iter():
        if node.tag.startswith(f"{{{NS_BOSH}}}"):
            node.tag = f"{{{NS_CLIENT}}}" + node.tag[len(NS_BOSH) + 2 :]


class BadAttribute(ValueError):
    """An integer attribute of a <body/> that is not ASCII digits (answered with bad-request)."""


def _int_attrs(body: Element) -> dict[str, int | None]:
    """Every integer attribute (None when absent); BadAttribute when one is not plain digits."""
    values = {}
    for name in _INT_ATTRIBUTES:
        value = body.get(name)
        if value is not None:
            if _DIGITS.fullmatch(value) is None:
                raise BadAttribute(f"{name}={value[:40]!r} is not a non-negative integer")
            value = int(value)
        values[name] = value
    return values


class _Held:
    __slots__ = ("rid", "result", "timer", "watch")

    def __init__(self, rid: int, sock=None):
        self.rid = rid
        self.result = AsyncResult()
        self.timer = None
        self.watch = ConnectionWatch(sock) if sock is not None else None  # bosh_watch.py


class BoshSession:
    """One BOSH session: the transport object the ClientSession writes into.

    Its stanzas for the client live in ``outbox`` (bosh_outbox.py): queued,
    then sent in a response, then acknowledged."""

    kind = "bosh"
    tracks_delivery = True  # ClientSession.send passes ``delivered`` through (see module docstring)
    paces_input = True  # stanzas over the shaper's rate wait on ``clock``, not in the request (xmpp/pacing.py)

    def __init__(self, manager, sid: str, rid: int, wait: int, hold: int, peer: Peer,
                 acks: bool = False):
        self.manager = manager
        self.clock = manager.clock
        cfg = manager.config
        self.sid = sid
        self.wait = wait
        self.hold = hold
        self.acks = acks  # the client acknowledges with 'ack' attributes (XEP-0124 §9.2)
        self.ip = peer.ip
        self.requests = max(cfg.bosh_max_requests, hold + 1)
        self.inactivity = cfg.bosh_max_inactivity
        self.last_rid = rid
        self.outbox = Outbox(self, cfg, self.requests + 1, acks)
        self.held: deque[_Held] = deque()
        self.responses: OrderedDict[int, bytes] = OrderedDict()
        self.in_flight = 0
        self.terminal: bytes | None = None  # set once the stream is over
        self._turn_waiters: list[Event] = []
        self._arrived: set[int] = set()  # rids of the requests being handled
        # rids of held requests whose client closed the connection (bosh_watch.py): a client
        # that re-sends one (§14.3) is held again, not refused as an old rid
        self._abandoned: deque[int] = deque(maxlen=self.requests)
        self._paused: int | None = None  # seconds of the pause asked for (§10), until the next request
        self._inactivity_timer = None
        self._flush_scheduled = False
        self.session = ClientSession(manager.ctx, self, peer)

    # -- called by the session core -------------------------------------------

    def send(self, el: Element, delivered: Callable[[bool], None] | None = None) -> None:
        """Queue ``el`` for the client; ``delivered`` (if given) is called once it is acknowledged."""
        if self.terminal is not None:
            # Only reachable between the terminal body and ClientSession.end (which stops sends).
            log.warning("stanza for the ended BOSH session of %s not queued (dropped)", self.session.jid_str)
            if delivered is not None:
                delivered(False)
            return
        if self.outbox.add(el, delivered) and self.held and not self._flush_scheduled and not self.outbox.frozen:
            # Answer once the current greenlet step is done, so that everything
            # it produced (a roster result and its presences, a burst of
            # messages) leaves in one response instead of one response each.
            self._flush_scheduled = True
            gevent.get_hub().loop.run_callback(self._flush)

    @property
    def congested(self) -> bool:
        """Above the high-water mark: routing bounces other users' stanzas
        (``resource-constraint``) instead of queueing more (issue 10 point 5)."""
        return self.outbox.congested

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self.held and self.outbox.ready and self.terminal is None:
            self._answer(self.held.popleft())

    def stream_error(self, error: Element) -> None:
        condition_el = error[0] if len(error) else None
        cond = xmlio.split_tag(condition_el.tag)[1] if condition_el is not None else "undefined-condition"
        condition = cond if cond in _DIRECT_CONDITIONS else "remote-stream-error"
        self._end(condition, f"stream error {cond}", error)

    # -- responses and acknowledgements -------------------------------------------

    def _respond(self, rid: int) -> bytes:
        data = self.outbox.take(rid)
        self._remember(rid, data)
        return data

    def _answer(self, held: _Held) -> None:
        """Answer a held request with what is pending (or the terminal body)."""
        if held.watch is not None and self.terminal is None and self.outbox.ready and held.watch.closed():
            return self._drop(held)  # its client is gone: the stanzas wait for the next request
        self.clock.cancel(held.timer)
        held.timer = None
        if self.terminal is not None:
            data = self.terminal
            self._remember(held.rid, data)
        else:
            data = self._respond(held.rid)
        held.result.set(data)

    def _client_gone(self, held: _Held) -> None:
        """The watch of a held request saw its client close the connection (its own greenlet)."""
        if held in self.held:
            self.held.remove(held)
            self._drop(held)

    def _drop(self, held: _Held) -> None:
        self.clock.cancel(held.timer)
        held.timer = None
        held.result.set(self._abandon(held.rid))

    def _abandon(self, rid: int) -> bytes:
        """A request whose client closed its connection is not answered with stanzas: they
        stay queued for the session's next request (XEP-0124 §9, XEP-0206 session
        continuity: a reloaded page goes on with the session's next rid).  Returns the
        empty body written into the closed connection, if at all."""
        self._abandoned.append(rid)
        log.info("BOSH request %d of %s: the client closed its connection before the answer; %d stanza(s) "
                 "stay queued for the next request", rid, self.session.jid_str or "(unbound)",
                 len(self.outbox.pending))
        return EMPTY_BODY

    def _remember(self, rid: int, data: bytes) -> None:
        self.responses[rid] = data
        while len(self.responses) > self.requests + 1:
            self.responses.popitem(last=False)

    # -- the end -------------------------------------------------------------------

    def _end(self, condition: str | None, reason: str, error: Element | None = None, linger: bool = True) -> None:
        """The stream is over: build the terminal body, answer held requests, forget the
        sid, end the ClientSession, then give back everything the client may not have."""
        if self.terminal is not None:
            return
        inner = xmlio.tostring(error, NS_BOSH, _DECLARED) if error is not None else ""
        self.terminal = terminate_body(condition, inner)
        self._next_turn()  # early requests waiting for their turn see the end
        if self.held:
            self._answer(self.held.popleft())
        while self.held:
            held = self.held.popleft()
            self.clock.cancel(held.timer)
            held.result.set(terminate_body(None))
        keep = linger and not self._delivered_terminal()
        self.manager.forget(self, linger=self.terminal if keep else None)
        self._cancel_inactivity()
        self.session.end(reason)  # unbinds first: what is given back cannot come back here
        self.outbox.give_back_all()

    def _delivered_terminal(self) -> bool:
        return any(data is self.terminal for data in self.responses.values())

    def _cancel_inactivity(self) -> None:
        self.clock.cancel(self._inactivity_timer)
        self._inactivity_timer = None

    def _request_done(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0 and self.terminal is None:
            self._cancel_inactivity()
            self._inactivity_timer = self.clock.call_later(self._paused or self.inactivity, self._inactive)

    def _inactive(self) -> None:
        self._inactivity_timer = None
        if self.in_flight > 0 or self.terminal is not None:
            return
        log.info("BOSH session of %s timed out after %ss of inactivity%s", self.session.jid_str or "(unbound)",
                 self._paused or self.inactivity, " (paused)" if self._paused else "")
        self._end(None, "BOSH inactivity timeout", linger=False)  # XEP-0124 §10: later requests get item-not-found

    # -- one HTTP request --------------------------------------------------------

    def handle(self, body: Element, rid: int, ack: int | None = None, sock=None, pause: int | None = None) -> bytes:
        """Answer one request; ``sock``, its connection, is watched while the request is held."""
        cached = self.responses.get(rid)
        if cached is not None:
            return cached  # XEP-0124 §14.3: a repeated rid gets the same answer
        if self.terminal is not None:
            return self.terminal
        if rid <= self.last_rid:
            for held in self.held:
                if held.rid == rid:  # the client re-sent a held request: the newer one takes over
                    self.held.remove(held)
                    self.clock.cancel(held.timer)
                    held.result.set(EMPTY_BODY)
                    return self._hold_again(rid, sock)
            if rid in self._abandoned:  # its client closed the connection; now it re-sends it
                self._abandoned.remove(rid)
                return self._hold_again(rid, sock)
            return self._terminate_request("item-not-found", f"rid {rid} is no longer available")
        if rid > self.last_rid + self.requests:
            return self._terminate_request("item-not-found", f"rid {rid} is outside the window")
        is_terminate = body.get("type") == "terminate"
        if pause is not None and not 0 < pause <= self.manager.config.bosh_max_pause:
            return self._terminate_request("policy-violation", f"pause={pause} (maxpause "
                                           f"{self.manager.config.bosh_max_pause})")
        if self.in_flight + 1 > self.requests + (1 if is_terminate or pause is not None else 0):
            return self._terminate_request("policy-violation", "too many simultaneous requests")
        limit = self.manager.config.bosh_max_stanzas_per_body
        if len(body) > limit:
            log.warning("BOSH body with %d stanzas from %s (%s) refused (bosh_max_stanzas_per_body=%d)",
                        len(body), self.ip, self.session.jid_str or "unauthenticated", limit)
            return self._terminate_request("policy-violation", f"{len(body)} stanzas in one body")
        if self.outbox.unacked:
            self.outbox.acknowledge(rid, ack)
        self.in_flight += 1
        self._arrived.add(rid)
        self._cancel_inactivity()
        self._paused = None  # §10: "normal behavior resumes" with the next request
        try:
            if not self._wait_turn(rid):
                return self._terminate_request("item-not-found", f"rid {rid - 1} never arrived")
            if self.terminal is not None:
                return self.terminal
            return self._process(body, rid, is_terminate, sock, pause)
        finally:
            self._arrived.discard(rid)
            self._request_done()

    def _wait_turn(self, rid: int) -> bool:
        """Hold a request that came early until the requests before it are processed
        (XEP-0124 §14.2); False if a missing rid has not arrived within wait + 1 seconds
        (a request that arrived and is still being processed, e.g. slowed down by
        the shaper, is no gap)."""
        if self.last_rid + 1 >= rid:
            return True
        expired = []
        event = Event()

        def expire():
            if all(r in self._arrived for r in range(self.last_rid + 1, rid)):
                timers[0] = self.clock.call_later(self.wait + 1, expire)
                return
            expired.append(True)
            event.set()

        timers = [self.clock.call_later(self.wait + 1, expire)]
        try:
            while self.last_rid + 1 < rid and self.terminal is None:
                if expired:
                    return False
                event.clear()
                self._turn_waiters.append(event)
                event.wait()
            return True
        finally:
            self.clock.cancel(timers[0])

    def _next_turn(self) -> None:
        waiters, self._turn_waiters = self._turn_waiters, []
        for event in waiters:
            event.set()

    def _process(self, body: Element, rid: int, is_terminate: bool, sock=None, pause: int | None = None) -> bytes:
        try:
            if body.get(_RESTART) == "true":
                features = self.session.restart()  # XEP-0206 §5: payloads of a restart are ignored
                self.send(features)
            else:
                for index, child in enumerate(list(body), 1):
                    _to_client_ns(child)
                    self.session.feed(child)
                    if self.terminal is not None:
                        break
                    if index % _YIELD_EVERY == 0:
                        gevent.sleep(0)  # a body of thousands of stanzas must not stall everyone else
                        if self.terminal is not None:
                            break
        except StreamError as err:
            self.session.fail(err.condition, err.text)
        finally:
            self.last_rid = rid
            if self._turn_waiters:
                self._next_turn()
        if self.terminal is not None:
            self._remember(rid, self.terminal)
            return self.terminal
        if is_terminate:
            log.info("BOSH session of %s terminated by the client", self.session.jid_str or "(unbound)")
            self._end(None, "client terminated the BOSH session")
            data = terminate_body(None, "")
            self._remember(rid, data)
            return data
        if pause is not None:
            return self._pause(rid, pause)
        if not self.held and (self.outbox.ready or self.hold == 0 or self.wait == 0):
            if sock is not None and self.outbox.ready and peer_closed(sock):
                return self._abandon(rid)  # gone before its answer (it arrived with its FIN)
            return self._respond(rid)
        return self._hold(rid, sock)  # an older held request is answered first (rid order, §14.2)

    def _pause(self, rid: int, pause: int) -> bytes:
        """XEP-0124 §10: the client (a page being left) asks for up to ``pause`` seconds
        without requests.  Every held request and this one are answered at once, all empty:
        what is queued waits for the next request (the leaving page reads no response), and
        the inactivity timeout is ``pause`` until then."""
        self._paused = pause
        while self.held:
            held = self.held.popleft()
            self.clock.cancel(held.timer)
            held.timer = None
            self._remember(held.rid, EMPTY_BODY)
            held.result.set(EMPTY_BODY)
        log.info("BOSH session of %s paused for up to %ss", self.session.jid_str or "(unbound)", pause)
        self._remember(rid, EMPTY_BODY)
        return EMPTY_BODY

    def _hold_again(self, rid: int, sock) -> bytes:
        """A re-sent request (§14.3) held again: its payload was processed the first time."""
        self.in_flight += 1
        self._cancel_inactivity()
        try:
            return self._hold(rid, sock)
        finally:
            self._request_done()

    def _hold(self, rid: int, sock=None) -> bytes:
        held = _Held(rid, sock)
        self.held.append(held)
        while len(self.held) > self.hold:
            self._answer(self.held.popleft())  # XEP-0124 §11: never hold more than 'hold'
        if self.outbox.ready:
            self._flush()  # what did not fit in the older response goes in this one
        if held in self.held and self.outbox.awaiting_ack:
            # Only the client's next request acknowledges what was just sent, and it
            # sends one when this request returns: answer now, do not stall for 'wait'.
            self.held.remove(held)
            self._answer(held)
        if held in self.held:
            # Answer a little before 'wait' so no client or proxy gives up first.
            held.timer = self.clock.call_later(max(0.2, self.wait - min(1.0, self.wait * 0.1)), self._expire, held)
            if held.watch is not None:
                held.watch.start(lambda: self._client_gone(held))
        try:
            return held.result.get()
        finally:
            if held.watch is not None:
                held.watch.stop()

    def _expire(self, held: _Held) -> None:
        held.timer = None
        if held in self.held:
            self.held.remove(held)
            self._answer(held)

    def _terminate_request(self, condition: str, why: str) -> bytes:
        log.info("BOSH %s for session of %s: %s", condition, self.session.jid_str or "(unbound)", why)
        self._end(condition, f"BOSH {condition}: {why}")
        return terminate_body(condition)
