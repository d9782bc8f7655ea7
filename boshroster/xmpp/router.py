"""Where a client's stanza goes: validate, stamp ``from``, hand to presence/message/IQ.

RFC 6120 §8.1.2.1: the server stamps ``from`` with the sender's full JID on
everything a client sends; a client-supplied ``from`` is never trusted.
RFC 6120 §10: addressing rules.  Handlers raise StanzaError and this module
turns it into the error reply, in one place.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from boshroster.xmpp.errors import StanzaError, error_reply
from boshroster.xmpp.jid import JID, JIDError
from boshroster.xmpp.xmlio import Element, NS_CLIENT

if TYPE_CHECKING:
    from boshroster.wiring import Core
    from boshroster.xmpp.stream import ClientSession

log = logging.getLogger("boshroster.router")

_MESSAGE = f"{{{NS_CLIENT}}}message"
_PRESENCE = f"{{{NS_CLIENT}}}presence"
_IQ = f"{{{NS_CLIENT}}}iq"
_IQ_TYPES = ("get", "set", "result", "error")


class Router:
    def __init__(self, core: "Core"):
        self.core = core

    def route(self, origin: "ClientSession", stanza: Element) -> None:
        """Process one stanza sent by a bound client."""
        self.core.metrics.stanza_routed()
        stanza.set("from", origin.jid_str)
        kind = stanza.tag
        to_attr = stanza.get("to")
        try:
            to = JID.parse(to_attr) if to_attr else None
        except JIDError:
            if kind != _PRESENCE and stanza.get("type") != "error":
                self._bounce(origin, stanza, StanzaError("jid-malformed", "modify", f"malformed JID: {to_attr!r}"))
            return
        try:
            if kind == _MESSAGE:
                self.core.messages.outbound(origin, stanza, to)
            elif kind == _PRESENCE:
                self.core.presence.outbound(origin, stanza, to)
            else:
                self._iq(origin, stanza, to)
        except StanzaError as err:
            if stanza.get("type") not in ("error", "result"):
                self._bounce(origin, stanza, err)
        except Exception:  # a bug must cost one stanza, not the session
            log.exception("error routing %s from %s", kind, origin.jid_str)
            if stanza.get("type") not in ("error", "result"):
                self._bounce(origin, stanza, StanzaError("internal-server-error"))

    def _iq(self, origin: "ClientSession", iq: Element, to: JID | None) -> None:
        iq_type = iq.get("type")
        if iq_type not in _IQ_TYPES or not iq.get("id"):
            raise StanzaError("bad-request", "modify", "IQ needs an id and a valid type")
        if iq_type in ("get", "set") and len(iq) != 1:
            raise StanzaError("bad-request", "modify", "IQ get/set needs exactly one child")
        domain = self.core.config.domain
        if to is None or (to.local is None and to.domain == domain and to.resource is None):
            return self.core.iq.handle(origin, iq, to, for_server=True)
        if to.domain != domain or to.local is None:
            raise StanzaError("remote-server-not-found" if to.domain != domain else "service-unavailable")
        if to.resource is None:
            # RFC 6121 §8.5.2.1.3 / §8.5.1: IQ to a bare JID is answered by the server.
            return self.core.iq.handle(origin, iq, to, for_server=False)
        target = self.core.registry.get(to.local, to.resource)
        if target is None:
            # RFC 6121 §8.5.3.2.3 (and §8.5.1 for unknown users)
            raise StanzaError("service-unavailable")
        target.send(iq)

    def _bounce(self, origin: "ClientSession", stanza: Element, err: StanzaError) -> None:
        reply = error_reply(stanza, err)
        reply.set("to", origin.jid_str)
        origin.send(reply)
