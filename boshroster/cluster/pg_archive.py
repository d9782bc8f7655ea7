"""The message archive in PostgreSQL (issue 14): im/archive.py's MessageArchive, shared by all nodes.

Selected when ``database_url`` is set (wiring.py).  The key layout and
every query are SQLite's (im/archive_sqlite_read.py: ``SqliteReads`` runs its
SQL here through PgDatabase, which takes the same ``?`` placeholders); tables
are prefixed ``mam_`` because the database is shared with accounts and
offline messages.  What differs is who hands out the ordinals and the ids:

- **Ids do not name the ordinal.**  Several nodes archive for the same user
  at once, so the per-owner ordinal ``n`` (and ``pn``, and the stamp, never
  decreasing in ``n``) can only be given inside a transaction that holds the
  owner's row.  An id is AES of (this process's epoch, a counter) instead,
  kept in the row (``flags >> 1``, a unique index), so ``store`` knows it at
  once without asking PostgreSQL; an epoch comes from the sequence
  ``mam_epoch`` at start, so an id is given once across the cluster.
- **Writes are batched** as in SQLite: ``store`` queues, a writer commits per
  ``flush_interval`` (``message-stored`` and queries commit at once), one
  transaction per ``_CHUNK`` messages: the owners' rows locked in id order
  (two nodes writing for the same users never deadlock), their counters and
  the pairs' bumped, the rows inserted as arrays: a few round trips per chunk.
  Measured here (2 vCPU, shared): ~0.1 ms of this process's CPU per message,
  ``store`` ~20 µs; a synchronous transaction per message cost 2.8 ms of CPU
  and 6.7 ms of latency before the live copy could go.  The price: across
  nodes, archive order is commit order, so two messages of one conversation
  archived by two nodes within ``flush_interval`` may be swapped (the same
  way in both parties' archives); on one node, order is exact.  A crash between accept
  and commit loses what was queued (at most ``flush_interval``; delivered
  live, or already committed if stored offline); those ids name nothing.
- **Retraction** (a bounced message) usually finds it still queued: dropped
  before any ordinal was given, so no hole.
- **Preferences** are cached per node for ``_PREFS_TTL`` seconds (read for
  both parties of every message): a change made through another node applies
  here within that time; through this node, at once.
- **Retention** runs on every node (the deletes are idempotent): per owner,
  the prefix older than the cutoff, then the stanzas by their stamp index.

Greenlet safety: the caches (owner ids, peer ids, prefs) are filled by any
greenlet and never hold counters; the ordinals live in PostgreSQL; the queue
and the id counter are mutated by ``store`` (no yield between them), by the
flush and by ``retract`` (both under ``_lock``, so a retraction never misses a
message in flight).  Calls yield (network I/O): callers re-read no shared
state after them (see im/messages.py).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Callable, Sequence
from xml.etree.ElementTree import Element

import gevent
import gevent.lock
import psycopg
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from boshroster.cluster.pg import PgDatabase, StorageUnavailable
from boshroster.im.archive import (POLICIES, ArchivedMessage, ArchivePage, ArchiveQuery,
                                   ArchiveUnavailable, Copy, ItemNotFound, MessageArchive, Prefs, Stored, applied_prefs,
                                   parse_duration)
from boshroster.im.archive_sqlite_read import (
    N_BITS,
    N_MAX,
    OWNER_MAX,
    PEER_BITS,
    PEER_MASK,
    OwnerState,
    SqliteReads,
    decode_stanza,
    encode_stanza,
    owner_check,
)

log = logging.getLogger("boshroster.archive")

_PREFS_TTL = 5.0
_CACHE_MAX = 100_000
_CHUNK = 500  # messages per write transaction
_SEQ_BITS = 40
_SEQ_MASK = (1 << _SEQ_BITS) - 1

MIGRATIONS = [
    """
    CREATE TABLE mam_meta (key TEXT PRIMARY KEY, value BYTEA NOT NULL);
    CREATE SEQUENCE mam_epoch;
    CREATE TABLE mam_owners (id SERIAL PRIMARY KEY, jid TEXT NOT NULL UNIQUE, last_n BIGINT NOT NULL DEFAULT 0,
                             last_stamp BIGINT NOT NULL DEFAULT 0);
    CREATE TABLE mam_peers (id SERIAL PRIMARY KEY, jid TEXT NOT NULL UNIQUE);
    CREATE TABLE mam_pairs (pk BIGINT PRIMARY KEY, last_pn BIGINT NOT NULL);
    CREATE TABLE mam_body (id BIGSERIAL PRIMARY KEY, stamp BIGINT NOT NULL, stanza TEXT NOT NULL);
    CREATE INDEX mam_body_stamp ON mam_body (stamp);
    CREATE TABLE mam_archive (k BIGINT PRIMARY KEY, pk BIGINT NOT NULL, pn BIGINT NOT NULL, stamp BIGINT NOT NULL,
                              flags BIGINT NOT NULL, resource TEXT, body BIGINT NOT NULL);
    CREATE INDEX mam_archive_pair ON mam_archive (pk, k);
    CREATE UNIQUE INDEX mam_archive_sid ON mam_archive ((flags >> 1));
    CREATE TABLE mam_prefs (owner TEXT PRIMARY KEY, dflt TEXT NOT NULL, always TEXT NOT NULL, never TEXT NOT NULL)
    """,
]


def _unavailable_as_archive_error(method):
    """PostgreSQL away (pg.StorageUnavailable) -> ArchiveUnavailable, what mam.py handles."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except StorageUnavailable as exc:
            raise ArchiveUnavailable(str(exc)) from None

    return wrapper


class PgArchive(SqliteReads, MessageArchive):
    T_ARCHIVE, T_BODY, T_PEERS, T_OWNERS = "mam_archive", "mam_body", "mam_peers", "mam_owners"

    @_unavailable_as_archive_error
    def query(self, owner: str, q: ArchiveQuery) -> ArchivePage:
        return super().query(owner, q)

    @_unavailable_as_archive_error
    def bounds(self, owner: str):
        return super().bounds(owner)

    def __init__(self, database: PgDatabase, *, expires_after: float | None = None, cleanup_interval: float = 3600.0,
                 flush_interval: float = 0.05, max_pending: int = 10000, default_policy: str = "always",
                 clock: Callable[[], float] = time.time):
        if default_policy not in POLICIES:
            raise ValueError(f"default archive policy must be one of {POLICIES}")
        self.db = database
        self.expires_after = expires_after
        self.cleanup_interval = cleanup_interval
        self.default_policy = default_policy
        self._clock = clock
        database.migrate("archive", MIGRATIONS)
        database.execute("INSERT INTO mam_meta (key, value) VALUES ('sid_key', ?) ON CONFLICT (key) DO NOTHING",
                         (os.urandom(16),))
        key = database.execute("SELECT value FROM mam_meta WHERE key = 'sid_key'").fetchone()[0]
        self._cipher = Cipher(algorithms.AES(bytes(key)), modes.ECB())
        self._enc = self._cipher.encryptor()
        self._dec = self._cipher.decryptor()
        self._epoch = self._next_epoch()
        self._seq = 0  # ids of this process: (epoch, seq), seq < 2^40
        self.flush_interval = flush_interval
        self.max_pending = max(1, max_pending)
        self._pending: list[tuple[int, str, list[tuple]]] = []  # (stamp, stanza, [(owner, pk, flags, resource)])
        self._flush_scheduled = False
        self._lock = gevent.lock.RLock()
        self._owners: dict[str, tuple[int, bytes]] = {}  # jid -> (id, check): never changes once made
        self._peers: dict[str, int] = {}
        self._prefs: dict[str, tuple[float, Prefs]] = {}
        self._cleaner: gevent.Greenlet | None = None
        self._closed = False

    @classmethod
    def from_config(cls, config, database: PgDatabase) -> "PgArchive":
        return cls(database, expires_after=parse_duration(config.archive_expires_after),
                   cleanup_interval=config.archive_cleanup_interval, flush_interval=config.archive_flush_interval,
                   max_pending=config.archive_queue_max, default_policy=config.archive_default_policy)

    def _next_epoch(self) -> int:
        epoch = self.db.execute("SELECT nextval('mam_epoch')").fetchone()[0]
        if epoch >= 1 << 22:  # (epoch << 40 | seq) << 1 must stay below 2^63
            raise RuntimeError("archive: the epoch sequence is exhausted")
        return epoch

    # -- ids of owners and peers ------------------------------------------------------------

    def _owner_key(self, owner: str, create: bool) -> tuple[int, bytes] | None:
        known = self._owners.get(owner)
        if known is None:
            # SELECT first: one round trip for a known owner (after a restart or a cache reset),
            # and no INSERT ... ON CONFLICT, which burns a value of the id sequence each time
            # (ids are bounded by OWNER_MAX).
            row = self.db.execute("SELECT id FROM mam_owners WHERE jid = ?", (owner,)).fetchone()
            if row is None and create:
                self.db.execute("INSERT INTO mam_owners (jid) VALUES (?) ON CONFLICT (jid) DO NOTHING", (owner,))
                row = self.db.execute("SELECT id FROM mam_owners WHERE jid = ?", (owner,)).fetchone()
            if row is None:
                return None
            if row[0] > OWNER_MAX:
                raise RuntimeError("archive: too many owners for the key layout")
            if len(self._owners) >= _CACHE_MAX:
                self._owners.clear()
            known = self._owners[owner] = (row[0], owner_check(owner))
        return known

    def _owner(self, owner: str, create: bool) -> OwnerState | None:
        """For the reads: the owner with its last ordinal as committed now (other nodes write too)."""
        key = self._owner_key(owner, create)
        if key is None:
            return None
        (last_n,) = self.db.execute("SELECT last_n FROM mam_owners WHERE id = ?", (key[0],)).fetchone()
        return OwnerState(key[0], last_n, key[1])

    def _peer_id(self, jid: str) -> int:
        peer = self._peers.get(jid)
        if peer is None:
            row = self.db.execute("SELECT id FROM mam_peers WHERE jid = ?", (jid,)).fetchone()  # as _owner_key
            if row is None:
                self.db.execute("INSERT INTO mam_peers (jid) VALUES (?) ON CONFLICT (jid) DO NOTHING", (jid,))
                row = self.db.execute("SELECT id FROM mam_peers WHERE jid = ?", (jid,)).fetchone()
            peer = row[0]
            if peer > PEER_MASK:
                raise RuntimeError("archive: too many peers for the key layout")
            if len(self._peers) >= _CACHE_MAX:
                self._peers.clear()
            self._peers[jid] = peer
        return peer

    # -- ids: (epoch, seq), not the ordinal ------------------------------------------------

    def _id_of(self, entry: tuple) -> str:
        owner, seq, epoch = entry
        return self._encode(seq, owner, epoch)

    def _item(self, o: OwnerState, row):
        """As SqliteReads._item, but the id is the row's (epoch, seq) kept in ``flags``."""
        k, stamp, pn, flags, peer, resource, stanza = row
        sid = flags >> 1
        message = ArchivedMessage(self._encode(sid & _SEQ_MASK, o, sid >> _SEQ_BITS), stamp / 1_000_000,
                                  bool(flags & 1), peer, resource, decode_stanza(stanza))
        return k & N_MAX, stamp, pn, message

    def _row_at(self, owner: str, o: OwnerState, sid: str) -> int:
        decoded = self._decode(owner, sid)
        if decoded is not None:
            seq, epoch = decoded
            row = self.db.execute("SELECT k FROM mam_archive WHERE (flags >> 1) = ?",
                                  ((epoch << _SEQ_BITS) | seq,)).fetchone()
            if row is not None and row[0] >> N_BITS == o.id:
                return row[0] & N_MAX
        raise ItemNotFound(sid)

    # -- writing ----------------------------------------------------------------------------

    @_unavailable_as_archive_error
    def store(self, stanza: Element, copies: Sequence[Copy]) -> Stored:
        """Queue the message; its ids are (this process's epoch, a counter), known at once,
        so nothing waits for PostgreSQL here.  The ordinals are given at the commit."""
        if self._closed:
            raise RuntimeError("archive is closed")
        if not copies:
            return Stored(self._id_of, (), None)
        now = int(self._clock() * 1_000_000)
        epoch = self._epoch
        entries, rows = [], []
        for c in copies:
            key = self._owner_key(c.owner, create=True)
            self._seq += 1
            rows.append((key[0], (key[0] << PEER_BITS) | self._peer_id(c.peer),
                         (((epoch << _SEQ_BITS) | self._seq) << 1) | c.outgoing, c.resource))
            entries.append((OwnerState(key[0], 0, key[1]), self._seq, epoch))
        message = (now, encode_stanza(stanza), rows)
        self._pending.append(message)
        if len(self._pending) >= self.max_pending:
            log.warning("archive write queue full (%d messages): committing in the sender's greenlet",
                        len(self._pending))
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            gevent.spawn_later(self.flush_interval, self._background_flush)
        return Stored(self._id_of, entries, message)

    def _background_flush(self) -> None:
        try:
            self.flush()
        except ArchiveUnavailable:
            pass  # logged by flush
        except Exception:  # noqa: BLE001 - a background writer must not die silently
            log.exception("archive flush failed")

    @_unavailable_as_archive_error
    def flush(self) -> int:
        """Commit the queue, ``_CHUNK`` messages per transaction (one lock of the owners in id
        order, so two nodes writing for the same users never deadlock; a few round trips
        per chunk, not per message).  PostgreSQL away: the chunk is dropped, loudly (its ids
        were never committed and name nothing)."""
        written = 0
        with self._lock:
            self._flush_scheduled = False
            while self._pending:
                chunk = self._pending[:_CHUNK]
                del self._pending[:len(chunk)]
                try:
                    self._write(chunk)
                except (StorageUnavailable, psycopg.Error) as exc:
                    log.error("archive write failed (%s): %d queued message(s) not archived",
                              str(exc).strip(), len(chunk) + len(self._pending))
                    self._pending.clear()
                    raise StorageUnavailable(str(exc).strip()) from None
                written += len(chunk)
        return written

    def _write(self, chunk: list) -> None:
        owner_ids = sorted({row[0] for _, _, rows in chunk for row in rows})
        pair_counts: dict[int, int] = {}
        for _, _, rows in chunk:
            for row in rows:
                pair_counts[row[1]] = pair_counts.get(row[1], 0) + 1
        with self.db.transaction() as tx:
            locked = tx.execute("SELECT id, last_n, last_stamp FROM mam_owners WHERE id = ANY(?) ORDER BY id"
                                " FOR UPDATE", (owner_ids,)).fetchall()
            last_n = {row[0]: row[1] for row in locked}
            stamp = max(row[2] for row in locked)
            pn_end = dict(tx.execute(
                "INSERT INTO mam_pairs (pk, last_pn) SELECT * FROM unnest(?::bigint[], ?::bigint[])"
                " ON CONFLICT (pk) DO UPDATE SET last_pn = mam_pairs.last_pn + EXCLUDED.last_pn RETURNING pk, last_pn",
                (list(pair_counts), list(pair_counts.values()))).fetchall())
            pn_next = {pk: pn_end[pk] - count for pk, count in pair_counts.items()}
            body_ids = [row[0] for row in tx.execute("SELECT nextval('mam_body_id_seq') FROM generate_series(1, ?)",
                                                     (len(chunk),)).fetchall()]
            bodies, archive_rows = [], []
            for body, (now, text, rows) in zip(body_ids, chunk):
                stamp = max(stamp, now)  # never decreasing, for every owner (time order == n order)
                bodies.append((body, stamp, text))
                for owner, pk, flags, resource in rows:
                    n = last_n[owner] = last_n[owner] + 1
                    pn = pn_next[pk] = pn_next[pk] + 1
                    archive_rows.append(((owner << N_BITS) | n, pk, pn, stamp, flags, resource, body))
            # One statement per table, the rows as arrays (unnest): psycopg's executemany costs
            # this process ~0.1 ms per row, an array column a few µs per element.
            tx.execute("INSERT INTO mam_body (id, stamp, stanza) SELECT * FROM unnest(?::bigint[], ?::bigint[], ?::text[])",
                       [list(column) for column in zip(*bodies)])
            tx.execute("INSERT INTO mam_archive (k, pk, pn, stamp, flags, resource, body) SELECT * FROM"
                       " unnest(?::bigint[], ?::bigint[], ?::bigint[], ?::bigint[], ?::bigint[], ?::text[], ?::bigint[])",
                       [list(column) for column in zip(*archive_rows)])
            tx.execute("UPDATE mam_owners o SET last_n = v.n, last_stamp = ? FROM unnest(?::int[], ?::bigint[]) AS v(id, n)"
                       " WHERE o.id = v.id", (stamp, list(last_n), list(last_n.values())))

    @_unavailable_as_archive_error
    def retract(self, token) -> int:
        """Still queued (the usual case: the bounce comes within the same loop turn): dropped,
        no ordinal was given.  Committed: its rows are deleted and an ordinal that is still
        the owner's last is handed back (else a hole stays).  Its ids are never given again
        either way (a counter of this process's epoch)."""
        if token is None:
            return 0
        with self._lock:  # not while a flush holds it in flight
            for i in range(len(self._pending) - 1, -1, -1):
                if self._pending[i] is token:
                    del self._pending[i]
                    return len(token[2])
            sids = [row[2] >> 1 for row in token[2]]
            with self.db.transaction() as tx:
                gone = tx.execute("DELETE FROM mam_archive WHERE (flags >> 1) = ANY(?) RETURNING k, pk, pn, body",
                                  (sids,)).fetchall()
                if gone:
                    tx.execute("DELETE FROM mam_body WHERE id = ?", (gone[0][3],))
                for k, pk, pn, _body in gone:
                    tx.execute("UPDATE mam_owners SET last_n = last_n - 1 WHERE id = ? AND last_n = ?",
                               (k >> N_BITS, k & N_MAX))
                    tx.execute("UPDATE mam_pairs SET last_pn = last_pn - 1 WHERE pk = ? AND last_pn = ?", (pk, pn))
            return len(gone)

    # -- preferences ------------------------------------------------------------------------

    @_unavailable_as_archive_error
    def prefs(self, owner: str) -> Prefs:
        cached = self._prefs.get(owner)
        now = time.monotonic()
        if cached is not None and now - cached[0] < _PREFS_TTL:
            return cached[1]
        row = self.db.execute("SELECT dflt, always, never FROM mam_prefs WHERE owner = ?", (owner,)).fetchone()
        prefs = Prefs(self.default_policy) if row is None else Prefs(row[0], tuple(json.loads(row[1])),
                                                                   tuple(json.loads(row[2])))
        if len(self._prefs) >= _CACHE_MAX:
            self._prefs.clear()
        self._prefs[owner] = (now, prefs)
        return prefs

    @_unavailable_as_archive_error
    def set_prefs(self, owner: str, prefs: Prefs) -> Prefs:
        applied = applied_prefs(prefs)
        self.db.execute("INSERT INTO mam_prefs (owner, dflt, always, never) VALUES (?, ?, ?, ?) ON CONFLICT (owner)"
                        " DO UPDATE SET dflt = EXCLUDED.dflt, always = EXCLUDED.always, never = EXCLUDED.never",
                        (owner, applied.default, json.dumps(list(applied.always)), json.dumps(list(applied.never))))
        self._prefs[owner] = (time.monotonic(), applied)
        return applied

    # -- retention --------------------------------------------------------------------------

    @_unavailable_as_archive_error  # the retention loop (SqliteReads) postpones on ArchiveUnavailable
    def expire(self, before: float, yield_between: bool = False) -> int:
        """Each owner's prefix older than ``before`` (§3.2: no holes), then the stanzas."""
        self.flush()
        cutoff = int(before * 1_000_000)
        deleted = 0
        for o, first_n, stop in self._expired_prefixes(cutoff):
            deleted += self.db.execute("DELETE FROM mam_archive WHERE k BETWEEN ? AND ?",
                                       ((o << N_BITS) | first_n, (o << N_BITS) | stop)).rowcount
            if yield_between:
                gevent.sleep(0)
        self.db.execute("DELETE FROM mam_body WHERE stamp < ?", (cutoff,))
        if deleted:
            log.info("archive retention: %d expired entries deleted", deleted)
        return deleted

    def close(self) -> None:
        if self._closed:
            return
        if self._cleaner is not None:
            self._cleaner.kill(block=False)
        try:
            self.flush()
        except ArchiveUnavailable:
            pass  # logged by flush
        self._closed = True  # the database is the wiring's: closed there
