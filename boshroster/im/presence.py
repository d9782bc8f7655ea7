"""Presence (RFC 6121 §4): broadcast, probes, directed presence, unavailable on exit.

The backend app owns rosters and every item is subscription="both"
(mod_http_roster_admin), so the rule is simple and stated once:

    X's presence goes to Y  <=>  Y is in X's roster          (``shares_with``)

Broadcasts use the sender's roster (RFC 6121 §4.2.2); a probe is answered
with the probed user's presence only if the prober is in *their* roster
(§4.3.2, as Prosody checks it).  Subscription requests are dropped, as
mod_block_subscriptions does: the backend alone decides who sees whom.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

from boshroster.xmpp.jid import JID
from boshroster.xmpp.xmlio import E, Element, NS_CLIENT

if TYPE_CHECKING:
    from boshroster.wiring import Core
    from boshroster.xmpp.stream import ClientSession

log = logging.getLogger("boshroster.presence")

_PRESENCE = f"{{{NS_CLIENT}}}presence"
SUBSCRIPTION_TYPES = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed"})


def _priority(stanza: Element) -> int:
    text = stanza.findtext(f"{{{NS_CLIENT}}}priority")
    try:
        return max(-128, min(127, int(text))) if text is not None else 0
    except ValueError:
        return 0


def addressed(stanza: Element, to: str) -> Element:
    """A shallow copy with another ``to`` (children are shared, never mutated)."""
    out = copy.copy(stanza)
    out.attrib = dict(stanza.attrib)
    out.set("to", to)
    return out


class PresenceHandler:
    def __init__(self, core: "Core"):
        self.core = core

    # -- from a client -----------------------------------------------------

    def outbound(self, origin: "ClientSession", stanza: Element, to: JID | None) -> None:
        ptype = stanza.get("type")
        if ptype in SUBSCRIPTION_TYPES:
            log.debug("dropped %s presence from %s to %s (rosters belong to the backend)", ptype, origin.jid_str, to)
            return
        if to is None:
            if ptype is None:
                self.available(origin, stanza)
            elif ptype == "unavailable":
                self.unavailable(origin, stanza)
            return  # probe/error without 'to': nothing to do
        if to.domain != self.core.config.domain or to.local is None:
            return  # no server-to-server; presence errors are never bounced
        if ptype == "probe":
            self._answer_probe(origin, to.local)
        elif ptype in (None, "unavailable", "error"):
            self._directed(origin, stanza, to, ptype)

    def available(self, origin: "ClientSession", stanza: Element) -> None:
        """Initial or updated available presence (RFC 6121 §4.2, §4.4)."""
        initial = origin.presence is None
        origin.presence = stanza
        origin.priority = _priority(stanza)
        username = origin.username
        self._broadcast(origin, stanza)
        if not initial:
            return
        # §4.2.2: the new resource learns its own other resources' presence ...
        for other in self.core.registry.sessions_of(username):
            if other is not origin and other.presence is not None:
                origin.send(addressed(other.presence, origin.jid_str))
        # ... and §4.3.1: probes to contacts, answered where they share with us.
        for contact in self.core.roster.contacts(username):
            if self._is_local(contact):
                self._send_presence_of(contact.partition("@")[0], origin)
        self.core.offline.deliver(origin)

    def unavailable(self, origin: "ClientSession", stanza: Element | None = None) -> None:
        """Unavailable presence (RFC 6121 §4.5), sent by the client or on its behalf."""
        if origin.presence is None and not origin.directed:
            return
        if stanza is None:
            stanza = E(_PRESENCE, {"type": "unavailable", "from": origin.jid_str})
        was_available = origin.presence is not None
        origin.presence = None
        if was_available:
            self._broadcast(origin, stanza, include_self=False)
        for target in origin.directed:
            self._deliver_to(JID.parse(target), addressed(stanza, target))
        origin.directed.clear()

    def contact_added(self, username: str, contact: str) -> None:
        """After a roster push adding ``contact``: presence both ways (what the reference forgot)."""
        if not self._is_local(contact):
            return
        contact_user = contact.partition("@")[0]
        for session in self.core.registry.sessions_of(username):
            # RFC 6121 §4.2.2/§4.3: a resource without initial presence neither
            # broadcasts nor gets probe answers; its initial presence will probe.
            if session.presence is not None:
                self._deliver_to_user(contact_user, addressed(session.presence, contact), only_available=True)
                self._send_presence_of(contact_user, session)

    def contact_removed(self, username: str, contact: str) -> None:
        """After a roster push removing ``contact``: unavailable both ways."""
        if not self._is_local(contact):
            return
        contact_user = contact.partition("@")[0]
        for session in self.core.registry.sessions_of(username):
            if session.presence is not None:
                gone = E(_PRESENCE, {"type": "unavailable", "from": session.jid_str, "to": contact})
                self._deliver_to_user(contact_user, gone, only_available=True)
        for other in self.core.registry.sessions_of(contact_user):
            if other.presence is not None:
                for session in self.core.registry.sessions_of(username):
                    if session.presence is not None:  # never saw the contact's presence otherwise
                        session.send(E(_PRESENCE, {"type": "unavailable", "from": other.jid_str, "to": session.jid_str}))

    # -- helpers -------------------------------------------------------------

    def _is_local(self, bare: str) -> bool:
        local, _, domain = bare.partition("@")
        return bool(_) and domain == self.core.config.domain

    def _broadcast(self, origin: "ClientSession", stanza: Element, include_self: bool = True) -> None:
        username = origin.username
        for contact in self.core.roster.contacts(username):
            if self._is_local(contact):
                self._deliver_to_user(contact.partition("@")[0], addressed(stanza, contact), only_available=True)
        own = f"{username}@{self.core.config.domain}"
        for session in self.core.registry.sessions_of(username):
            if session.presence is not None and (include_self or session is not origin):
                session.send(addressed(stanza, own))

    def _send_presence_of(self, owner: str, viewer: "ClientSession") -> None:
        """Send ``owner``'s available resources' presence to ``viewer`` if owner shares with them."""
        sessions = [s for s in self.core.registry.sessions_of(owner) if s.presence is not None]
        if not sessions or not self.core.roster.shares_with(owner, f"{viewer.username}@{self.core.config.domain}"):
            return
        for session in sessions:
            viewer.send(addressed(session.presence, viewer.jid_str))

    def _answer_probe(self, origin: "ClientSession", owner: str) -> None:
        self._send_presence_of(owner, origin)

    def _directed(self, origin: "ClientSession", stanza: Element, to: JID, ptype: str | None) -> None:
        """Directed presence (RFC 6121 §4.6): delivered as sent, remembered for unavailable."""
        delivered = self._deliver_to(to, stanza)
        if ptype is None and delivered:
            origin.directed.add(str(to))
        elif ptype == "unavailable":
            origin.directed.discard(str(to))

    def _deliver_to(self, to: JID, stanza: Element) -> bool:
        if to.local is None:
            return False
        if to.resource is not None:
            target = self.core.registry.get(to.local, to.resource)
            if target is None:
                return False  # §8.5.3.2.2: presence to an offline full JID is dropped
            target.send(stanza)
            return True
        return self._deliver_to_user(to.local, stanza, only_available=True)

    def _deliver_to_user(self, username: str, stanza: Element, only_available: bool) -> bool:
        sent = False
        for session in self.core.registry.sessions_of(username):
            if session.presence is not None or not only_available:
                session.send(stanza)
                sent = True
        return sent
