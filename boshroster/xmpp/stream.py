"""One client's XMPP stream, whatever carries it: open, SASL, restart, bind, then stanzas.

The session core does no I/O of its own.  A transport (BOSH or WebSocket)
creates a ClientSession with an object that has two methods:

    transport.send(element)          queue one top-level element for the client
    transport.stream_error(element)  send a <stream:error/> and close the stream

then calls ``open_stream`` / ``restart`` / ``feed`` / ``end``.  Tests drive it
the same way with a list-collecting transport.

Greenlet safety: a session is fed by one greenlet at a time (the WebSocket
reader, or the BOSH request holding the session's rid turn); its fields are
written by that greenlet, except presence state, which the router reads when
other users' stanzas arrive.  ``end`` may run from a timer greenlet and is
idempotent.
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from boshroster.auth import sasl
from boshroster.xmpp.errors import StanzaError, StreamError, error_element, stream_error_element
from boshroster.xmpp.jid import JID, JIDError, prep_resource, prep_domain
from boshroster.xmpp.xmlio import (
    E,
    Element,
    NS_BIND,
    NS_CLIENT,
    NS_ROSTERVER,
    NS_SASL,
    NS_SESSION,
    NS_STREAM,
)

if TYPE_CHECKING:
    from boshroster.wiring import Core

log = logging.getLogger("boshroster.session")

STANZA_TAGS = {f"{{{NS_CLIENT}}}message", f"{{{NS_CLIENT}}}presence", f"{{{NS_CLIENT}}}iq"}
_IQ = f"{{{NS_CLIENT}}}iq"


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
    def __init__(self, core: "Core", transport: Transport, peer: Peer):
        self.core = core
        self.transport = transport
        self.peer = peer
        self.state = "new"  # new -> auth -> restart -> bind -> active -> ended
        self.stream_id = ""
        self.username: str | None = None
        self.jid: JID | None = None
        self.jid_str = ""
        self._sasl: sasl.SaslExchange | None = None
        # IM state, read by other users' deliveries (see presence.py / messages.py)
        self.presence: Element | None = None  # last available presence broadcast
        self.priority = 0
        self.interested = False  # asked for its roster: gets roster pushes (RFC 6121 §2.2)
        self.carbons = False
        self.directed: set[str] = set()  # full/bare JIDs sent directed presence (RFC 6121 §4.6)
        self.started = time.monotonic()

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
            raise StreamError("host-unknown", "this server serves " + self.core.config.domain) from None
        if domain != self.core.config.domain:
            raise StreamError("host-unknown", "this server serves " + self.core.config.domain)
        self.stream_id = secrets.token_urlsafe(12)
        if self.state == "new":
            self.state = "auth"
            self.core.metrics.session_opened(self.transport.kind)
        elif self.state == "restart":
            self.state = "bind"
        return self.features()

    def restart(self) -> Element:
        """A stream restart (after SASL success); returns the new features."""
        if self.state != "restart":
            raise StreamError("not-authorized", "stream restart before authentication")
        return self.open_stream(self.core.config.domain)

    def features(self) -> Element:
        feats = E(f"{{{NS_STREAM}}}features")
        if self.state == "auth":
            mechs = E(f"{{{NS_SASL}}}mechanisms")
            for name in self.mechanisms():
                mechs.append(E(f"{{{NS_SASL}}}mechanism", text=name))
            feats.append(mechs)
        elif self.state == "bind":
            feats.append(E(f"{{{NS_BIND}}}bind"))
            feats.append(E(f"{{{NS_ROSTERVER}}}ver"))
        return feats

    def mechanisms(self) -> list[str]:
        secure = self.peer.secure or self.peer.is_loopback
        return sasl.mechanisms_for(self.core.authenticator, secure, self.core.config.allow_plain_insecure)

    def feed(self, el: Element) -> None:
        """Process one top-level element from the client."""
        if self.state == "ended":
            return
        try:
            if self.state == "active":
                if el.tag in STANZA_TAGS:
                    self.core.router.route(self, el)
                else:
                    raise StreamError("unsupported-stanza-type", f"unexpected element {el.tag}")
            elif self.state == "auth":
                self._sasl_step(el)
            elif self.state == "bind":
                self._pre_bind(el)
            elif self.state == "restart":
                raise StreamError("not-authorized", "restart the stream after SASL success")
            else:
                raise StreamError("not-authorized", "stream not open")
        except StreamError as err:
            self.fail(err.condition, err.text)

    def fail(self, condition: str, text: str | None = None) -> None:
        """Close the stream with a stream error (RFC 6120 §4.9)."""
        if self.state == "ended":
            return
        log.info("stream error %s for %s from %s: %s", condition, self.jid_str or "(unauthenticated)", self.peer.ip, text or "")
        self.transport.stream_error(stream_error_element(condition, text))
        self.end(f"stream error {condition}")

    def end(self, reason: str) -> None:
        """The stream is over (logout, timeout, socket drop, error): clean up once."""
        if self.state == "ended":
            return
        was_bound = self.jid is not None
        was_counted = self.state != "new"  # session_opened runs at the first <open/> only
        self.state = "ended"
        if was_counted:
            self.core.metrics.session_closed(self.transport.kind)
        if was_bound:
            self.core.session_unbound(self)
            log.info("session end %s (%s, %s): %s", self.jid_str, self.transport.kind, self.peer.ip, reason)

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
        if delivered is None:
            self.transport.send(el)
        elif getattr(self.transport, "tracks_delivery", False):
            self.transport.send(el, delivered)
        else:
            self.transport.send(el)
            delivered(True)

    @property
    def congested(self) -> bool:
        """The transport's output is full: stanzas from other users should be bounced
        to their sender (``resource-constraint``) instead of queued (issue 10.5)."""
        return getattr(self.transport, "congested", False)

    # -- SASL (RFC 6120 §6) ------------------------------------------------

    def _sasl_step(self, el: Element) -> None:
        tag = el.tag
        if tag == f"{{{NS_SASL}}}auth":
            self._sasl = None
            throttle = self.core.auth_throttle
            if throttle.blocked(self.peer.ip):
                log.warning("auth throttled for %s", self.peer.ip)
                return self._sasl_failure("temporary-auth-failure", "too many failed logins, try again later")
            try:
                self._sasl = sasl.SaslExchange(
                    el.get("mechanism", ""), self.core.authenticator, self.core.config.domain, self.mechanisms()
                )
            except sasl.SaslFailure as failure:
                return self._sasl_failure(failure.condition)
        elif tag == f"{{{NS_SASL}}}response":
            if self._sasl is None:
                return self._sasl_failure("malformed-request", "no SASL exchange in progress")
        elif tag == f"{{{NS_SASL}}}abort":
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
        except sasl.SaslFailure as failure:
            mechanism = self._sasl.mechanism if self._sasl else "?"
            self._sasl = None
            if failure.condition == "not-authorized":  # a backend outage is nobody's failed login
                self.core.auth_throttle.failed(self.peer.ip)
            self.core.metrics.login_failed()
            log.warning("login failed from %s (%s, %s): %s", self.peer.ip, mechanism, self.transport.kind, failure.condition)
            return self._sasl_failure(failure.condition)
        encoded = base64.b64encode(payload).decode("ascii") if payload else None
        if kind == "challenge":
            self.send(E(f"{{{NS_SASL}}}challenge", text=encoded or "="))
            return
        self.username = self._sasl.username
        self._sasl = None
        self.state = "restart"
        self.core.metrics.login_ok()
        log.info("login %s from %s (%s)", self.username, self.peer.ip, self.transport.kind)
        self.send(E(f"{{{NS_SASL}}}success", text=encoded))

    def _sasl_failure(self, condition: str, text: str | None = None) -> None:
        failure = E(f"{{{NS_SASL}}}failure", None, E(f"{{{NS_SASL}}}{condition}"))
        if text:
            failure.append(E(f"{{{NS_SASL}}}text", text=text))
        self.send(failure)

    # -- resource binding (RFC 6120 §7) -----------------------------------

    def _pre_bind(self, el: Element) -> None:
        if el.tag != _IQ:
            raise StreamError("not-authorized", "bind a resource first")
        iq_type = el.get("type")
        if iq_type not in ("get", "set"):
            return  # results/errors before bind: nothing to answer
        payload = el.find(f"{{{NS_BIND}}}bind")
        session = el.find(f"{{{NS_SESSION}}}session")
        if iq_type == "set" and payload is not None:
            return self._bind(el, payload)
        if iq_type == "set" and session is not None:
            return self.send(E(_IQ, {"type": "result", "id": el.get("id")}))
        reply = E(_IQ, {"type": "error", "id": el.get("id")})
        reply.append(error_element("not-authorized", "auth", "bind a resource first"))
        self.send(reply)

    def _bind(self, iq: Element, payload: Element) -> None:
        requested = payload.findtext(f"{{{NS_BIND}}}resource")
        try:
            resource = prep_resource(requested.strip()) if requested and requested.strip() else None
        except JIDError:
            return self._reply_error(iq, StanzaError("bad-request", "modify", "invalid resource"))
        try:
            self.core.bind(self, resource)
        except StanzaError as err:
            return self._reply_error(iq, err)
        self.state = "active"
        result = E(
            _IQ,
            {"type": "result", "id": iq.get("id")},
            E(f"{{{NS_BIND}}}bind", None, E(f"{{{NS_BIND}}}jid", text=self.jid_str)),
        )
        self.send(result)
        log.info("bound %s (%s, %s)", self.jid_str, self.transport.kind, self.peer.ip)

    def _reply_error(self, iq: Element, err: StanzaError) -> None:
        reply = E(_IQ, {"type": "error", "id": iq.get("id")})
        reply.append(error_element(err.condition, err.error_type, err.text))
        self.send(reply)
