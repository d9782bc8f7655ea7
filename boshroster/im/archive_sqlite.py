"""The message archive in SQLite (``data_dir/archive.sqlite3``, WAL): ``SqliteArchive``.

Implements archive.MessageArchive; the key layout, the ids and the queries are
in archive_sqlite_read.py.  A stanza is stored once per message even when both
parties archive it (XEP-0313 §5.1.1 "store ... only once").

**Order and timestamps.**  Every message gets a per-owner ordinal ``n`` (1, 2,
3, ... never reused) and a timestamp that never goes backwards across the whole
store (``max(now, last)``), so ``n`` order == time order == the order the
client received them (§3.1), a time bound is a position in ``n`` (found by
binary search, no timestamp index), and retention deletes a prefix (§3.2: no
holes).  Because ``n`` has no holes, counts (XEP-0059 ``<count/>``) are a
subtraction, not a scan; per-(owner, peer) ordinals ``pn`` do the same for
queries filtered by a bare ``with``.

**Ids** (archive_sqlite_read.py): AES of (n, epoch, owner check), so no id index.
``epoch`` counts the store's openings (and retractions): an id handed out for
a message that a crash lost before commit, or that was retracted, can never
name another message later, even though its ``n`` is given again.

**Writes are batched.**  ``store`` assigns the ordinals (n, pn), epoch and
timestamp at once and builds the rows (the caller stamps the recipient's id,
computed from them, on the live copy; the sender's id is computed only if
read) and queues them; a writer commits the queue ``flush_interval`` seconds after
its first message (or at the next loop turn), or as soon as ``_CHUNK``
messages are queued, in transactions of at most ``_CHUNK`` messages with a
yield between them (sqlite3 calls do not yield to other greenlets, so each
transaction is kept short).  A commit's cost is mostly per transaction (the
pages at each active owner's and pair's tail are rewritten into the WAL:
~2.5 ms for 100 owners), so fewer, fuller transactions are what make the
archive cheap per message (bench/README.md).  The queue is bounded
(``max_pending``): when full, the caller commits one chunk synchronously
(back-pressure, never a drop; the hub is blocked for one transaction, not
for the whole queue).  A message counts as archived once committed.
**A crash between accept and commit** loses at most what was queued (at most
``flush_interval`` seconds of messages, never more than ``max_pending``): those
messages were delivered live (or are in offline storage, whose
``message-stored`` commits the archive at once), and their ids, already seen
by clients, name nothing after the restart (a new epoch: item-not-found,
never another message).  Committed data survives a process crash; with
``synchronous=NORMAL`` in WAL mode an OS crash or power loss can also roll
back the last transactions.  Queries flush first, so a query sees every
message stored before it.

**Retraction** (``retract``, a message bounced after ``message-accepted``):
still queued, it is dropped and its ordinals handed back when they are still
the last ones, so counts stay exact; the epoch moves on so its ids name
nothing.

Greenlet safety: one SqliteArchive per process, shared by all greenlets.  Its
in-memory state (queue, counters, caches) is mutated only by ``store`` (any
greenlet, no yield inside), by the flush (under ``_lock``), by ``expire``
(background greenlet, under ``_lock`` per chunk) and by ``retract`` (the bouncing
greenlet, under ``_lock``).  Only one process may open the file.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from binascii import b2a_base64
from typing import Callable, Sequence
from xml.etree.ElementTree import Element

import gevent
import gevent.lock
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from boshroster.im.archive import POLICIES, Copy, MessageArchive, Prefs, Stored, applied_prefs, parse_duration
from boshroster.im.archive_sqlite_read import (
    N_BITS,
    N_MAX,
    OWNER_MAX,
    PEER_BITS,
    PEER_MASK,
    SCHEMA,
    OwnerState,
    SqliteReads,
    encode_stanza,
    owner_check,
)

log = logging.getLogger("boshroster.archive")

# PRAGMA user_version: 1 = this layout (stanzas as JSON text, encode_stanza); 0 = the same
# layout, written before the format was recorded.  A later layout raises it.
FORMAT_VERSION = 1
_CHUNK = 500  # messages per write transaction (a few ms); the writer yields between chunks
_EXPIRE_CHUNK = 2000  # archive entries deleted per transaction by retention
_CACHE_MAX = 100_000  # owners / peers / pairs remembered in memory before the caches are reset
_PREFS_CACHE_MAX = 10_000
_URLSAFE = bytes.maketrans(b"+/", b"-_")  # base64url (RFC 4648 §5), as base64.urlsafe_b64encode


class SqliteArchive(SqliteReads, MessageArchive):
    """See the module docstring.  ``clock`` returns seconds (tests inject one)."""

    def __init__(
        self,
        path: str,
        *,
        expires_after: float | None = None,
        cleanup_interval: float = 3600.0,
        flush_interval: float = 0.05,
        max_pending: int = 10000,
        default_policy: str = "always",
        clock: Callable[[], float] = time.time,
    ):
        if default_policy not in POLICIES:
            raise ValueError(f"default archive policy must be one of {POLICIES}")
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.expires_after = expires_after
        self.cleanup_interval = cleanup_interval
        self.flush_interval = flush_interval
        self.max_pending = max(1, max_pending)
        self.default_policy = default_policy
        self._clock = clock
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA cache_size=-32768")  # 32 MiB: the tails of active conversations
        self.db.executescript(SCHEMA)
        self._check_format(path)
        self._lock = gevent.lock.RLock()
        key = self._meta("sid_key")
        if key is None:
            key = os.urandom(16)
            self.db.execute("INSERT INTO meta VALUES ('sid_key', ?)", (key,))
        self._cipher = Cipher(algorithms.AES(bytes(key)), modes.ECB())
        self._enc = self._cipher.encryptor()
        self._dec = self._cipher.decryptor()
        self._epoch = (self._meta("epoch") or 0) + 1
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (self._epoch,))
        row = self.db.execute("SELECT id, stamp FROM body ORDER BY id DESC LIMIT 1").fetchone()
        self._body_seq, self._last_stamp = row if row else (0, 0)
        # Queue: (body row, [(owner id, n, peer, resource, outgoing)]) per message, in order.
        self._pending: list[tuple[tuple, list[tuple]]] = []
        self._flush_timer: gevent.Greenlet | None = None  # commits flush_interval after the oldest queued message
        self._owners: dict[str, OwnerState] = {}
        self._peers: dict[str, int] = {}
        self._pairs: dict[int, int] = {}  # pk -> last pn
        self._routes: dict[tuple[str, str], tuple[OwnerState, int]] = {}  # (owner, peer) -> (state, pk)
        self._prefs: dict[str, Prefs] = {}
        self._last_full_warning = 0.0
        self._cleaner: gevent.Greenlet | None = None
        self._closed = False

    def _check_format(self, path: str) -> None:
        """``PRAGMA user_version``: FORMAT_VERSION once this code has written to the file.
        0 (earlier versions: the same layout) is read as it is and marked.  A newer format is
        refused: its rows could be misread."""
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > FORMAT_VERSION:
            self.db.close()
            raise RuntimeError(f"archive {path}: format {version} was written by a newer boshroster"
                               f" (this one reads formats up to {FORMAT_VERSION})")
        if version < FORMAT_VERSION:
            self.db.execute(f"PRAGMA user_version={FORMAT_VERSION}")
            if version:
                log.info("archive %s: format %d -> %d", path, version, FORMAT_VERSION)

    # -- ids -------------------------------------------------------------------------------

    def _meta(self, key: str):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _owner(self, owner: str, create: bool) -> OwnerState | None:
        state = self._owners.get(owner)
        if state is None:
            row = self.db.execute("SELECT id, last_n FROM owners WHERE jid=?", (owner,)).fetchone()
            if row is None:
                if not create:
                    return None
                # Once per owner ever; a tiny transaction of its own.
                cur = self.db.execute("INSERT INTO owners (jid, last_n) VALUES (?, 0)", (owner,))
                row = (cur.lastrowid, 0)
            if row[0] > OWNER_MAX:
                raise RuntimeError("archive: too many owners for the key layout")
            state = self._owners[owner] = OwnerState(row[0], row[1], owner_check(owner))
        return state

    def store(self, stanza: Element, copies: Sequence[Copy]) -> Stored:
        """Assign each copy its ordinals (n, pn), epoch and stamp now, queue the rows for the
        writer; the ids are computed when read (Stored).  Runs in the sender's greenlet and
        does not yield (a first message of an owner or pair reads or inserts one row)."""
        if self._closed:
            raise RuntimeError("archive is closed")
        if not copies:
            return Stored(self._id_of, (), None)
        now = int(self._clock() * 1_000_000)
        if now < self._last_stamp:
            now = self._last_stamp  # the clock went back: keep time order == archive order
        self._last_stamp = now
        seq = self._body_seq = self._body_seq + 1
        flags = self._epoch << 1
        pairs = self._pairs
        rows = []
        entries = []
        routes = self._routes
        for c in copies:
            route = routes.get((c.owner, c.peer))
            if route is None:
                owner = self._owner(c.owner, create=True)
                route = routes[(c.owner, c.peer)] = (owner, (owner.id << PEER_BITS) | self._peer_id(c.peer))
            owner, pk = route
            n = owner.last_n = owner.last_n + 1
            pn = pairs.get(pk)
            pn = pairs[pk] = (self._last_pn(pk) if pn is None else pn) + 1
            rows.append(((owner.id << N_BITS) | n, pk, pn, now, flags | c.outgoing, c.resource, seq))
            entries.append((owner, n, self._epoch))
        pending = self._pending
        pending.append(((seq, now, encode_stanza(stanza)), rows))
        queued = len(pending)
        if queued >= self.max_pending:
            if now / 1e6 - self._last_full_warning > 60:
                self._last_full_warning = now / 1e6
                log.warning("archive write queue full (%d messages): committing %d in the sender's greenlet",
                            queued, min(queued, _CHUNK))
            self._flush(yield_between=False, chunks=1)
        elif queued % _CHUNK == 0:
            gevent.spawn(self._background_flush)  # a full chunk: commit at the next loop turn, not at the timer
        elif self._flush_timer is None:
            self._start_timer()
        return Stored(self._id_of, entries, (seq, rows, entries))

    def _id_of(self, entry: tuple) -> str:
        owner, n, epoch = entry
        block = self._enc.update(n.to_bytes(6, "big") + epoch.to_bytes(4, "big") + owner.check)
        return b2a_base64(block, newline=False)[:22].translate(_URLSAFE).decode("ascii")

    def retract(self, token) -> int:
        """A bounced message (see MessageArchive.retract).  Usually it is still queued, and
        its copies hold their owners' (and pairs') last ordinals: they are handed back, so
        counts stay exact, and the epoch moves on (persisted at once) so the ids already
        seen name nothing.  Otherwise (committed meanwhile, or later ordinals given out)
        its rows are deleted, leaving holes: a count over them is then too high by one."""
        if token is None:
            return 0
        seq, rows, entries = token
        with self._lock:
            for i in range(len(self._pending) - 1, -1, -1):
                if self._pending[i][0][0] == seq:
                    del self._pending[i]
                    break
            else:
                return self._delete_rows(seq, rows)
            for (owner, n, _epoch), row in zip(entries, rows):
                if owner.last_n == n:
                    owner.last_n = n - 1
                pk, pn = row[1], row[2]
                if self._pairs.get(pk) == pn:
                    self._pairs[pk] = pn - 1
            if self._body_seq == seq:
                self._body_seq = seq - 1
            self._new_epoch()
        return len(rows)

    def _delete_rows(self, seq: int, rows: list) -> int:
        try:
            deleted = 0
            for row in rows:
                deleted += self.db.execute("DELETE FROM archive WHERE k=? AND flags=?", (row[0], row[4])).rowcount
            if deleted:
                self.db.execute("DELETE FROM body WHERE id=?", (seq,))
            return deleted
        except sqlite3.Error as exc:
            log.error("archive: a bounced message could not be removed (%s)", exc)
            return 0

    def _new_epoch(self) -> None:
        """Ids from now on carry a new epoch (rows already queued keep theirs)."""
        self._epoch += 1
        try:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (self._epoch,))
        except sqlite3.Error as exc:
            log.error("archive: the epoch could not be saved (%s)", exc)

    def _start_timer(self) -> None:
        if self.flush_interval > 0:
            self._flush_timer = gevent.spawn_later(self.flush_interval, self._timer_flush)
        else:
            self._flush_timer = gevent.spawn(self._timer_flush)  # next loop turn

    def _timer_flush(self) -> None:
        self._flush_timer = None
        self._background_flush()

    def _background_flush(self) -> None:
        try:
            self._flush(yield_between=True)
        except Exception:  # noqa: BLE001 - a background writer must not die silently
            log.exception("archive flush failed")

    def flush(self) -> int:
        return self._flush(yield_between=False)

    def _flush(self, yield_between: bool, chunks: int | None = None) -> int:
        """Commit the queue in transactions of at most _CHUNK messages (``chunks``: at most
        that many, the rest stays queued for the writer)."""
        written = 0
        with self._lock:
            if self._closed:  # a flush scheduled before close(), which wrote what was queued
                if self._pending:
                    log.warning("archive closed: %d message(s) queued after it were not archived", len(self._pending))
                    self._pending.clear()
                return 0
            while self._pending:
                chunk = self._pending[:_CHUNK]
                try:
                    self._write(chunk)
                except sqlite3.Error as exc:
                    self._write_failed(exc)
                    break
                del self._pending[: len(chunk)]
                written += len(chunk)
                if chunks is not None:
                    chunks -= 1
                    if chunks <= 0:
                        if self._pending and self._flush_timer is None:
                            self._start_timer()
                        break
                if yield_between and self._pending:
                    self._lock.release()
                    try:
                        gevent.sleep(0)
                    finally:
                        self._lock.acquire()
            timer = self._flush_timer
            if not self._pending and timer is not None and timer is not gevent.getcurrent():
                # Emptied before the timer: the next message starts a new one (batches stay full).
                self._flush_timer = None
                timer.kill(block=False)
            if not self._pending and (len(self._owners) > _CACHE_MAX or len(self._peers) > _CACHE_MAX
                                      or len(self._pairs) > _CACHE_MAX or len(self._routes) > _CACHE_MAX):
                self._reset_caches()
        return written

    def _peer_id(self, jid: str) -> int:
        peer = self._peers.get(jid)
        if peer is None:
            row = self.db.execute("SELECT id FROM peers WHERE jid=?", (jid,)).fetchone()
            if row is None:
                row = (self.db.execute("INSERT INTO peers (jid) VALUES (?)", (jid,)).lastrowid,)
            peer = self._peers[jid] = row[0]
            if peer > PEER_MASK:
                raise RuntimeError("archive: too many peers for the key layout")
        return peer

    def _last_pn(self, pk: int) -> int:
        last = self._pairs.get(pk)
        if last is None:
            row = self.db.execute("SELECT pn FROM archive WHERE pk=? ORDER BY k DESC LIMIT 1", (pk,)).fetchone()
            last = row[0] if row else 0
        return last

    def _write(self, chunk: list[tuple[tuple, list[tuple]]]) -> None:
        """One transaction: the bodies, the archive rows (made by ``store``), the owners' counters."""
        db = self.db
        db.execute("BEGIN")
        try:
            rows = [row for _body, copies in chunk for row in copies]
            db.executemany("INSERT INTO body (id, stamp, stanza) VALUES (?, ?, ?)", [body for body, _ in chunk])
            db.executemany("INSERT INTO archive (k, pk, pn, stamp, flags, resource, body) VALUES (?,?,?,?,?,?,?)", rows)
            last_n = {row[0] >> N_BITS: row[0] & N_MAX for row in rows}
            db.executemany("UPDATE owners SET last_n=? WHERE id=? AND last_n<?", [(n, o, n) for o, n in last_n.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _write_failed(self, exc: Exception) -> None:
        """The database refused a write (disk full, I/O error): drop the queue, loudly.

        The ids already handed out for the dropped messages are never reused: the
        counters are reloaded from the database and a new epoch starts."""
        lost = len(self._pending)
        log.error("archive write failed (%s): %d queued message(s) not archived", exc, lost)
        self._pending.clear()
        self._reset_caches()
        self._epoch += 1
        try:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (self._epoch,))
        except sqlite3.Error:
            pass
        row = self.db.execute("SELECT id FROM body ORDER BY id DESC LIMIT 1").fetchone()
        self._body_seq = row[0] if row else 0

    def _reset_caches(self) -> None:
        self._routes.clear()
        self._owners.clear()
        self._peers.clear()
        self._pairs.clear()

    # -- reading ---------------------------------------------------------------------------

    def prefs(self, owner: str) -> Prefs:
        prefs = self._prefs.get(owner)
        if prefs is None:
            row = self.db.execute("SELECT dflt, always, never FROM prefs WHERE owner=?", (owner,)).fetchone()
            if row is None:
                prefs = Prefs(self.default_policy)
            else:
                prefs = Prefs(row[0], tuple(json.loads(row[1])), tuple(json.loads(row[2])))
            if len(self._prefs) >= _PREFS_CACHE_MAX:
                self._prefs.clear()
            self._prefs[owner] = prefs
        return prefs

    def set_prefs(self, owner: str, prefs: Prefs) -> Prefs:
        applied = applied_prefs(prefs)
        self.db.execute(
            "INSERT OR REPLACE INTO prefs (owner, dflt, always, never) VALUES (?, ?, ?, ?)",
            (owner, applied.default, json.dumps(list(applied.always)), json.dumps(list(applied.never))),
        )
        self._prefs[owner] = applied
        return applied

    # -- retention -------------------------------------------------------------------------

    def expire(self, before: float, yield_between: bool = False) -> int:
        """Delete archive entries and stanzas stamped before ``before``, oldest first, in
        transactions of at most _EXPIRE_CHUNK rows (a prefix of each owner's archive, §3.2)."""
        self.flush()
        cutoff = int(before * 1_000_000)
        deleted = 0
        for o, first_n, stop in self._expired_prefixes(cutoff):
            n = first_n
            base = o << N_BITS
            while n <= stop:
                upper = min(stop, n + _EXPIRE_CHUNK - 1)
                with self._lock:
                    cur = self.db.execute("DELETE FROM archive WHERE k BETWEEN ? AND ?", (base | n, base | upper))
                deleted += cur.rowcount
                n = upper + 1
                if yield_between:
                    gevent.sleep(0)
        # Stanzas: body ids are in time order too; both parties' copies of a message share its stamp.
        while True:
            with self._lock:
                cur = self.db.execute(
                    "DELETE FROM body WHERE id IN (SELECT id FROM body ORDER BY id LIMIT ?) AND stamp < ?",
                    (_EXPIRE_CHUNK, cutoff),
                )
            if cur.rowcount < _EXPIRE_CHUNK:
                break
            if yield_between:
                gevent.sleep(0)
        if deleted:
            log.info("archive retention: %d expired entries deleted", deleted)
        return deleted

    def close(self) -> None:
        if self._closed:
            return
        if self._cleaner is not None:
            self._cleaner.kill(block=False)
        self.flush()
        self._closed = True
        self.db.close()


def open_archive(config) -> SqliteArchive:
    """The archive the server uses, from the ``archive_*`` settings."""
    return SqliteArchive(
        os.path.join(config.data_dir, "archive.sqlite3"),
        expires_after=parse_duration(config.archive_expires_after),
        cleanup_interval=config.archive_cleanup_interval,
        flush_interval=config.archive_flush_interval,
        max_pending=config.archive_queue_max,
        default_policy=config.archive_default_policy,
    )
