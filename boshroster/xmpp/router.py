"""Where a client's stanza goes: validate, stamp ``from``, name the event, fire it.

RFC 6120 §8.1.2.1: the server stamps ``from`` with the sender's full JID on
everything a client sends; a client-supplied ``from`` is never trusted.

The router decides nothing about IM: it only names events (Prosody's
``core/stanza_router.lua``), and features hook them (event bus: events.py).
``to_type`` is ``self`` (no ``to``; for IQs also the sender's own bare JID),
``bare``, ``full`` or ``host`` (our domain):

  ``pre-message/<to_type>``, then ``message/<to_type>``
      (a message without ``to`` is addressed to the sender's bare JID, RFC 6120
      §10.3.1, so it is ``message/bare``; there is no ``message/self``)
  ``pre-presence/<to_type>``, then ``presence/<to_type>``
  ``pre-iq/<to_type>``, then for get/set to ``self``/``bare``/``host``:
      ``iq-get/<to_type>/<namespace>:<payload name>`` (and ``iq-set/…``);
      an IQ without ``to`` that no ``self`` handler answers is tried as ``host``
      (RFC 6120 §10.3.3: the server answers on the account's behalf);
      results/errors to the server are swallowed; IQs to a full JID are
      delivered to that resource (``iq/full`` may take over).

A handler returns ``None`` (not mine), or anything else (handled).  An IQ
handler returns the payload of the result (an Element), ``RESULT`` (an empty
result) or ``HANDLED`` (it answered, or will).  Every handler may raise
StanzaError: this module turns it into the error reply, in one place, as it
turns an unexpected exception into ``internal-server-error`` (a bug costs one
stanza, never the session).  Unhandled message → ``service-unavailable``;
unhandled IQ get/set → ``service-unavailable`` (RFC 6120 §8.4); unhandled
presence → dropped.

Greenlet safety: the router holds no state of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from boshroster.xmpp.errors import StanzaError, error_reply
from boshroster.xmpp.events import EventBus
from boshroster.xmpp.jid import JID, JIDError
from boshroster.xmpp.tags import IQ, MESSAGE, PRESENCE
from boshroster.xmpp.xmlio import E, Element

if TYPE_CHECKING:
    from boshroster.xmpp.sessions import SessionManager
    from boshroster.xmpp.stream import ClientSession

log = logging.getLogger("boshroster.router")

_KINDS = {MESSAGE: "message", PRESENCE: "presence", IQ: "iq"}
_IQ_TYPES = ("get", "set", "result", "error")


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


RESULT = _Marker("RESULT")  # an IQ handler's answer: an empty result
HANDLED = _Marker("HANDLED")  # an IQ handler's answer: it replied itself


@dataclass(slots=True)
class StanzaEvent:
    """What stanza handlers receive: who sent it, the stanza (``from`` already
    stamped), and its prepared destination (None: no ``to``).  ``archived``: what the
    archive's ``message-accepted`` hook stored for this message (mam.py), read back by
    ``message-bounced``, which fires with the same event in the same ``deliver`` call."""

    origin: "ClientSession"
    stanza: Element
    to: JID | None
    archived: object = None


def iq_result(iq: Element, payload: Element | None = None) -> Element:
    reply = E(IQ, {"type": "result", "id": iq.get("id"), "to": iq.get("from"), "from": iq.get("to")})
    if payload is not None:
        reply.append(payload)
    return reply


class Router:
    def __init__(self, bus: EventBus, sessions: "SessionManager", domain: str, counters):
        self.bus = bus
        self.sessions = sessions
        self.domain = domain
        self.counters = counters

    def route(self, origin: "ClientSession", stanza: Element) -> None:
        """Process one stanza sent by a bound client."""
        self.counters.stanza_routed()
        stanza.set("from", origin.jid_str)
        kind = _KINDS[stanza.tag]
        to_attr = stanza.get("to")
        try:
            to = JID.parse(to_attr) if to_attr else None
        except JIDError:
            if kind != "presence" and stanza.get("type") != "error":
                self.bounce(origin, stanza, StanzaError("jid-malformed", "modify", f"malformed JID: {to_attr!r}"))
            return
        try:
            self._dispatch(origin, stanza, kind, to)
        except StanzaError as err:
            if stanza.get("type") not in ("error", "result"):
                self.bounce(origin, stanza, err)
        except Exception:  # a bug must cost one stanza, not the session
            log.exception("error routing %s from %s", kind, origin.jid_str)
            if stanza.get("type") not in ("error", "result"):
                self.bounce(origin, stanza, StanzaError("internal-server-error"))

    def _dispatch(self, origin: "ClientSession", stanza: Element, kind: str, to: JID | None) -> None:
        stype = stanza.get("type")
        if kind == "iq":
            if stype not in _IQ_TYPES or not stanza.get("id"):
                raise StanzaError("bad-request", "modify", "IQ needs an id and a valid type")
            if stype in ("get", "set") and len(stanza) != 1:
                raise StanzaError("bad-request", "modify", "IQ get/set needs exactly one child")
        if to is None and kind == "message":
            to = origin.jid.bare  # RFC 6120 §10.3.1
        if to is not None and to.domain != self.domain:
            if kind == "presence":
                return  # no server-to-server; presence errors are never bounced
            raise StanzaError("remote-server-not-found", text="this server does not federate")
        to_type = self._to_type(origin, to, kind)
        event = StanzaEvent(origin, stanza, to)
        if self.bus.fire(f"pre-{kind}/{to_type}", event) is not None:
            return
        if kind == "iq":
            return self._iq(event, stype, to_type)
        if self.bus.fire(f"{kind}/{to_type}", event) is None and kind == "message":
            if stype not in ("error", "headline", "groupchat"):
                raise StanzaError("service-unavailable")

    @staticmethod
    def _to_type(origin: "ClientSession", to: JID | None, kind: str) -> str:
        if to is None:
            return "self"
        if to.local is None:
            return "host"
        if to.resource is not None:
            return "full"
        if kind == "iq" and to.local == origin.username:
            return "self"
        return "bare"

    def _iq(self, event: StanzaEvent, stype: str, to_type: str) -> None:
        iq = event.stanza
        if to_type == "full":
            if self.bus.fire("iq/full", event) is not None:
                return
            target = self.sessions.get(event.to.local, event.to.resource)
            if target is None:
                raise StanzaError("service-unavailable")  # RFC 6121 §8.5.3.2.3 (and §8.5.1)
            target.send(iq)
            return
        if stype in ("result", "error"):
            return  # e.g. a client acknowledging a roster push
        payload = iq[0]
        suffix = payload.tag[1:].replace("}", ":", 1) if payload.tag.startswith("{") else payload.tag
        answer = self.bus.fire(f"iq-{stype}/{to_type}/{suffix}", event)
        if answer is None and to_type == "self" and event.to is None:
            answer = self.bus.fire(f"iq-{stype}/host/{suffix}", event)
        if answer is None:
            raise StanzaError("service-unavailable")
        if answer is HANDLED:
            return
        event.origin.send(iq_result(iq, None if answer is RESULT else answer))

    @staticmethod
    def bounce(origin: "ClientSession", stanza: Element, err: StanzaError) -> None:
        """Answer ``stanza`` with ``err``, to its sender."""
        reply = error_reply(stanza, err)
        reply.set("to", origin.jid_str)
        origin.send(reply)
