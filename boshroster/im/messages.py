"""Messages (RFC 6121 §8.5) between local users, carbons (XEP-0280), offline storage.

Each branch cites the RFC 6121 rule it implements.  Messages for a user
with no available resource are stored durably (offline.py) and delivered at
that user's next initial presence, so nothing is lost across a restart.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from boshroster.xmpp.errors import StanzaError
from boshroster.xmpp.jid import JID
from boshroster.xmpp.xmlio import E, Element, NS_CARBONS, NS_CLIENT, NS_FORWARD, NS_HINTS

if TYPE_CHECKING:
    from boshroster.wiring import Core
    from boshroster.xmpp.stream import ClientSession

log = logging.getLogger("boshroster.messages")

_MESSAGE = f"{{{NS_CLIENT}}}message"
_BODY = f"{{{NS_CLIENT}}}body"


def _carbon_eligible(stanza: Element) -> bool:
    """XEP-0280 §6.1: chat messages, and normal messages with a body; not private/no-copy."""
    mtype = stanza.get("type", "normal")
    if mtype not in ("chat", "normal"):
        return False
    if mtype == "normal" and stanza.find(_BODY) is None:
        return False
    if stanza.find(f"{{{NS_CARBONS}}}private") is not None or stanza.find(f"{{{NS_HINTS}}}no-copy") is not None:
        return False
    return True


class MessageHandler:
    def __init__(self, core: "Core"):
        self.core = core

    def outbound(self, origin: "ClientSession", stanza: Element, to: JID | None) -> None:
        domain = self.core.config.domain
        if to is None:
            # RFC 6120 §10.3.1: no 'to' means the sender's own bare JID.
            to = origin.jid.bare
        if to.domain != domain:
            raise StanzaError("remote-server-not-found", text="this server does not federate")
        if to.local is None:
            if stanza.get("type") in ("error", "headline"):
                return
            raise StanzaError("service-unavailable", text="the server does not accept messages")
        if _carbon_eligible(stanza):
            self._carbon_copies(origin, stanza, "sent", exclude=origin)
        self.deliver(stanza, to, sender=origin)

    def deliver(self, stanza: Element, to: JID, sender: "ClientSession | None" = None) -> None:
        mtype = stanza.get("type", "normal")
        username = to.local
        if not self.core.user_exists(username):
            # RFC 6121 §8.5.1: no such user.
            if mtype in ("error", "headline", "groupchat"):
                return
            raise StanzaError("service-unavailable", text="no such user")
        if to.resource is not None:
            target = self.core.registry.get(username, to.resource)
            if target is not None:
                # §8.5.3.1: a full JID that is online gets it, whatever the type.
                target.send(stanza)
                if _carbon_eligible(stanza):
                    self._carbon_copies(target, stanza, "received", exclude=target)
                return
            # §8.5.3.2.1: an offline full JID: chat/normal are treated as bare.
            if mtype in ("groupchat",):
                raise StanzaError("service-unavailable")
            if mtype in ("headline", "error"):
                return
        self._deliver_bare(stanza, username, mtype)

    def _deliver_bare(self, stanza: Element, username: str, mtype: str) -> None:
        available = [s for s in self.core.registry.sessions_of(username) if s.presence is not None and s.priority >= 0]
        if mtype == "groupchat":
            raise StanzaError("service-unavailable")  # §8.5.2.1.2
        if mtype == "headline":
            for session in available:  # §8.5.2.1.2: all non-negative resources, or drop
                session.send(stanza)
            return
        if not available:
            # §8.5.2.2: no available resource -> offline storage (chat/normal), errors dropped.
            if mtype == "error":
                return
            if not self.core.offline.store(username, stanza):
                raise StanzaError("service-unavailable", "cancel", "offline storage full")
            return
        if mtype == "error":
            best = max(s.priority for s in available)
            next(s for s in available if s.priority == best).send(stanza)
            return
        # §8.5.2.1.1: chat/normal to the highest-priority non-negative resource(s).
        best = max(s.priority for s in available)
        receivers = [s for s in available if s.priority == best]
        for session in receivers:
            session.send(stanza)
        if _carbon_eligible(stanza):
            for session in self.core.registry.sessions_of(username):
                if session.carbons and session not in receivers:
                    session.send(self._wrap(stanza, "received", session))

    def requeue(self, session: "ClientSession", stanzas: list[Element]) -> None:
        """Messages queued for a session that died undelivered go back through routing
        (other resources, or offline storage) instead of being lost."""
        if session.username is None:
            return
        bare = JID.make(session.username, self.core.config.domain)
        for stanza in stanzas:
            if stanza.tag != _MESSAGE or stanza.get("type", "normal") not in ("chat", "normal"):
                continue
            if stanza.find(_BODY) is None:
                continue  # carbons wrappers, chat states, receipts: not worth keeping
            copy_ = E(_MESSAGE, dict(stanza.attrib), *list(stanza))
            copy_.set("to", str(bare))
            try:
                self._deliver_bare(copy_, bare.local, copy_.get("type", "normal"))
            except StanzaError:
                log.warning("could not requeue a message for %s", bare)

    def _carbon_copies(self, owner: "ClientSession", stanza: Element, kind: str, exclude: "ClientSession") -> None:
        for session in self.core.registry.sessions_of(owner.username):
            if session is not exclude and session.carbons:
                session.send(self._wrap(stanza, kind, session))

    def _wrap(self, stanza: Element, kind: str, session: "ClientSession") -> Element:
        """XEP-0280 §7/§8: <message><sent|received><forwarded><message/>…"""
        bare = f"{session.username}@{self.core.config.domain}"
        return E(
            _MESSAGE,
            {"from": bare, "to": session.jid_str, "type": stanza.get("type", "normal")},
            E(f"{{{NS_CARBONS}}}{kind}", None, E(f"{{{NS_FORWARD}}}forwarded", None, stanza)),
        )
