"""One client's XMPP stream, whatever carries it: open, SASL, restart, bind, then stanzas.

The session core does no I/O of its own.  A transport (BOSH or WebSocket)
creates a ClientSession with an object that has two methods:

    transport.send(element)          queue one top-level element for the client
    transport.stream_error(element)  send a <stream:error/> and close the stream

then calls ``open_stream`` / ``restart`` / ``feed`` / ``end``.  Tests drive it
the same way with a list-collecting transport.

It needs only a ``StreamContext``: the domain, the router, the session
manager, the SASL mechanisms and the event bus (``stream-features`` lets
features add to the features offered after authentication; ``authenticated``
(session) fires at SASL success, before the success is sent, so a feature can
start work for the login then: the roster fetch).

States, named for what the stream is waiting for:
``new`` (no <open/> yet) -> ``auth`` (SASL) -> ``restart`` (SASL succeeded,
waiting for the stream restart) -> ``bind`` (waiting for resource binding) ->
``active`` (bound: stanzas flow) -> ``ended``.

Greenlet safety: a session is fed by one greenlet at a time (the WebSocket
reader, or the BOSH request holding the session's rid turn, or for BOSH
stanzas over the shaper's rate the pacer's timer greenlet, never at the same
time as a request: pacing.py); its fields are
written by that greenlet, except the IM state (presence, priority, interested,
carbons, directed), which im/ handlers write from the greenlet of the stanza
or event that changes it and other users' deliveries only read.  ``end`` may
run from a timer greenlet and is idempotent; ``bound`` is called only by
SessionManager.bind from the session's own greenlet.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from boshroster.xmpp.errors import SaslFailure, StanzaError, StreamError, error_element, error_reply, stream_error_element
from boshroster.xmpp.events import EventBus
from boshroster.xmpp.jid import JID, JIDError, prep_resource, prep_domain
from boshroster.xmpp.pacing import PacedInput, Shaper  # Shaper: re-exported (wiring.py)
from boshroster.xmpp.stream_management import ENABLE as SM_ENABLE, FAILED as SM_FAILED, RESUME as SM_RESUME, SM_PREFIX
from boshroster.xmpp.tags import (
    BIND,
    BIND_JID,
    BIND_RESOURCE,
    FEATURES,
    IQ,
    MESSAGE,
    SASL_ABORT,
    SASL_AUTH,
    SASL_CHALLENGE,
    SASL_FAILURE,
    SASL_MECHANISM,
    SASL_MECHANISMS,
    SASL_RESPONSE,
    SASL_SUCCESS,
    SESSION,
    STANZAS,
)
from boshroster.xmpp.xmlio import E, Element, NS_SASL, NS_STANZAS


log = logging.getLogger("boshroster.session")



class StanzaRouter(Protocol):
    """What a bound stream hands its stanzas to (router.py)."""

    def route(self, origin: "ClientSession", stanza: Element) -> None: ...


class Lifecycle(Protocol):
    """The owner of bind/unbind (sessions.py SessionManager)."""

    def bind(self, session: "ClientSession", resource: str | None) -> JID: ...

    def unbind(self, session: "ClientSession") -> None: ...

    def undelivered(self, session: "ClientSession", stanzas: list[Element]) -> None: ...


@dataclass
class StreamContext:
    """What every stream needs from the server (built once by the wiring)."""

    config: Any  # transports read their settings from it
    domain: str
    router: StanzaRouter
    sessions: Lifecycle
    bus: EventBus
    mechanisms: Callable[[bool], list[str]]  # secure? -> SASL mechanisms to offer
    # (mechanism, offered, peer address) -> exchange, which throttles logins itself; raises SaslFailure
    start_sasl: Callable[[str, list[str], str], Any]
    metrics: Any
    sm: Any = None  # StreamManagement (stream_management.py), or None when disabled
    shaper: Callable[[], "Shaper"] | None = None  # a traffic shaper per stream, or None


@dataclass(slots=True)
class FeaturesEvent:
    session: "ClientSession"
    features: Element


class Transport(Protocol):
    kind: str

    def send(self, element: Element) -> None: ...

    def stream_error(self, element: Element) -> None: ...


@dataclass(frozen=True)
class Peer:
    """Where a connection comes from, as established by the HTTP layer."""

    ip: str
    secure: bool  # TLS somewhere on the path we trust (proxy said so, or config)

    @property
    def is_loopback(self) -> bool:
        return self.ip.startswith("127.") or self.ip == "::1"


class ClientSession:
    def __init__(self, ctx: StreamContext, transport: Transport, peer: Peer):
        self.ctx = ctx
        self.transport = transport
        self.peer = peer
        self.state = "new"  # see the module docstring
        self.stream_id = ""
        self.username: str | None = None
        self.jid: JID | None = None
        self.jid_str = ""
        self._sasl = None  # the SASL exchange in progress (ctx.start_sasl)
        # IM state, read by other users' deliveries (see presence.py / messages.py)
        self.presence: Element | None = None  # last available presence broadcast
        self.priority = 0
        self.interested = False  # asked for its roster: gets roster pushes (RFC 6121 §2.2)
        self.carbons = False
        self.directed: set[str] = set()  # full/bare JIDs sent directed presence (RFC 6121 §4.6)
        self.started = time.monotonic()
        self.sm = None  # SmState once the client enabled XEP-0198 (stream_management.py)
        self._shaper = ctx.shaper() if ctx.shaper is not None else None
        self._pacer = None  # BOSH: stanzas over the rate wait here, not in the request (pacing.py)
        if self._shaper is not None and getattr(transport, "paces_input", False):
            self._pacer = PacedInput(self._shaper, transport.clock, ctx.config.bosh_shaper_queue,
                                     self._route_stanza, self._refuse_paced, lambda: self.jid_str)

    # -- transport-facing API ---------------------------------------------

    @property
    def ended(self) -> bool:
        return self.state == "ended"

    @property
    def available(self) -> bool:
        return self.presence is not None

    def open_stream(self, to: str | None) -> Element:
        """Start (or restart) the stream addressed to ``to``; return the features to send.

        Raises StreamError('host-unknown') for another domain."""
        try:
            domain = prep_domain(to or "")
        except JIDError:
            raise StreamError("host-unknown", "this server serves " + self.ctx.domain) from None
        if domain != self.ctx.domain:
            raise StreamError("host-unknown", "this server serves " + self.ctx.domain)
        self.stream_id = secrets.token_urlsafe(12)
        if self.state == "new":
            self.state = "auth"
            self.ctx.metrics.session_opened(self.transport.kind)
        elif self.state == "restart":
            self.state = "bind"
        return self.features()

    def restart(self) -> Element:
        """A stream restart (after SASL success); returns the new features."""
        if self.state != "restart":
            raise StreamError("not-authorized", "stream restart before authentication")
        return self.open_stream(self.ctx.domain)

    def features(self) -> Element:
        feats = E(FEATURES)
        if self.state == "auth":
            mechs = E(SASL_MECHANISMS)
            for name in self.mechanisms():
                mechs.append(E(SASL_MECHANISM, text=name))
            feats.append(mechs)
        elif self.state == "bind":
            feats.append(E(BIND))
            self.ctx.bus.fire("stream-features", FeaturesEvent(self, feats))
        return feats

    def mechanisms(self) -> list[str]:
        return self.ctx.mechanisms(self.peer.secure or self.peer.is_loopback)

    def feed(self, el: Element) -> None:
        """Process one top-level element from the client."""
        if self.state == "ended":
            return
        try:
            if self.state == "active":
                if el.tag in STANZAS:
                    if self._pacer is not None:
                        return self._pacer.submit(el)
                    if self._shaper is not None and self._shaper.take() and not self._shaper.throttled:
                        self._shaper.throttled = True
                        log.warning("%s sends faster than %s stanzas/s: slowed down", self.jid_str, self._shaper.rate)
                    self._route_stanza(el)
                elif el.tag.startswith(SM_PREFIX) and self.ctx.sm is not None:
                    self.ctx.sm.handle(self, el)
                else:
                    raise StreamError("unsupported-stanza-type", f"unexpected element {el.tag}")
            elif self.state == "auth":
                self._sasl_step(el)
            elif self.state == "bind":
                if el.tag == SM_RESUME and self.ctx.sm is not None:
                    self.ctx.sm.resume(self, el)
                elif el.tag == SM_ENABLE:
                    self.send_nonza(E(SM_FAILED, None, E(f"{{{NS_STANZAS}}}unexpected-request")))
                else:
                    self._pre_bind(el)
            elif self.state == "restart":
                raise StreamError("not-authorized", "restart the stream after SASL success")
            else:
                raise StreamError("not-authorized", "stream not open")
        except StreamError as err:
            self.fail(err.condition, err.text)

    def _route_stanza(self, el: Element) -> None:
        """Hand one stanza of the bound client to the router (after the shaper)."""
        if self.state != "active":
            return  # it ended while the stanza waited
        if self.sm is not None:
            self.sm.received()
        try:
            self.ctx.router.route(self, el)
        except StreamError as err:
            self.fail(err.condition, err.text)

    def _refuse_paced(self, el: Element) -> None:
        """The pacing queue is full: ``el`` is answered with resource-constraint (RFC 6120
        §8.3.3.18, type wait); never an error for an error or a result (§8.3.1)."""
        if self.state != "active":
            return
        if self.sm is not None:
            self.sm.received()
        if el.get("type") in ("error", "result"):
            return
        reply = error_reply(el, StanzaError("resource-constraint", "wait",
                                            "too many stanzas at once: slow down and send again"))
        reply.set("to", self.jid_str)
        self.send(reply)

    def fail(self, condition: str, text: str | None = None) -> None:
        """Close the stream with a stream error (RFC 6120 §4.9)."""
        if self.state == "ended":
            return
        log.info("stream error %s for %s from %s: %s", condition, self.jid_str or "(unauthenticated)", self.peer.ip, text or "")
        self.fail_with(stream_error_element(condition, text), condition)

    def fail_with(self, error: Element, condition: str) -> None:
        """Close the stream with a prebuilt ``<stream:error/>``."""
        if self.state == "ended":
            return
        self.transport.stream_error(error)
        self.end(f"stream error {condition}")

    def connection_lost(self, reason: str) -> None:
        """The transport's connection dropped without a close: a resumable
        stream (XEP-0198) hibernates, any other ends."""
        if self.sm is not None and self.state == "active" and self.ctx.sm.connection_lost(self):
            return
        self.end(reason)

    def end(self, reason: str) -> None:
        """The stream is over (logout, timeout, socket drop, error): clean up once."""
        if self.state == "ended":
            return
        if self._pacer is not None and not self._pacer.stopped:
            self._route_paced_messages(self._pacer.stop())
            if self.state == "ended":
                return  # routing them ended the stream (re-entered end)
        was_bound = self.jid is not None
        was_counted = self.state != "new"  # session_opened runs at the first <open/> only
        self.state = "ended"
        if was_counted:
            self.ctx.metrics.session_closed(self.transport.kind)
        unacked = self.ctx.sm.ended(self) if self.sm is not None else ()
        if was_bound:
            self.ctx.sessions.unbind(self)
            log.info("session end %s (%s, %s): %s", self.jid_str, self.transport.kind, self.peer.ip, reason)
        if unacked:
            # XEP-0198 §4: what the client never acknowledged was not delivered.  A
            # stanza with a delivered callback belongs to its sender (offline store
            # keeps the row); the rest is routed again.
            again = [stanza for stanza, delivered in unacked if delivered is None]
            for _, delivered in unacked:
                if delivered is not None:
                    delivered(False)
            self.return_undelivered(again)

    def _route_paced_messages(self, left: list[Element]) -> None:
        """The stream ends with stanzas still paced: its HTTP requests were answered, so
        the messages among them were accepted and are routed now (bounded by
        bosh_shaper_queue); IQs and presences need the stream and die with it."""
        for el in left:  # no yield: end() runs in places that expect none (bind's kick, shutdown)
            if el.tag == MESSAGE:
                self._route_stanza(el)

    def hand_over_to(self, old: "ClientSession"):
        """XEP-0198 resumption: this fresh stream's connection now carries ``old``,
        and this object ends.  Returns ``old``'s previous transport."""
        transport, previous = self.transport, old.transport
        transport.session = old
        old.transport = transport
        old.peer = self.peer
        old.stream_id = self.stream_id
        self.transport = previous
        if hasattr(previous, "session"):
            previous.session = self  # its connection, if still open, ends nothing but this
        self.end("resumed an earlier session")
        return previous

    def send_nonza(self, el: Element) -> None:
        """Send a non-stanza element (XEP-0198 acks and answers): not counted."""
        if self.state != "ended":
            self.transport.send(el)

    def bound(self, jid: JID) -> None:
        """SessionManager.bind gave this stream its full JID."""
        self.jid = jid
        self.jid_str = str(jid)

    def return_undelivered(self, stanzas: list[Element]) -> None:
        """The transport could not deliver these (the stream died first): route
        them again (other resources, offline storage) instead of losing them."""
        if self.jid is not None and stanzas:
            self.ctx.sessions.undelivered(self, stanzas)

    def send(self, el: Element, delivered: Callable[[bool], None] | None = None) -> None:
        """Queue ``el`` for the client.

        ``delivered``, if given, is called exactly once: ``True`` once the client
        has the stanza (WebSocket: written to the socket; BOSH: in a response the
        client acknowledged, XEP-0124 §9), ``False`` if it never will (the stream
        ended first).  A transport that cannot tell (no ``tracks_delivery``) counts
        the hand-over as delivery."""
        if self.state == "ended":
            if delivered is not None:
                delivered(False)
            return
        if self.sm is not None and el.tag in STANZAS:
            # XEP-0198: delivered means acknowledged by the client, not written.
            self.sm.on_sent(el, delivered)
            self.transport.send(el)
            self.ctx.sm.after_send(self)
        elif delivered is None:
            self.transport.send(el)
        elif getattr(self.transport, "tracks_delivery", False):
            self.transport.send(el, delivered)
        else:
            self.transport.send(el)
            delivered(True)

    @property
    def congested(self) -> bool:
        """The transport's output is full: stanzas from other users should be bounced
        to their sender (``resource-constraint``) instead of queued."""
        return getattr(self.transport, "congested", False)

    # -- SASL (RFC 6120 §6) ------------------------------------------------

    def _sasl_step(self, el: Element) -> None:
        tag = el.tag
        if tag == SASL_AUTH:
            self._sasl = None
            try:
                # The exchange throttles per (address, username) once it knows the username.
                self._sasl = self.ctx.start_sasl(el.get("mechanism", ""), self.mechanisms(), self.peer.ip)
            except SaslFailure as failure:
                return self._sasl_failure(failure.condition)
        elif tag == SASL_RESPONSE:
            if self._sasl is None:
                return self._sasl_failure("malformed-request", "no SASL exchange in progress")
        elif tag == SASL_ABORT:
            self._sasl = None
            return self._sasl_failure("aborted")
        else:
            raise StreamError("not-authorized", "authenticate first")
        text = (el.text or "").strip()
        try:
            data = b"" if text in ("", "=") else base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self._sasl = None
            return self._sasl_failure("incorrect-encoding")
        try:
            kind, payload = self._sasl.step(data)
        except SaslFailure as failure:
            mechanism = self._sasl.mechanism if self._sasl else "?"
            self._sasl = None
            self.ctx.metrics.login_failed()
            log.warning("login failed from %s (%s, %s): %s", self.peer.ip, mechanism, self.transport.kind, failure.condition)
            throttled = failure.condition == "temporary-auth-failure" and failure.text
            return self._sasl_failure(failure.condition, failure.text if throttled else None)
        encoded = base64.b64encode(payload).decode("ascii") if payload else None
        if kind == "challenge":
            self.send(E(SASL_CHALLENGE, text=encoded or "="))
            return
        self.username = self._sasl.username
        self._sasl = None
        self.state = "restart"
        self.ctx.metrics.login_ok()
        log.info("login %s from %s (%s)", self.username, self.peer.ip, self.transport.kind)
        # Before the success goes out: what a feature starts for the login (the roster
        # fetch) overlaps the client's restart and bind round trips.
        self.ctx.bus.fire("authenticated", self)
        self.send(E(SASL_SUCCESS, text=encoded))

    def _sasl_failure(self, condition: str, text: str | None = None) -> None:
        failure = E(SASL_FAILURE, None, E(f"{{{NS_SASL}}}{condition}"))
        if text:
            failure.append(E(f"{{{NS_SASL}}}text", text=text))
        self.send(failure)

    # -- resource binding (RFC 6120 §7) -----------------------------------

    def _pre_bind(self, el: Element) -> None:
        if el.tag != IQ:
            raise StreamError("not-authorized", "bind a resource first")
        iq_type = el.get("type")
        if iq_type not in ("get", "set"):
            return  # results/errors before bind: nothing to answer
        payload = el.find(BIND)
        session = el.find(SESSION)
        if iq_type == "set" and payload is not None:
            return self._bind(el, payload)
        if iq_type == "set" and session is not None:
            return self.send(E(IQ, {"type": "result", "id": el.get("id")}))
        reply = E(IQ, {"type": "error", "id": el.get("id")})
        reply.append(error_element("not-authorized", "auth", "bind a resource first"))
        self.send(reply)

    def _bind(self, iq: Element, payload: Element) -> None:
        requested = payload.findtext(BIND_RESOURCE)
        try:
            resource = prep_resource(requested.strip()) if requested and requested.strip() else None
        except JIDError:
            return self._reply_error(iq, StanzaError("bad-request", "modify", "invalid resource"))
        try:
            self.ctx.sessions.bind(self, resource)
        except StanzaError as err:
            return self._reply_error(iq, err)
        self.state = "active"
        result = E(
            IQ,
            {"type": "result", "id": iq.get("id")},
            E(BIND, None, E(BIND_JID, text=self.jid_str)),
        )
        self.send(result)
        log.info("bound %s (%s, %s)", self.jid_str, self.transport.kind, self.peer.ip)

    def _reply_error(self, iq: Element, err: StanzaError) -> None:
        reply = E(IQ, {"type": "error", "id": iq.get("id")})
        reply.append(error_element(err.condition, err.error_type, err.text))
        self.send(reply)
