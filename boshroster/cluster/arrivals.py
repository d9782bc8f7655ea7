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

Cost: an arrival looks up only the recent sessions that have its user in their
roster (``_by_viewer``, built from each session's roster at its initial
presence), never scans every recent login: a login storm on other nodes costs
each node one dict lookup per arrival.

State: ``_recent`` (deque of (monotonic time, session, viewers)) and
``_by_viewer`` (bare JID -> recent sessions whose roster has it), written by the
``presence-initial`` hook and pruned and read by ``arrived`` in the pub/sub
greenlet; neither yields.
"""

from __future__ import annotations

import time
from collections import deque

from boshroster.im.presence import addressed

WINDOW = 10.0  # seconds: far above the pub/sub lag (ms), below anything a user would notice twice
_MAX_RECENT = 2_000  # initial presences remembered (a login storm beyond that: the oldest go first)


class Arrivals:
    def __init__(self, presence, domain: str, clock=time.monotonic):
        self.presence = presence  # im.presence.PresenceHandler: its roster decides who may see whom
        self.domain = domain
        self.clock = clock
        self._recent: deque = deque()
        self._by_viewer: dict[str, list] = {}
        self.sent = 0  # presences sent to arriving resources (for tests and metrics)

    def initial(self, session) -> None:
        """``presence-initial`` of a local session: indexed by who may see it (its roster's
        contacts and its own other resources)."""
        viewers = (f"{session.username}@{self.domain}", *self.presence.roster.contacts(session.username))
        for viewer in viewers:
            self._by_viewer.setdefault(viewer, []).append(session)
        self._recent.append((self.clock(), session, viewers))
        self._prune()

    def _prune(self) -> None:
        recent, index = self._recent, self._by_viewer
        horizon = self.clock() - WINDOW
        while recent and (recent[0][0] < horizon or len(recent) > _MAX_RECENT):
            _, session, viewers = recent.popleft()
            for viewer in viewers:
                sessions = index.get(viewer)
                if sessions is not None:
                    sessions.remove(session)
                    if not sessions:
                        del index[viewer]

    def arrived(self, remote) -> None:
        """A remote resource (directory.RemoteSession) became available in the mirror."""
        self._prune()
        viewer = f"{remote.username}@{self.domain}"
        sessions = self._by_viewer.get(viewer)
        if not sessions:
            return
        roster = self.presence.roster
        for session in sessions:
            if session.ended or session.presence is None:
                continue
            owner = session.username
            if owner == remote.username or roster.shares_with(owner, viewer):  # the roster as it is now
                remote.send(addressed(session.presence, remote.jid_str))
                self.sent += 1
