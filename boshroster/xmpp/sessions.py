"""Who is online: bound resources by user, and the resource-conflict policy.

Shared state: ``_users`` maps username -> {resource: session}.  It is
mutated only by ``bind`` and ``unbind``, which never yield, so every reader
sees a consistent map (gevent switches greenlets only at I/O or sleeps).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Iterator

from boshroster.xmpp.errors import StanzaError

if TYPE_CHECKING:
    from boshroster.xmpp.stream import ClientSession


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

    def count(self) -> int:
        return sum(len(r) for r in self._users.values())
