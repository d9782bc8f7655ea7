"""Messages (RFC 6121 §8.5) between local users, carbons (XEP-0280), offline storage.

Each branch cites the RFC 6121 rule it implements.  Messages for a user
with no available resource go to the mailbox (offline.py: stored durably,
delivered at that user's next initial presence), so nothing is lost across
a restart.

Hooks ``message/bare``, ``message/full``, ``message/host`` and
``stanzas-undelivered`` (a transport gives back what its dead session never
got: it is routed again).  Fires ``message-accepted`` (a StanzaEvent) for a
``chat``/``normal`` message with a body to an existing local user, before it
is delivered or stored: the archive hooks it (it may add a ``<stanza-id/>``);
``message-bounced`` (the same event) when such a message is then refused with an
error to its sender (recipient congested, offline storage full): the archive
takes it back; and ``message-stored`` (StoredMessage) once a message went to offline storage
(the offline webhook hooks it).

Back-pressure: a recipient whose transport is congested gets no
more from other users; the sender is told ``resource-constraint`` (its
problem, not the recipient's).

Greenlet safety: no state of its own; reads the session registry and the
sessions' IM fields, never yields (the mailbox's SQLite calls do not yield).
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from boshroster.xmpp.errors import StanzaError, error_reply
from boshroster.xmpp.events import EventBus
from boshroster.xmpp.jid import JID, JIDError
from boshroster.xmpp.router import StanzaEvent
from boshroster.xmpp.sessions import UndeliveredEvent
from boshroster.xmpp.tags import BODY, CARBONS_PRIVATE, MESSAGE, NO_COPY
from boshroster.xmpp.xmlio import E, Element, NS_CARBONS, NS_FORWARD, shallow_copy

if TYPE_CHECKING:
    from boshroster.xmpp.sessions import SessionManager
    from boshroster.xmpp.stream import ClientSession

log = logging.getLogger("boshroster.messages")


@dataclass(slots=True)
class StoredMessage:
    """``message-stored``: ``stanza`` was stored for ``username``, who is offline."""

    username: str
    stanza: Element


class Mailbox(Protocol):
    """Where messages for offline users go (offline.py)."""

    def store(self, username: str, stanza: Element) -> bool: ...


def _carbon_eligible(stanza: Element) -> bool:
    """XEP-0280 §6.1: chat messages, and normal messages with a body; not private/no-copy."""
    mtype = stanza.get("type", "normal")
    if mtype not in ("chat", "normal"):
        return False
    if mtype == "normal" and stanza.find(BODY) is None:
        return False
    if stanza.find(CARBONS_PRIVATE) is not None or stanza.find(NO_COPY) is not None:
        return False
    return True


class MessageHandler:
    def __init__(self, sessions: "SessionManager", mailbox: Mailbox, user_exists: Callable[[str], bool],
                 domain: str, bus: EventBus):
        self.sessions = sessions
        self.mailbox = mailbox
        self.user_exists = user_exists
        self.domain = domain
        self.bus = bus
        # A message sent to several resources at once (RFC 6121 §8.5.2.1.1: every resource of
        # the highest priority) -> those sessions: when one of them dies with it undelivered,
        # it is not requeued while another still has it (a duplicate otherwise).  Weak both
        # ways: an entry lives as long as some queue holds the message.  Mutated only here,
        # without yielding.  A cluster's RemoteSession cannot be weakly referenced: the flag says
        # one got it (its node requeues that copy if its session dies).
        self._fanout: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._bounces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # session -> [count, last logged]

    def register(self, bus: EventBus) -> None:
        bus.hook("message/bare", self._on_message)
        bus.hook("message/full", self._on_message)
        bus.hook("message/host", self._on_host)
        bus.hook("stanzas-undelivered", self.requeue)

    def _on_host(self, event: StanzaEvent) -> bool:
        if event.stanza.get("type") in ("error", "headline"):
            return True
        raise StanzaError("service-unavailable", text="the server does not accept messages")

    def _on_message(self, event: StanzaEvent) -> bool:
        origin, stanza = event.origin, event.stanza
        if _carbon_eligible(stanza):
            # A copy: ``message-accepted`` may stamp the recipient's <stanza-id/> on ``stanza``
            # below, and a queued carbon is serialized later (BOSH, XEP-0198 retransmission).
            sent = shallow_copy(stanza)
            self._carbon_copies(origin, sent, "sent", exclude=origin)
        self.deliver(stanza, event.to, event)
        return True

    def deliver(self, stanza: Element, to: JID, event: StanzaEvent | None = None) -> None:
        mtype = stanza.get("type", "normal")
        username = to.local
        if not self.user_exists(username):
            # RFC 6121 §8.5.1: no such user.
            if mtype in ("error", "headline", "groupchat"):
                return
            raise StanzaError("service-unavailable", text="no such user")
        if event is None or mtype not in ("chat", "normal") or stanza.find(BODY) is None:
            self._route(stanza, to, mtype)
            return
        self.bus.fire("message-accepted", event)
        try:
            self._route(stanza, to, mtype)
        except StanzaError:
            # Accepted (archived) but bounced: the archive takes it back (mam.py).
            self.bus.fire("message-bounced", event)
            raise

    def _route(self, stanza: Element, to: JID, mtype: str) -> None:
        username = to.local
        if to.resource is not None:
            target = self.sessions.get(username, to.resource)
            if target is not None:
                # §8.5.3.1: a full JID that is online gets it, whatever the type.
                self._check_room(target, mtype)
                target.send(stanza)
                if _carbon_eligible(stanza):
                    self._carbon_copies(target, stanza, "received", exclude=target)
                return
            # §8.5.3.2.1: an offline full JID: chat/normal are treated as bare.
            if mtype == "groupchat":
                raise StanzaError("service-unavailable")
            if mtype in ("headline", "error"):
                return
        self._deliver_bare(stanza, username, mtype)

    def _check_room(self, target: "ClientSession", mtype: str) -> None:
        if target.congested and mtype != "error":
            self._log_bounce(target)
            raise StanzaError("resource-constraint", "wait", "the recipient is not keeping up; try again later")

    def _log_bounce(self, target: "ClientSession") -> None:
        """One WARNING per congested recipient per 10 s, with the count: a flood to a slow
        reader logged a line per message (3,300 in a 3-minute soak)."""
        now = time.monotonic()
        entry = self._bounces.get(target)
        if entry is None:
            entry = self._bounces[target] = [0, None]
        entry[0] += 1
        if entry[1] is None or now - entry[1] >= 10.0:
            log.warning("%s is not reading fast enough: message bounced to its sender (%d since the last such line)",
                        target.jid_str, entry[0])
            entry[0], entry[1] = 0, now

    def _deliver_bare(self, stanza: Element, username: str, mtype: str, requeued: bool = False) -> None:
        """RFC 6121 §8.5.2 for a bare JID.  ``requeued``: a message given back by a dead
        session was already accepted, so when every remaining resource is congested it is
        stored offline rather than bounced (the sender was told nothing is wrong)."""
        available = [s for s in self.sessions.sessions_of(username) if s.presence is not None and s.priority >= 0]
        if mtype == "groupchat":
            raise StanzaError("service-unavailable")  # §8.5.2.1.2
        if mtype == "headline":
            for session in available:  # §8.5.2.1.2: all non-negative resources, or drop
                if not session.congested:
                    session.send(stanza)
            return
        if not available:
            # §8.5.2.2: no available resource -> offline storage (chat/normal), errors dropped.
            if mtype == "error":
                return
            self._store(username, stanza)
            return
        best = max(s.priority for s in available)
        if mtype == "error":
            next(s for s in available if s.priority == best).send(stanza)
            return
        # §8.5.2.1.1: chat/normal to the highest-priority non-negative resource(s).
        receivers = [s for s in available if s.priority == best and not s.congested]
        if not receivers:
            if requeued:
                log.warning("every resource of %s is congested: a requeued message goes to offline storage",
                            username)
                self._store(username, stanza)
                return
            self._check_room(next(s for s in available if s.priority == best), mtype)
        if len(receivers) > 1:
            local = weakref.WeakSet(s for s in receivers if not getattr(s, "remote", False))
            self._fanout[stanza] = (local, len(local) < len(receivers))
        for session in receivers:
            session.send(stanza)
        if _carbon_eligible(stanza):
            for session in self.sessions.sessions_of(username):
                if session.carbons and session not in receivers:
                    session.send(self._wrap(stanza, "received", session))

    def _store(self, username: str, stanza: Element) -> None:
        """Offline storage (§8.5.2.2); raises service-unavailable when the user's queue is full."""
        if not self.mailbox.store(username, stanza):
            raise StanzaError("service-unavailable", "cancel", "offline storage full")
        self.bus.fire("message-stored", StoredMessage(username, stanza))

    def requeue(self, event: UndeliveredEvent) -> None:
        """Messages queued for a session that died undelivered go back through routing
        (other resources, or offline storage when none can take it) instead of being
        lost; one that cannot go anywhere (offline storage full) is bounced to its
        sender (issue 10: delivered, stored or bounced).  One stanza that cannot be
        requeued costs that stanza only (logged), never those behind it."""
        self.reroute(event.session.username, event.stanzas, gone=event.session)

    def reroute(self, username: str, stanzas, gone: "ClientSession | None" = None) -> None:
        """``requeue`` for ``username``'s stanzas that ``gone`` (a session, or a dead cluster
        node's inbox when None) will never deliver: to the bare JID again, else stored, else
        bounced."""
        bare = JID.make(username, self.domain)
        for stanza in stanzas:
            if stanza.tag != MESSAGE or stanza.get("type", "normal") not in ("chat", "normal"):
                continue
            if stanza.find(BODY) is None:
                continue  # carbons wrappers, chat states, receipts: not worth keeping
            fanout = self._fanout.get(stanza)
            if fanout is not None and (fanout[1] or any(s is not gone and not s.ended for s in fanout[0])):
                continue  # another resource that got it at the same time still has it (another node's: its own)
            copy_ = shallow_copy(stanza, str(bare))
            try:
                self._deliver_bare(copy_, bare.local, copy_.get("type", "normal"), requeued=True)
            except StanzaError as err:
                log.warning("could not requeue a message for %s (%s): bounced to its sender", bare, err.condition)
                self._bounce(stanza, err)
            except Exception:
                log.exception("could not requeue a message for %s", bare)

    def _bounce(self, stanza: Element, err: StanzaError) -> None:
        """Tell the sender of an accepted ``stanza`` that it could not be delivered
        (RFC 6120 §8.3: an error stanza, from the intended recipient)."""
        try:
            sender = JID.parse(stanza.get("from") or "")
        except JIDError:  # no usable sender: nobody to tell
            return
        if sender.domain != self.domain or not sender.local:
            return
        try:
            self.deliver(error_reply(stanza, err), sender)
        except StanzaError:
            pass  # the sender is gone too: errors are never stored (§8.5.2.2)

    def _carbon_copies(self, owner: "ClientSession", stanza: Element, kind: str, exclude: "ClientSession") -> None:
        for session in self.sessions.sessions_of(owner.username):
            if session is not exclude and session.carbons:
                session.send(self._wrap(stanza, kind, session))

    def _wrap(self, stanza: Element, kind: str, session: "ClientSession") -> Element:
        """XEP-0280 §7/§8: <message><sent|received><forwarded><message/>…"""
        bare = f"{session.username}@{self.domain}"
        return E(
            MESSAGE,
            {"from": bare, "to": session.jid_str, "type": stanza.get("type", "normal")},
            E(f"{{{NS_CARBONS}}}{kind}", None, E(f"{{{NS_FORWARD}}}forwarded", None, stanza)),
        )
