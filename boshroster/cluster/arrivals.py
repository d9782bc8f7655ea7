"""Presence for a resource that became available on another node at the same moment.

On one node, two initial presences (RFC 6121 §4.2) are handled one after the
other, so the second always finds the first: its broadcast reaches it, or its
probes are answered by it.  In a cluster each node learns of the other nodes'
resources through the directory's pub/sub (directory.py), a moment after they
were written.  If alice (node A) and bob (node B) send their initial presence
within that moment, A broadcasts and probes before it knows bob's resource,
and B before it knows alice's: neither would ever see the other (reproduced:
tests/test_cluster_presence_race.py).

So when the mirror learns that a remote resource became available
(``Directory.arrived``), this node sends to it the presence of its own
sessions that became available shortly before (``WINDOW``) and that the
resource's user may see (the session owner's roster shares with them, as a
probe answer would).  When there was no race the resource gets that presence
twice, which presence allows (it is state, not an event); a session that became
available earlier than ``WINDOW`` was in the mirror of every node long before.

State: ``_recent`` (deque of (monotonic time, session)), appended by the
``presence-initial`` hook and read by ``arrived`` in the pub/sub greenlet;
neither yields.
"""

from __future__ import annotations

import time
from collections import deque

from boshroster.im.presence import addressed

WINDOW = 10.0  # seconds: far above the pub/sub lag (ms), below anything a user would notice twice
_MAX_RECENT = 10_000  # initial presences remembered (a login storm beyond that: the oldest go first)


class Arrivals:
    def __init__(self, presence, domain: str, clock=time.monotonic):
        self.presence = presence  # im.presence.PresenceHandler: its roster decides who may see whom
        self.domain = domain
        self.clock = clock
        self._recent: deque = deque(maxlen=_MAX_RECENT)
        self.sent = 0  # presences sent to arriving resources (for tests and metrics)

    def initial(self, session) -> None:
        """``presence-initial`` of a local session."""
        self._recent.append((self.clock(), session))

    def arrived(self, remote) -> None:
        """A remote resource (directory.RemoteSession) became available in the mirror."""
        recent = self._recent
        horizon = self.clock() - WINDOW
        while recent and recent[0][0] < horizon:
            recent.popleft()
        if not recent:
            return
        viewer = f"{remote.username}@{self.domain}"
        roster = self.presence.roster
        for _, session in recent:
            if session.ended or session.presence is None:
                continue
            owner = session.username
            if owner == remote.username or roster.shares_with(owner, viewer):
                remote.send(addressed(session.presence, remote.jid_str))
                self.sent += 1
