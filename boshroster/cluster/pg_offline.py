"""Offline messages in PostgreSQL: the interface of im/offline.py's OfflineStore, shared by all nodes.

``store`` commits before it returns (nothing lost if the node dies next).
``deliver`` takes the user's messages with one ``DELETE … RETURNING``, so two
nodes delivering to two resources of the same user at once never hand out a
message twice.  The per-user cap is checked in the same transaction as the
insert, under a per-user advisory lock.

Unlike SQLite, these calls yield to other greenlets (network I/O); callers
(im/messages.py) re-read no shared state after them.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from boshroster.cluster.pg import PgDatabase, StorageUnavailable
from boshroster.xmpp import xmlio
from boshroster.xmpp.xmlio import E, NS_DELAY

if TYPE_CHECKING:
    from boshroster.xmpp.stream import ClientSession

log = logging.getLogger("boshroster.offline")

MIGRATIONS = [
    """
    CREATE TABLE offline (id BIGSERIAL PRIMARY KEY, username TEXT NOT NULL, stamp DOUBLE PRECISION NOT NULL,
                          stanza TEXT NOT NULL);
    CREATE INDEX offline_user ON offline (username, id)
    """,
]


class PgOfflineStore:
    def __init__(self, database: PgDatabase, domain: str, max_per_user: int = 1000, stanza_size_limit: int = 262144,
                 owns_database: bool = False):
        self.db = database
        self.domain = domain
        self.max_per_user = max_per_user
        self.stanza_size_limit = stanza_size_limit
        self._owns = owns_database
        database.migrate("offline", MIGRATIONS)

    def store(self, username: str, stanza) -> bool:
        """Keep ``stanza`` for ``username``; False when the user's queue is full (or PostgreSQL is away)."""
        text = xmlio.tostring(stanza)
        try:
            with self.db.transaction() as tx:
                tx.execute("SELECT pg_advisory_xact_lock(hashtext(?))", ("offline:" + username,))
                (count,) = tx.execute("SELECT COUNT(*) FROM offline WHERE username = ?", (username,)).fetchone()
                if count >= self.max_per_user:
                    log.warning("offline queue of %s is full (%d), message refused", username, count)
                    return False
                tx.execute("INSERT INTO offline (username, stamp, stanza) VALUES (?, ?, ?)",
                           (username, time.time(), text))
        except StorageUnavailable as exc:
            log.warning("offline message for %s refused: PostgreSQL unavailable (%s)", username, exc)
            return False
        return True

    def count(self, username: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM offline WHERE username = ?", (username,)).fetchone()[0]

    def deliver(self, session: "ClientSession") -> int:
        """Send and delete the user's stored messages, oldest first, each with XEP-0203 <delay/>."""
        try:
            rows = self.db.execute("DELETE FROM offline WHERE username = ? RETURNING id, stamp, stanza",
                                   (session.username,)).fetchall()
        except StorageUnavailable as exc:
            log.warning("offline messages of %s not delivered now: %s", session.username, exc)
            return 0
        if not rows:
            return 0
        rows.sort()
        for _id, stamp, text in rows:
            try:
                stanza = xmlio.parse(text, self.stanza_size_limit * 2)
            except xmlio.XMLError:
                log.error("dropping unreadable offline message %s for %s", _id, session.username)
                continue
            when = datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            stanza.append(E(f"{{{NS_DELAY}}}delay", {"from": self.domain, "stamp": when}, text="Offline Storage"))
            session.send(stanza)
        log.info("delivered %d offline message(s) to %s", len(rows), session.jid_str)
        return len(rows)

    def close(self) -> None:
        if self._owns:
            self.db.close()
