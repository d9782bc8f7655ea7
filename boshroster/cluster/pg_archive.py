"""The message archive in PostgreSQL (issue 14): im/archive.py's MessageArchive, shared by all nodes.

Selected when ``database_url`` is set (wiring.py).  The key layout, the ids and
every query are SQLite's (im/archive_sqlite_read.py: ``SqliteReads`` runs its
SQL here through PgDatabase, which takes the same ``?`` placeholders); tables
are prefixed ``mam_`` because the database is shared with accounts and
offline messages.  What differs is who hands out the ordinals:

- **Writes commit before the live copy goes out.**  Several nodes archive for
  the same user at once, so the per-owner ordinal ``n``, the per-pair ``pn``
  and the stamp (never decreasing in ``n``) are taken inside the message's own
  transaction: the owners' rows locked in id order (``FOR UPDATE``: no
  deadlock between two messages of the same two users), counters bumped, rows
  inserted, committed.  ``store`` thus returns only once the message is
  archived: nothing of it is lost in a crash, at the price of one transaction
  (a few loopback round trips, yielding to other greenlets) per message.
- **Epochs** come from a sequence (``mam_epoch``): each process takes one at
  start and a new one after a retraction, so an id (n, epoch) is handed out
  at most once across the cluster even when a bounced message's ``n`` is
  given again (``retract``).
- **Preferences** are cached per node for ``_PREFS_TTL`` seconds (read for
  both parties of every message): a change made through another node applies
  here within that time; through this node, at once.
- **Retention** runs on every node (the deletes are idempotent): per owner,
  the prefix older than the cutoff, then the stanzas by their stamp index.

Greenlet safety: the caches (owner ids, peer ids, prefs) are filled by any
greenlet and never hold counters; every counter lives in PostgreSQL.  Calls
yield (network I/O): callers re-read no shared state after them (see
im/messages.py).
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
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from boshroster.cluster.pg import PgDatabase, StorageUnavailable
from boshroster.im.archive import (MAX_PREF_JIDS, POLICIES, ArchivePage, ArchiveQuery, ArchiveUnavailable, Copy,
                                   MessageArchive, Prefs, Stored, parse_duration)
from boshroster.im.archive_sqlite_read import (
    N_BITS,
    N_MAX,
    OWNER_MAX,
    PEER_BITS,
    PEER_MASK,
    OwnerState,
    SqliteReads,
    encode_stanza,
    owner_check,
)

log = logging.getLogger("boshroster.archive")

_PREFS_TTL = 5.0
_CACHE_MAX = 100_000

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
    T_ARCHIVE, T_BODY, T_PEERS = "mam_archive", "mam_body", "mam_peers"

    @_unavailable_as_archive_error
    def query(self, owner: str, q: ArchiveQuery) -> ArchivePage:
        return super().query(owner, q)

    @_unavailable_as_archive_error
    def bounds(self, owner: str):
        return super().bounds(owner)

    def __init__(self, database: PgDatabase, *, expires_after: float | None = None, cleanup_interval: float = 3600.0,
                 default_policy: str = "always", clock: Callable[[], float] = time.time):
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
        self._owners: dict[str, tuple[int, bytes]] = {}  # jid -> (id, check): never changes once made
        self._peers: dict[str, int] = {}
        self._prefs: dict[str, tuple[float, Prefs]] = {}
        self._cleaner: gevent.Greenlet | None = None
        self._closed = False

    @classmethod
    def from_config(cls, config, database: PgDatabase) -> "PgArchive":
        return cls(database, expires_after=parse_duration(config.archive_expires_after),
                   cleanup_interval=config.archive_cleanup_interval, default_policy=config.archive_default_policy)

    def _next_epoch(self) -> int:
        return self.db.execute("SELECT nextval('mam_epoch')").fetchone()[0] & 0xFFFFFFFF

    # -- ids of owners and peers ------------------------------------------------------------

    def _owner_key(self, owner: str, create: bool) -> tuple[int, bytes] | None:
        known = self._owners.get(owner)
        if known is None:
            if create:
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
            self.db.execute("INSERT INTO mam_peers (jid) VALUES (?) ON CONFLICT (jid) DO NOTHING", (jid,))
            peer = self.db.execute("SELECT id FROM mam_peers WHERE jid = ?", (jid,)).fetchone()[0]
            if peer > PEER_MASK:
                raise RuntimeError("archive: too many peers for the key layout")
            if len(self._peers) >= _CACHE_MAX:
                self._peers.clear()
            self._peers[jid] = peer
        return peer

    # -- writing ----------------------------------------------------------------------------

    @_unavailable_as_archive_error
    def store(self, stanza: Element, copies: Sequence[Copy]) -> Stored:
        if self._closed:
            raise RuntimeError("archive is closed")
        if not copies:
            return Stored(self._id_of, (), None)
        text = encode_stanza(stanza)
        keys = [self._owner_key(c.owner, create=True) for c in copies]
        pks = [(key[0] << PEER_BITS) | self._peer_id(c.peer) for key, c in zip(keys, copies)]
        now = int(self._clock() * 1_000_000)
        epoch = self._epoch
        with self.db.transaction() as tx:
            locked = tx.execute("SELECT id, last_n, last_stamp FROM mam_owners WHERE id = ANY(?) ORDER BY id FOR UPDATE",
                                (sorted({key[0] for key in keys}),)).fetchall()
            stamp = max([now] + [row[2] for row in locked])
            last_n = {row[0]: row[1] for row in locked}
            entries, rows = [], []
            (body,) = tx.execute("INSERT INTO mam_body (stamp, stanza) VALUES (?, ?) RETURNING id", (stamp, text)).fetchone()
            for key, pk, c in zip(keys, pks, copies):
                n = last_n[key[0]] = last_n[key[0]] + 1
                (pn,) = tx.execute("INSERT INTO mam_pairs (pk, last_pn) VALUES (?, 1) ON CONFLICT (pk) DO UPDATE"
                                   " SET last_pn = mam_pairs.last_pn + 1 RETURNING last_pn", (pk,)).fetchone()
                rows.append(((key[0] << N_BITS) | n, pk, pn, stamp, (epoch << 1) | c.outgoing, c.resource, body))
                entries.append((OwnerState(key[0], n, key[1]), n, epoch))
            tx.executemany("UPDATE mam_owners SET last_n = ?, last_stamp = ? WHERE id = ?",
                           [(n, stamp, o) for o, n in last_n.items()])
            tx.executemany("INSERT INTO mam_archive (k, pk, pn, stamp, flags, resource, body) VALUES (?,?,?,?,?,?,?)",
                           rows)
        return Stored(self._id_of, entries, (body, rows))

    def _id_of(self, entry: tuple) -> str:
        owner, n, epoch = entry
        return self._encode(n, owner, epoch)

    @_unavailable_as_archive_error
    def retract(self, token) -> int:
        """Delete the message's rows; an ordinal still the last one given is handed back (then
        this node takes a new epoch, so the ids already seen name nothing), else a hole stays."""
        if token is None:
            return 0
        body, rows = token
        reused = False
        with self.db.transaction() as tx:
            deleted = tx.execute("DELETE FROM mam_archive WHERE k = ANY(?) AND flags = ANY(?)",
                                 ([row[0] for row in rows], [row[4] for row in rows])).rowcount
            if not deleted:
                return 0
            tx.execute("DELETE FROM mam_body WHERE id = ?", (body,))
            for k, pk, pn, *_ in rows:
                reused |= tx.execute("UPDATE mam_owners SET last_n = last_n - 1 WHERE id = ? AND last_n = ?",
                                     (k >> N_BITS, k & N_MAX)).rowcount > 0
                tx.execute("UPDATE mam_pairs SET last_pn = last_pn - 1 WHERE pk = ? AND last_pn = ?", (pk, pn))
        if reused:
            self._epoch = self._next_epoch()
        return deleted

    def flush(self) -> int:
        return 0  # nothing is queued: store() commits

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
        if prefs.default not in POLICIES:
            raise ValueError(f"default must be one of {POLICIES}")
        if len(prefs.always) > MAX_PREF_JIDS or len(prefs.never) > MAX_PREF_JIDS:
            raise ValueError(f"at most {MAX_PREF_JIDS} JIDs per list")
        never = tuple(dict.fromkeys(prefs.never))
        always = tuple(j for j in dict.fromkeys(prefs.always) if j not in never)
        applied = Prefs(prefs.default, always, never)
        self.db.execute("INSERT INTO mam_prefs (owner, dflt, always, never) VALUES (?, ?, ?, ?) ON CONFLICT (owner)"
                        " DO UPDATE SET dflt = EXCLUDED.dflt, always = EXCLUDED.always, never = EXCLUDED.never",
                        (owner, applied.default, json.dumps(list(always)), json.dumps(list(never))))
        self._prefs[owner] = (time.monotonic(), applied)
        return applied

    # -- retention --------------------------------------------------------------------------

    def expire(self, before: float, yield_between: bool = False) -> int:
        """Each owner's prefix older than ``before`` (§3.2: no holes), then the stanzas."""
        cutoff = int(before * 1_000_000)
        deleted = 0
        last_owner = 0
        while True:
            owners = self.db.execute("SELECT id, last_n FROM mam_owners WHERE id > ? ORDER BY id LIMIT 500",
                                     (last_owner,)).fetchall()
            if not owners:
                break
            for o, last_n in owners:
                last_owner = o
                first = self._edge(o, 1, N_MAX, None, last=False)
                if first is None or first[1] >= cutoff:
                    continue
                keep = self._first_where(o, first[0], last_n, None, lambda r: r[1] >= cutoff)
                stop = (keep - 1) if keep is not None else last_n
                deleted += self.db.execute("DELETE FROM mam_archive WHERE k BETWEEN ? AND ?",
                                           ((o << N_BITS) | first[0], (o << N_BITS) | stop)).rowcount
                if yield_between:
                    gevent.sleep(0)
        self.db.execute("DELETE FROM mam_body WHERE stamp < ?", (cutoff,))
        if deleted:
            log.info("archive retention: %d expired entries deleted", deleted)
        return deleted

    def start(self) -> None:
        if self.expires_after is not None and self._cleaner is None:
            self._cleaner = gevent.spawn(self._cleanup_loop)

    def _cleanup_loop(self) -> None:
        while not self._closed:
            try:
                self.expire(self._clock() - self.expires_after, yield_between=True)
            except StorageUnavailable as exc:
                log.warning("archive retention postponed: %s", exc)
            except Exception:  # noqa: BLE001 - keep retention running; the next turn retries
                log.exception("archive retention failed")
            gevent.sleep(self.cleanup_interval)

    def close(self) -> None:
        if self._cleaner is not None:
            self._cleaner.kill(block=False)
        self._closed = True  # the database is the wiring's: closed there
