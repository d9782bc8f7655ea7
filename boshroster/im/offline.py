"""Durable offline messages: SQLite in the data directory, delivered with a <delay/> stamp.

A message is committed before ``store`` returns, so a crash or restart
loses nothing.  A stored message is deleted only once the client has it
(issue 10 point 2): ``deliver`` hands each row to ``session.send`` with a
``delivered`` callback (WebSocket: written to the socket; BOSH: in a
response the client acknowledged, XEP-0124 §9) and deletes the row on
``True``; on ``False`` (the stream ended first) the row stays for the next
login.  A delivery pages through the rows: at most ``window_rows`` rows or
``window_bytes`` bytes are in flight at once, the next ones are read as
earlier ones are confirmed, so 1,000 × 256 KB rows are never loaded at once.
The byte window (512 KiB plus one row) stays under a transport's high-water
mark (BOSH: 1 MiB), so a delivery alone never makes its session congested
and live messages from others are not bounced meanwhile.

Shared state: ``_deliveries`` (username -> the one delivery in progress for
that user) and ``_doomed`` (ids confirmed, deleted together at the end of
the loop turn: one transaction per acknowledged response, not per row).
Both are mutated only from greenlets that do not yield inside these methods:
sqlite3 calls do not yield to other greenlets, so each method is atomic
with respect to the rest of the server.  Callbacks may run synchronously
inside ``session.send`` (a transport that does not track delivery), which
``_Delivery.pump`` tolerates (``_pumping``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from datetime import datetime, timezone
from functools import partial
from typing import TYPE_CHECKING

import gevent

from boshroster.xmpp import xmlio
from boshroster.xmpp.xmlio import E, NS_DELAY

if TYPE_CHECKING:
    from boshroster.xmpp.stream import ClientSession

log = logging.getLogger("boshroster.offline")


class OfflineStore:
    def __init__(self, path: str, domain: str, max_per_user: int = 1000, stanza_size_limit: int = 262144,
                 window_rows: int = 100, window_bytes: int = 524288, max_total_bytes: int = 0):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.domain = domain
        self.max_per_user = max_per_user
        self.stanza_size_limit = stanza_size_limit
        self.window_rows = window_rows
        self.window_bytes = window_bytes
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives kill -9
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS offline (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " username TEXT NOT NULL, stamp REAL NOT NULL, stanza TEXT NOT NULL)"
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS offline_user ON offline(username, id)")
        # Issue 10 point 15: all users' rows together are bounded too (0 = no bound), so
        # messages to many users cannot fill the disk; ``_total_bytes`` is kept by store and
        # _delete_confirmed (same greenlet-safety as the rest: sqlite3 calls never yield).
        self.max_total_bytes = max_total_bytes
        (self._total_bytes,) = self.db.execute("SELECT COALESCE(SUM(length(stanza)), 0) FROM offline").fetchone()
        self._refused_total = 0
        self._deliveries: dict[str, _Delivery] = {}
        self._doomed: list[tuple[int, int]] = []  # (row id, its length)
        self._delete_scheduled = False

    def store(self, username: str, stanza) -> bool:
        """Keep ``stanza`` for ``username``; False when the user's queue is full."""
        (count,) = self.db.execute("SELECT COUNT(*) FROM offline WHERE username=?", (username,)).fetchone()
        if count >= self.max_per_user:
            log.warning("offline queue of %s is full (%d), message refused", username, count)
            return False
        text = xmlio.tostring(stanza)
        if self.max_total_bytes and self._total_bytes + len(text) > self.max_total_bytes:
            self._refused_total += 1
            if self._refused_total % 1000 == 1:
                log.warning("offline storage is full (%d bytes, offline_max_total_bytes=%d): message for %s "
                            "refused (%d so far)", self._total_bytes, self.max_total_bytes, username,
                            self._refused_total)
            return False
        self.db.execute(
            "INSERT INTO offline (username, stamp, stanza) VALUES (?, ?, ?)",
            (username, time.time(), text),
        )
        self._total_bytes += len(text)
        log.debug("stored offline message for %s", username)
        return True

    def count(self, username: str) -> int:
        self._delete_confirmed()
        return self.db.execute("SELECT COUNT(*) FROM offline WHERE username=?", (username,)).fetchone()[0]

    def deliver(self, session: "ClientSession") -> None:
        """Start sending the user's stored messages to ``session`` (at its initial presence),
        oldest first, each with XEP-0203 <delay/>; more follow as the client confirms.
        One delivery per user at a time: a second resource asking meanwhile takes over
        only if the first one's stream ends before it is done.  Returns None: a
        notification handler (``presence-initial``) must not stop the event."""
        username = session.username
        current = self._deliveries.get(username)
        if current is not None and not current.session.ended:
            current.standby.append(session)
            return
        if current is not None:
            # Its stream ended but its transport never reported back: its unconfirmed
            # rows are still stored, so start over for the new session.
            log.warning("offline delivery to %s abandoned (no delivery report)", current.session.jid_str)
            self._delete_confirmed()
        delivery = self._deliveries[username] = _Delivery(self, session)
        delivery.pump()

    # -- what a backend provides (cluster/pg_offline.py overrides these) --------

    def _page(self, username: str, after: int, limit: int) -> list:
        """The user's next rows (id, stamp, stanza) above ``after``, oldest first."""
        return self.db.execute(
            "SELECT id, stamp, stanza FROM offline WHERE username=? AND id>? ORDER BY id LIMIT ?",
            (username, after, limit),
        ).fetchall()

    def _unsent(self, row_ids: list[int]) -> None:
        """Rows ``_page`` returned that were not handed over or not delivered (the stream ended):
        they simply stay stored here."""

    def _repump(self, delivery: "_Delivery") -> None:
        """Room in the window after a delivery report: read on at once (sqlite3 does not yield)."""
        delivery.pump()

    # -- confirmed rows ----------------------------------------------------------

    def _confirmed(self, row_id: int, size: int) -> None:
        self._doomed.append((row_id, size))
        if not self._delete_scheduled:
            self._delete_scheduled = True
            gevent.get_hub().loop.run_callback(self._delete_confirmed)

    def _delete_confirmed(self) -> None:
        """Delete the confirmed rows in one transaction (runs at the end of the loop turn)."""
        self._delete_scheduled = False
        doomed, self._doomed = self._doomed, []
        if not doomed or self.db is None:
            return
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM offline WHERE id=?", [(row_id,) for row_id, _ in doomed])
        self.db.execute("COMMIT")
        self._total_bytes = max(0, self._total_bytes - sum(size for _, size in doomed))
        if self._refused_total and self._total_bytes < self.max_total_bytes // 2:
            log.info("offline storage has room again: %d message(s) were refused while it was full", self._refused_total)
            self._refused_total = 0

    def close(self) -> None:
        if self.db is not None:
            self._delete_confirmed()
            self.db.close()
            self.db = None


class _Delivery:
    """One user's stored messages on their way to one session, a window at a time.

    ``after``: highest row id handed over; ``in_flight``: row id -> size of the
    rows handed over and not yet confirmed or refused."""

    def __init__(self, store: OfflineStore, session: "ClientSession"):
        self.store = store
        self.session = session
        self.username = session.username
        self.after = 0
        self.in_flight: dict[int, int] = {}
        self.in_flight_bytes = 0
        self.standby: list["ClientSession"] = []
        self.delivered = 0
        self.kept = 0
        self.handed = 0
        self.exhausted = False
        self.held: list[int] = []  # rows of the last page left for the next one (byte window full)
        self._pumping = False

    def pump(self) -> int:
        """Hand rows over until the window is full or no row is left; returns how many."""
        if self._pumping:
            return 0
        store = self.store
        self._pumping = True
        handed = 0
        try:
            while (not self.session.ended and store.db is not None
                   and len(self.in_flight) < store.window_rows and self.in_flight_bytes < store.window_bytes):
                rows = store._page(self.username, self.after, store.window_rows - len(self.in_flight))
                self.exhausted = not rows
                if not rows:
                    break
                self.held = []
                for index, (row_id, stamp, text) in enumerate(rows):
                    if self.session.ended:
                        store._unsent([row[0] for row in rows[index:]])
                        break
                    if self.in_flight_bytes >= store.window_bytes:
                        self.held = [row[0] for row in rows[index:]]  # read again by the next page
                        break
                    self.after = row_id
                    try:
                        stanza = xmlio.parse(text, store.stanza_size_limit * 2, max_depth=None)  # written by us
                    except xmlio.XMLError:
                        log.error("dropping unreadable offline message %s for %s", row_id, self.username)
                        store._confirmed(row_id, len(text))
                        continue
                    when = datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                    stanza.append(E(f"{{{NS_DELAY}}}delay", {"from": store.domain, "stamp": when}, text="Offline Storage"))
                    self.in_flight[row_id] = len(text)
                    self.in_flight_bytes += len(text)
                    handed += 1
                    self.session.send(stanza, delivered=partial(self._reported, row_id))
        finally:
            self._pumping = False
        self.handed += handed
        self._maybe_done()
        return handed

    def _reported(self, row_id: int, ok: bool) -> None:
        size = self.in_flight.pop(row_id, None)
        if size is None:
            return
        self.in_flight_bytes -= size
        if ok:
            self.store._confirmed(row_id, size)
            self.delivered += 1
        else:
            self.kept += 1
            self.store._unsent([row_id])
        if not self._pumping:
            self.store._repump(self)

    def _maybe_done(self) -> None:
        if self.in_flight or self._pumping or not (self.exhausted or self.session.ended):
            return
        store = self.store
        if store._deliveries.get(self.username) is not self:
            return  # abandoned: another delivery took over
        if self.session.ended:
            log.info("offline delivery to %s interrupted: %d delivered, the rest stay stored",
                     self.session.jid_str, self.delivered)
            while self.standby:
                other = self.standby.pop(0)
                if not other.ended and other.available:
                    store._delete_confirmed()
                    self.session, self.after, self.exhausted = other, 0, False
                    self.pump()
                    return
            # No one takes over: give back what the last page left unsent (PostgreSQL: its
            # claims, else another node waits for the claim lease).
            held, self.held = self.held, []
            if held:
                store._unsent(held)
        elif self.handed:
            log.info("delivered %d offline message(s) to %s", self.delivered, self.session.jid_str)
        del store._deliveries[self.username]
