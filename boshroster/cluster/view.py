"""``ClusterSessions``: the resources of the whole cluster, as presence and messages need them.

The wiring hands this view to im/presence.py and im/messages.py instead of the
SessionManager when a cluster is configured; they call only ``sessions_of``
and ``get``, which now also answer the other nodes' resources
(``RemoteSession`` from the directory mirror), so the RFC 6121 rules (highest
priority, carbons, presence broadcast) are computed over all nodes' resources
without the im/ modules knowing.  ``local`` is the node's own SessionManager,
for what must stay local (presence.py pushes roster-change presence for the
owner's local sessions only: each node does that for its own).

Reads only dicts, never yields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from boshroster.cluster.directory import Directory

if TYPE_CHECKING:
    from boshroster.xmpp.sessions import SessionManager


class ClusterSessions:
    def __init__(self, local: "SessionManager", directory: Directory):
        self.local = local
        self.registry = local.registry
        self.directory = directory
        self.usernames = local.usernames
        self.all_sessions = local.all_sessions

    def sessions_of(self, username: str) -> list:
        sessions = self.registry.sessions_of(username)
        remote = self.directory.remote.get(username)
        if remote:
            sessions.extend(remote.values())
        return sessions

    def get(self, username: str, resource: str):
        session = self.registry.get(username, resource)
        if session is None:
            remote = self.directory.remote.get(username)
            if remote:
                session = remote.get(resource)
        return session

    def is_online(self, username: str) -> bool:
        return self.registry.is_online(username) or username in self.directory.remote

    def is_online_locally(self, username: str) -> bool:
        return self.registry.is_online(username)
