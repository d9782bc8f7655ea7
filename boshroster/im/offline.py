"""Durable offline messages: SQLite in the data directory, delivered with a <delay/> stamp.

A message is committed before ``store`` returns, so a crash or restart
loses nothing.  sqlite3 calls do not yield to other greenlets, so each call
is atomic with respect to the rest of the server.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from boshroster.xmpp import xmlio
from boshroster.xmpp.xmlio import E, NS_DELAY

if TYPE_CHECKING:
    from boshroster.xmpp.stream import ClientSession

log = logging.getLogger("boshroster.offline")


class OfflineStore:
    def __init__(self, path: str, domain: str, max_per_user: int = 1000, stanza_size_limit: int = 262144):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.domain = domain
        self.max_per_user = max_per_user
        self.stanza_size_limit = stanza_size_limit
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS offline (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " username TEXT NOT NULL, stamp REAL NOT NULL, stanza TEXT NOT NULL)"
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS offline_user ON offline(username, id)")

    def store(self, username: str, stanza) -> bool:
        """Keep ``stanza`` for ``username``; False when the user's queue is full."""
        (count,) = self.db.execute("SELECT COUNT(*) FROM offline WHERE username=?", (username,)).fetchone()
        if count >= self.max_per_user:
            log.warning("offline queue of %s is full (%d), message refused", username, count)
            return False
        self.db.execute(
            "INSERT INTO offline (username, stamp, stanza) VALUES (?, ?, ?)",
            (username, time.time(), xmlio.tostring(stanza)),
        )
        log.debug("stored offline message for %s", username)
        return True

    def count(self, username: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM offline WHERE username=?", (username,)).fetchone()[0]

    def deliver(self, session: "ClientSession") -> int:
        """Send and delete the user's stored messages, oldest first, each with XEP-0203 <delay/>."""
        rows = self.db.execute(
            "SELECT id, stamp, stanza FROM offline WHERE username=? ORDER BY id", (session.username,)
        ).fetchall()
        if not rows:
            return 0
        for _id, stamp, text in rows:
            try:
                stanza = xmlio.parse(text, self.stanza_size_limit * 2, max_depth=None)  # written by us
            except xmlio.XMLError:
                log.error("dropping unreadable offline message %s for %s", _id, session.username)
                continue
            when = datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            stanza.append(E(f"{{{NS_DELAY}}}delay", {"from": self.domain, "stamp": when}, text="Offline Storage"))
            session.send(stanza)
        self.db.execute(
            "DELETE FROM offline WHERE username=? AND id<=?", (session.username, rows[-1][0])
        )
        log.info("delivered %d offline message(s) to %s", len(rows), session.jid_str)
        return len(rows)

    def close(self) -> None:
        self.db.close()

