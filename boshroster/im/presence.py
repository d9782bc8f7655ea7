"""Presence (RFC 6121 §4): broadcast, probes, directed presence, unavailable on exit.

The backend app owns rosters and every item is subscription="both"
(mod_http_roster_admin), so the rule is simple and stated once:

    X's presence goes to Y  <=>  Y is in X's roster          (``shares_with``)

Broadcasts use the sender's roster (RFC 6121 §4.2.2); a probe is answered
with the probed user's presence only if the prober is in *their* roster
(§4.3.2, as Prosody checks it).  Subscription requests never get here: the
roster delegation module drops them at ``pre-presence/*``.

Presence never waits for the backend: ``contacts`` answers from
the roster cache at once; a roster that is not known yet counts as empty, and
the roster module fires ``roster-item-added`` for every contact once it is
loaded, which exchanges presence then.

Hooks: ``presence/self`` (no ``to``: broadcast), ``presence/bare`` and
``presence/full`` (directed presence, probes), ``presence/host`` (dropped),
``resource-unbind`` (unavailable on the client's behalf, §4.5),
``roster-item-added``/``roster-item-removed``.  Fires ``presence-initial``
(session) after a session's initial presence (offline delivery hooks it).

Shared state: each session's IM fields (``presence``, ``priority``,
``directed``), written here from the greenlet of the stanza or event that
changes them, without yielding; other users' deliveries only read them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Protocol

from boshroster.xmpp.events import EventBus
from boshroster.xmpp.jid import JID, local_user
from boshroster.xmpp.router import StanzaEvent
from boshroster.xmpp.tags import PRESENCE, PRIORITY
from boshroster.xmpp.xmlio import E, Element, shallow_copy

if TYPE_CHECKING:
    from boshroster.xmpp.sessions import SessionManager
    from boshroster.xmpp.stream import ClientSession

log = logging.getLogger("boshroster.presence")

SUBSCRIPTION_TYPES = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed"})


class Contacts(Protocol):
    """Who is in a user's roster, answered without waiting (roster/delegation.py)."""

    def contacts(self, username: str) -> Iterable[str]: ...

    def shares_with(self, owner: str, viewer_bare: str) -> bool: ...


@dataclass(slots=True)
class RosterChange:
    """``roster-item-added`` / ``roster-item-removed``: ``contact`` (a bare JID) in ``username``'s roster."""

    username: str
    contact: str


def _priority(stanza: Element) -> int:
    text = stanza.findtext(PRIORITY)
    try:
        return max(-128, min(127, int(text))) if text is not None else 0
    except ValueError:
        return 0


def addressed(stanza: Element, to: str) -> Element:
    """A shallow copy with another ``to`` (children are shared, never mutated)."""
    return shallow_copy(stanza, to)


class PresenceHandler:
    def __init__(self, sessions: "SessionManager", contacts: Contacts, domain: str, bus: EventBus):
        self.sessions = sessions
        # In a cluster ``sessions`` is cluster/view.py's ClusterSessions; roster changes are
        # applied by every node to its own sessions, so those loops use the local ones.
        self.local = getattr(sessions, "local", sessions)
        self.roster = contacts
        self.domain = domain
        self.bus = bus

    def register(self, bus: EventBus) -> None:
        bus.hook("presence/self", self._on_broadcast)
        bus.hook("presence/bare", self._on_directed)
        bus.hook("presence/full", self._on_directed)
        bus.hook("presence/host", lambda event: True)  # nothing at the domain takes presence
        bus.hook("resource-unbind", self.unavailable, priority=100)
        bus.hook("roster-item-added", lambda change: self.contact_added(change.username, change.contact))
        bus.hook("roster-item-removed", lambda change: self.contact_removed(change.username, change.contact))

    # -- from a client -----------------------------------------------------

    def _on_broadcast(self, event: StanzaEvent) -> bool:
        ptype = event.stanza.get("type")
        if ptype is None:
            self.available(event.origin, event.stanza)
        elif ptype == "unavailable":
            self.unavailable(event.origin, event.stanza)
        return True  # probe/error without 'to': nothing to do

    def _on_directed(self, event: StanzaEvent) -> bool:
        ptype = event.stanza.get("type")
        if ptype == "probe":
            self._send_presence_of(event.to.local, event.origin)
        elif ptype in (None, "unavailable", "error"):
            self._directed(event.origin, event.stanza, event.to, ptype)
        return True

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
        for other in self.sessions.sessions_of(username):
            if other is not origin and other.presence is not None:
                origin.send(addressed(other.presence, origin.jid_str))
        # ... and §4.3.1: probes to contacts, answered where they share with us.
        for contact in self.roster.contacts(username):
            contact_user = local_user(contact, self.domain)
            if contact_user is not None:
                self._send_presence_of(contact_user, origin)
        self.bus.fire("presence-initial", origin)

    def unavailable(self, origin: "ClientSession", stanza: Element | None = None) -> None:
        """Unavailable presence (RFC 6121 §4.5), sent by the client or on its behalf."""
        if origin.presence is None and not origin.directed:
            return
        if stanza is None:
            stanza = E(PRESENCE, {"type": "unavailable", "from": origin.jid_str})
        was_available = origin.presence is not None
        origin.presence = None
        if was_available:
            self._broadcast(origin, stanza, include_self=False)
        for target in origin.directed:
            self._deliver_to(JID.parse(target), addressed(stanza, target))
        origin.directed.clear()

    def contact_added(self, username: str, contact: str) -> None:
        """After a roster push adding ``contact``: presence both ways (what the reference forgot)."""
        contact_user = local_user(contact, self.domain)
        if contact_user is None:
            return
        for session in self.local.sessions_of(username):
            # RFC 6121 §4.2.2/§4.3: a resource without initial presence neither
            # broadcasts nor gets probe answers; its initial presence will probe.
            if session.presence is not None:
                self._deliver_to_user(contact_user, addressed(session.presence, contact))
                self._send_presence_of(contact_user, session)

    def contact_removed(self, username: str, contact: str) -> None:
        """After a roster push removing ``contact``: unavailable both ways."""
        contact_user = local_user(contact, self.domain)
        if contact_user is None:
            return
        for session in self.local.sessions_of(username):
            if session.presence is not None:
                gone = E(PRESENCE, {"type": "unavailable", "from": session.jid_str, "to": contact})
                self._deliver_to_user(contact_user, gone)
        for other in self.sessions.sessions_of(contact_user):
            if other.presence is not None:
                for session in self.local.sessions_of(username):
                    if session.presence is not None:  # never saw the contact's presence otherwise
                        session.send(E(PRESENCE, {"type": "unavailable", "from": other.jid_str, "to": session.jid_str}))

    # -- helpers -------------------------------------------------------------

    def _broadcast(self, origin: "ClientSession", stanza: Element, include_self: bool = True) -> None:
        username = origin.username
        for contact in self.roster.contacts(username):
            contact_user = local_user(contact, self.domain)
            if contact_user is not None:
                self._deliver_to_user(contact_user, addressed(stanza, contact))
        own = f"{username}@{self.domain}"
        for session in self.sessions.sessions_of(username):
            if session.presence is not None and (include_self or session is not origin):
                session.send(addressed(stanza, own))

    def _send_presence_of(self, owner: str, viewer: "ClientSession") -> None:
        """Send ``owner``'s available resources' presence to ``viewer`` if owner shares with them."""
        sessions = [s for s in self.sessions.sessions_of(owner) if s.presence is not None]
        if not sessions or not self.roster.shares_with(owner, f"{viewer.username}@{self.domain}"):
            return
        for session in sessions:
            viewer.send(addressed(session.presence, viewer.jid_str))

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
            target = self.sessions.get(to.local, to.resource)
            if target is None:
                return False  # §8.5.3.2.2: presence to an offline full JID is dropped
            target.send(stanza)
            return True
        return self._deliver_to_user(to.local, stanza)

    def _deliver_to_user(self, username: str, stanza: Element) -> bool:
        """To every available resource of ``username`` (§8.5.2.1.2 for presence)."""
        sent = False
        for session in self.sessions.sessions_of(username):
            if session.presence is not None:
                session.send(stanza)
                sent = True
        return sent
