"""Offline messages in PostgreSQL: im/offline.py's OfflineStore on a database shared by all nodes.

Same semantics as the SQLite store (issue 10 point 2, issue 14): ``store``
commits before it returns (nothing lost if the node dies next), and a row is
deleted only once the client has it: ``deliver`` is im/offline.py's windowed
``_Delivery`` (its ``delivered(True)`` reports: WebSocket written to the
kernel, BOSH response acknowledged, XEP-0198 ``<a/>``), with the three
backend hooks below.

Two nodes delivering to two resources of one user at once must not hand out a
row twice, so a page of rows is *claimed* (``claim`` = this process:
``node:boot``) in the same statement that reads it (``UPDATE … WHERE id IN
(SELECT … FOR UPDATE SKIP LOCKED) RETURNING``).  A page takes the rows nobody
claimed, the ones this process claimed before (a delivery that was abandoned
or interrupted here) and the ones whose claim is older than ``claim_lease``
seconds (a node that died and never came back).  A claimed row is deleted on
``delivered(True)``, released (claim NULL) on ``delivered(False)`` or when it
was never handed over.  When a node restarts with the same ``node_id`` it
releases every claim of its previous life at once (the kill -9 tests), and a
cluster node that cleans up a dead node releases that node's claims
(``release_node``), so a crash costs no wait for the lease.

Unlike SQLite these calls yield (network I/O).  Shared state (``_doomed``,
``_freed``: ids to delete / release; ``_deliveries`` as in OfflineStore) is
mutated by the session greenlets and the transports' delivery callbacks; the
statements run in greenlets of their own (``_flusher``, re-pumps), never in
the hub (a callback may run there) nor in a transport's writer, and
``_flush_lock`` lets only one flush at a time run, so "flushed" means what
the caller thinks (a standby session's delivery starts after the deletes).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import gevent
import gevent.lock

from boshroster.cluster.pg import PgDatabase, StorageUnavailable
from boshroster.im.offline import OfflineStore
from boshroster.xmpp import xmlio

if TYPE_CHECKING:
    from boshroster.im.offline import _Delivery

log = logging.getLogger("boshroster.offline")

FLUSH_ATTEMPTS = 4  # per flush call on a PostgreSQL blip: 0.5 + 1 + 2 s of waiting

MIGRATIONS = [
    """
    CREATE TABLE offline (id BIGSERIAL PRIMARY KEY, username TEXT NOT NULL, stamp DOUBLE PRECISION NOT NULL,
                          stanza TEXT NOT NULL);
    CREATE INDEX offline_user ON offline (username, id)
    """,
    """
    ALTER TABLE offline ADD COLUMN claim TEXT;
    ALTER TABLE offline ADD COLUMN claimed_at DOUBLE PRECISION;
    CREATE INDEX offline_claim ON offline (claim) WHERE claim IS NOT NULL
    """,
    # offline_max_total_bytes: the size of all rows, kept in the transactions that add and
    # delete them (the nodes share it; a SUM per store would read the whole table).
    """
    CREATE TABLE offline_total (id INT PRIMARY KEY CHECK (id = 1), bytes BIGINT NOT NULL);
    INSERT INTO offline_total SELECT 1, COALESCE(SUM(length(stanza)), 0) FROM offline
    """,
]


class PgOfflineStore(OfflineStore):
    def __init__(self, database: PgDatabase, domain: str, max_per_user: int = 1000, stanza_size_limit: int = 262144,
                 owns_database: bool = False, node: str = "node", boot: str = "0", claim_lease: float = 600.0,
                 window_rows: int = 100, window_bytes: int = 524288, max_total_bytes: int = 0):
        # Not OfflineStore.__init__: no SQLite file.  ``self.db`` is the PgDatabase.
        self.db = database
        self.domain = domain
        self.max_per_user = max_per_user
        self.stanza_size_limit = stanza_size_limit
        self.window_rows = window_rows
        self.window_bytes = window_bytes
        self.node = node
        self.claimant = f"{node}:{boot}"
        self.claim_lease = claim_lease
        # All users' rows together are bounded too (issue 10 point 15, as in the SQLite store;
        # 0 = no bound), over the whole cluster: the total is the offline_total row.
        self.max_total_bytes = max_total_bytes
        self._refused_total = 0  # this process's refusals while full (for the log)
        self._owns = owns_database
        self._deliveries: dict[str, "_Delivery"] = {}
        self._doomed: list[int] = []
        self._freed: list[int] = []
        self._flusher: gevent.Greenlet | None = None
        self._flush_lock = gevent.lock.Semaphore()
        self._closed = False
        database.migrate("offline", MIGRATIONS)
        released = self.release_node(node)
        if released:
            log.warning("offline: %d message(s) claimed by this node's previous run (%s) are deliverable again",
                        released, node)

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
                size = len(text)  # characters, as length(stanza) counts them
                if self.max_total_bytes:  # the row lock serialises the nodes' stores for a moment
                    room = tx.execute("UPDATE offline_total SET bytes = bytes + ? WHERE id = 1 AND bytes + ? <= ?"
                                      " RETURNING bytes", (size, size, self.max_total_bytes)).fetchone()
                    if room is None:
                        self._full(username)
                        return False
                else:
                    tx.execute("UPDATE offline_total SET bytes = bytes + ? WHERE id = 1", (size,))
                tx.execute("INSERT INTO offline (username, stamp, stanza) VALUES (?, ?, ?)",
                           (username, time.time(), text))
        except StorageUnavailable as exc:
            log.warning("offline message for %s refused: PostgreSQL unavailable (%s)", username, exc)
            return False
        return True

    def _full(self, username: str) -> None:
        self._refused_total += 1
        if self._refused_total % 1000 == 1:
            log.warning("offline storage is full (offline_max_total_bytes=%d, all nodes): message for %s"
                        " refused (%d so far here)", self.max_total_bytes, username, self._refused_total)

    def total_bytes(self) -> int:
        return self.db.execute("SELECT bytes FROM offline_total WHERE id = 1").fetchone()[0]

    def count(self, username: str) -> int:
        self._delete_confirmed()
        return self.db.execute("SELECT COUNT(*) FROM offline WHERE username = ?", (username,)).fetchone()[0]

    def release_node(self, node: str) -> int:
        """Free the claims of every earlier run of ``node`` (it restarted, or another node found it
        dead): those rows were never confirmed, so they are delivered again."""
        try:
            return self.db.execute("UPDATE offline SET claim = NULL, claimed_at = NULL"
                                   " WHERE claim LIKE ? AND claim <> ?",
                                   (node.replace("_", r"\_") + ":%", self.claimant)).rowcount
        except StorageUnavailable as exc:
            log.warning("offline: claims of node %s not released now (%s); they expire after %.0f s",
                        node, exc, self.claim_lease)
            return 0

    # -- OfflineStore's backend hooks --------------------------------------------

    def _page(self, username: str, after: int, limit: int) -> list:
        now = time.time()
        try:
            rows = self.db.execute(
                "UPDATE offline SET claim = ?, claimed_at = ? WHERE id IN ("
                " SELECT id FROM offline WHERE username = ? AND id > ?"
                " AND (claim IS NULL OR claim = ? OR claimed_at < ?)"
                " ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED) RETURNING id, stamp, stanza",
                (self.claimant, now, username, after, self.claimant, now - self.claim_lease, limit),
            ).fetchall()
        except StorageUnavailable as exc:
            log.warning("offline messages of %s not delivered now: %s", username, exc)
            return []
        return sorted(rows)

    def _unsent(self, row_ids: list[int]) -> None:
        self._freed.extend(row_ids)
        self._kick()

    def _repump(self, delivery: "_Delivery") -> None:
        """Read the next page in a greenlet of its own: the report may come from the hub or a writer."""
        if not getattr(delivery, "_repump_pending", False):
            delivery._repump_pending = True

            def repump():
                delivery._repump_pending = False
                delivery.pump()

            gevent.spawn(repump)

    # -- confirmed rows ----------------------------------------------------------

    def _confirmed(self, row_id: int, size: int = 0) -> None:
        """The total (offline_total) is lowered by the DELETE itself, from the rows' lengths."""
        self._doomed.append(row_id)
        self._kick()

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.dead:
            self._flusher = gevent.spawn(self._delete_confirmed)

    def _delete_confirmed(self) -> None:
        """Delete the confirmed rows and release the refused ones, in one transaction per batch.
        On a PostgreSQL blip the ids are kept (still claimed by us) and tried again, up to
        ``FLUSH_ATTEMPTS`` times in this call (3.5 s of waiting: shutdown must not hang), then at the next
        report; rows never deleted are delivered again after a restart (a duplicate, not a loss)."""
        if gevent.getcurrent() is gevent.get_hub():
            self._kick()
            return
        with self._flush_lock:
            attempt = 0
            while (self._doomed or self._freed) and not self._closed:
                doomed, self._doomed = self._doomed, []
                freed, self._freed = self._freed, []
                try:
                    with self.db.transaction() as tx:
                        if doomed:
                            tx.execute("WITH gone AS (DELETE FROM offline WHERE id = ANY(?) RETURNING length(stanza) AS n)"
                                       " UPDATE offline_total SET bytes = GREATEST(0, bytes - (SELECT COALESCE(SUM(n), 0)"
                                       " FROM gone)) WHERE id = 1", (doomed,))
                        if freed:
                            tx.execute("UPDATE offline SET claim = NULL, claimed_at = NULL"
                                       " WHERE id = ANY(?) AND claim = ?", (freed, self.claimant))
                    attempt = 0
                    if doomed and self._refused_total and self.total_bytes() < self.max_total_bytes // 2:
                        log.info("offline storage has room again: %d message(s) were refused here while it was"
                                 " full", self._refused_total)
                        self._refused_total = 0
                except StorageUnavailable as exc:
                    self._doomed[:0], self._freed[:0] = doomed, freed
                    attempt += 1
                    if attempt >= FLUSH_ATTEMPTS:
                        log.warning("offline: %d delivered message(s) not deleted (%s); trying again later",
                                    len(self._doomed), exc)
                        return
                    log.warning("offline: %d delivered message(s) not deleted yet (%s), retrying",
                                len(self._doomed), exc)
                    gevent.sleep(0.5 * 2 ** (attempt - 1))

    def close(self) -> None:
        if self._closed:
            return
        self._delete_confirmed()
        self._closed = True
        if self._owns:
            self.db.close()
