"""Who is online, and the one owner of a session's lifecycle: bind, unbind, kick.

``SessionRegistry`` is the data: bound resources by user and the
resource-conflict policy.  ``SessionManager`` owns the lifecycle and tells the
features about it on the event bus:

  ``resource-bind``       (session)  after a resource is bound (RFC 6120 §7)
  ``resource-unbind``     (session)  after it is gone from the registry, once per bound session
  ``stanzas-undelivered`` (UndeliveredEvent)  a transport gives back what it could not deliver

Shared state: ``SessionRegistry._users`` maps username -> {resource: session}.
It is mutated only by ``bind`` and ``unbind`` (called by SessionManager from the
greenlet feeding the session, or the one ending it), which never yield, so
every reader sees a consistent map (gevent switches greenlets only at I/O or
sleeps).  A session's own fields (``jid``…) are written only by that session's
greenlet: kicking a session on a conflict asks it to end itself.
"""

from __future__ import annotations

import secrets
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from boshroster.xmpp.errors import StanzaError
from boshroster.xmpp.events import EventBus
from boshroster.xmpp.jid import JID
from boshroster.xmpp.xmlio import Element

if TYPE_CHECKING:
    from boshroster.xmpp.stream import ClientSession

log = logging.getLogger("boshroster.sessions")


class SessionRegistry:
    def __init__(self, conflict_policy: str = "random", max_resources: int = 10):
        self._users: dict[str, dict[str, "ClientSession"]] = {}
        self.conflict_policy = conflict_policy
        self.max_resources = max_resources

    def bind(self, session: "ClientSession", username: str, resource: str | None) -> tuple[str, "ClientSession | None"]:
        """Reserve a resource for ``session``; return (resource, session to kick or None).

        RFC 6120 §7.7.2.2: on a conflict we either give the newcomer a
        server-generated resource ("random", the default: two browser tabs
        with the same resource must not kick each other forever) or replace
        the old session ("kick_old", Prosody's default).
        """
        resources = self._users.setdefault(username, {})
        kicked = None
        if resource is not None and resource in resources:
            if self.conflict_policy == "kick_old":
                kicked = resources.pop(resource)
            else:
                resource = f"{resource}-{secrets.token_hex(3)}"
        if len(resources) >= self.max_resources:
            if not resources:
                del self._users[username]
            raise StanzaError("resource-constraint", "wait", "too many sessions for this account")
        while resource is None or resource in resources:
            resource = f"boshroster-{secrets.token_hex(4)}"
        resources[resource] = session
        return resource, kicked

    def unbind(self, username: str, resource: str, session: "ClientSession") -> None:
        resources = self._users.get(username)
        if resources is not None and resources.get(resource) is session:
            del resources[resource]
            if not resources:
                del self._users[username]

    def get(self, username: str, resource: str) -> "ClientSession | None":
        resources = self._users.get(username)
        return resources.get(resource) if resources else None

    def sessions_of(self, username: str) -> list["ClientSession"]:
        resources = self._users.get(username)
        return list(resources.values()) if resources else []

    def is_online(self, username: str) -> bool:
        return username in self._users

    def usernames(self) -> list[str]:
        return list(self._users)

    def all_sessions(self) -> Iterator["ClientSession"]:
        for resources in list(self._users.values()):
            yield from list(resources.values())


@dataclass(slots=True)
class UndeliveredEvent:
    session: "ClientSession"
    stanzas: list[Element]


class SessionManager:
    """Binds and unbinds resources and fires the lifecycle events."""

    def __init__(self, bus: EventBus, domain: str, conflict_policy: str = "random", max_resources: int = 10):
        self.bus = bus
        self.domain = domain
        self.registry = SessionRegistry(conflict_policy, max_resources)
        # Reads go straight to the registry.
        self.get = self.registry.get
        self.sessions_of = self.registry.sessions_of
        self.is_online = self.registry.is_online
        self.usernames = self.registry.usernames
        self.all_sessions = self.registry.all_sessions

    def bind(self, session: "ClientSession", resource: str | None) -> JID:
        """Give ``session`` a resource (RFC 6120 §7); raises StanzaError."""
        resource, kicked = self.registry.bind(session, session.username, resource)
        jid = JID.make(session.username, self.domain, resource)
        session.bound(jid)
        self.bus.fire("resource-bind", session)
        if kicked is not None:
            # kick_old: the registry already maps the resource to the newcomer; the
            # old session ends itself, and its unbind leaves the newcomer alone.
            kicked.fail("conflict", "replaced by a new session")
        return jid

    def unbind(self, session: "ClientSession") -> None:
        """Called once by ClientSession.end for a bound session."""
        jid = session.jid
        self.registry.unbind(jid.local, jid.resource, session)
        self.bus.fire("resource-unbind", session)

    def undelivered(self, session: "ClientSession", stanzas: list[Element]) -> None:
        """Stanzas queued for a session that died: features route them again
        (other resources, offline storage) instead of losing them."""
        if stanzas:
            self.bus.fire("stanzas-undelivered", UndeliveredEvent(session, stanzas))

    def shutdown(self) -> None:
        """Tell every client the server is going away (system-shutdown)."""
        sessions = list(self.all_sessions())
        for session in sessions:
            session.fail("system-shutdown", "the server is shutting down")
        log.info("shutdown: %d session(s) closed", len(sessions))
