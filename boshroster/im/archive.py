"""Message archive storage for XEP-0313 (MAM) behind one small interface.

``MessageArchive`` is the interface mam.py and the wiring use; ``SqliteArchive``
implements it in one SQLite file in ``data_dir`` (WAL).  Another database can
implement the same methods later (the ordinals and key packing below are an
SQLite detail, not part of the interface).

What a stored message is (XEP-0313 §3): per archive owner (a bare JID), the
peer's bare JID and resource, the direction, a server-assigned id (XEP-0359),
a timestamp, and the serialized stanza (stored once per message even when both
parties archive it, §5.1.1 "store ... only once").

**Order and timestamps.**  Every message gets a per-owner ordinal ``n`` (1, 2,
3, ... never reused) and a timestamp that never goes backwards across the whole
store (``max(now, last)``), so ``n`` order == time order == the order the
client received them (§3.1), a time bound is a position in ``n`` (found by
binary search, no timestamp index), and retention deletes a prefix (§3.2: no
holes).  Because ``n`` has no holes, counts (XEP-0059 ``<count/>``) are a
subtraction, not a scan; per-(owner, peer) ordinals ``pn`` do the same for
queries filtered by a bare ``with``.

**Ids.**  XEP-0359 §6: ids must be unpredictable and must not reveal e.g. the
archive size.  An id is AES-128 (the ``cryptography`` package) of the 16-byte
block (n, epoch, 6 bytes of SHA-256(owner)) under a key kept in the database:
unique, opaque, and decodable straight back to the row (no id index to
maintain on every write).  ``epoch`` counts the store's openings: an id handed
out for a message that a crash lost before commit can never name another
message later, even though its ``n`` is given again.

**Writes are batched.**  ``store`` assigns the id, ordinal and timestamp at
once (the caller stamps the id on the live copy) and queues the row; a writer
commits the queue in one transaction per loop turn or per ``flush_interval``
seconds, in chunks of at most ``_CHUNK`` messages with a yield between chunks
(sqlite3 calls do not yield to other greenlets, so each transaction is kept
short).  The queue is bounded (``max_pending``): when full, the caller flushes
synchronously (back-pressure, never a drop).  A crash loses at most what was
queued: at most ``flush_interval`` seconds of messages and never more than
``max_pending`` messages.  Committed data survives a process crash; with
``synchronous=NORMAL`` in WAL mode an OS crash or power loss can also roll back
the last transactions.  Queries flush first, so a query sees every message
stored before it.

Greenlet safety: one SqliteArchive per process, shared by all greenlets.  Its
in-memory state (queue, counters, caches) is mutated only by ``store`` (any
greenlet, no yield inside), by the flush (under ``_lock``) and by ``expire``
(background greenlet, under ``_lock`` per chunk).  Only one process may open
the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import gevent
import gevent.lock
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

log = logging.getLogger("boshroster.archive")

POLICIES = ("always", "never", "roster")  # XEP-0441 §2.1.1 'default' values
MAX_PREF_JIDS = 1000  # per list; a longer list is refused (policy-violation in mam.py)


class ItemNotFound(LookupError):
    """An id given in a query is not in this archive (XEP-0313 §4.1.3 / §4.3.2: item-not-found)."""


@dataclass(frozen=True, slots=True)
class Copy:
    """One archive entry for one message: whose archive, and who the other party is."""

    owner: str  # bare JID of the archive owner
    peer: str  # bare JID of the other party (the owner's own for a note to self)
    resource: str | None  # the other party's resource, if the address had one
    outgoing: bool  # sent by the owner


@dataclass(frozen=True, slots=True)
class ArchivedMessage:
    id: str
    stamp: float  # seconds since the epoch, UTC
    outgoing: bool
    peer: str
    resource: str | None
    stanza: str


@dataclass
class ArchiveQuery:
    """Filters (XEP-0313 §4.1) and one RSM page request (XEP-0059)."""

    with_jid: str | None = None  # bare JID
    with_resource: str | None = None  # set: match this full JID only (§4.1.1)
    start: float | None = None  # inclusive
    end: float | None = None  # inclusive
    after_id: str | None = None  # exclusive (form field, #extended)
    before_id: str | None = None  # exclusive (form field, #extended)
    ids: Sequence[str] | None = None  # only these (form field, #extended)
    max: int = 50
    after: str | None = None  # RSM <after>: page forwards from here
    before: str | None = None  # RSM <before>: "" = the last page, else page backwards from here
    index: int | None = None  # RSM <index>: page starting at this position


@dataclass
class ArchivePage:
    items: list[ArchivedMessage]  # chronological
    complete: bool  # no more items in the paging direction (XEP-0313 §4.3.2 'complete')
    count: int  # size of the full result set (form filters, not the page)
    first_index: int | None  # position of items[0] in the full set


@dataclass(frozen=True)
class Prefs:
    """XEP-0441 archiving preferences of one user."""

    default: str = "always"
    always: tuple[str, ...] = ()
    never: tuple[str, ...] = ()

    def archives(self, peer_bare: str, peer_full: str | None, in_roster: Callable[[str], bool] | None) -> bool:
        """XEP-0441 §2.3: a listed bare JID matches any resource, a listed full JID only itself.
        A JID in both lists is not archived (never wins: the privacy-preserving reading)."""
        if peer_bare in self.never or (peer_full is not None and peer_full in self.never):
            return False
        if peer_bare in self.always or (peer_full is not None and peer_full in self.always):
            return True
        if self.default == "always":
            return True
        if self.default == "roster":
            return bool(in_roster and in_roster(peer_bare))
        return False


def parse_duration(value: str | int | float) -> float | None:
    """``archive_expires_after``: "never" -> None; "3600" or 3600 -> seconds; "1w", "2d", "12h",
    "3m" (months, 31 days, as Prosody), "1y".  Raise ValueError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("archive_expires_after must be positive")
        return float(value)
    text = str(value).strip().lower()
    if text == "never":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([shdwmy]?)", text)
    if not match:
        raise ValueError(f"archive_expires_after: cannot read {value!r} (e.g. \"1w\", \"30d\", \"never\", seconds)")
    unit = {"": 1, "s": 1, "h": 3600, "d": 86400, "w": 7 * 86400, "m": 31 * 86400, "y": 365.2425 * 86400}
    seconds = float(match.group(1)) * unit[match.group(2)]
    if seconds <= 0:
        raise ValueError("archive_expires_after must be positive")
    return seconds


class MessageArchive(ABC):
    """What the protocol layer needs from a store.  Owners and peers are bare JID strings."""

    @abstractmethod
    def store(self, stanza: str, copies: Sequence[Copy]) -> list[str]:
        """Archive ``stanza`` (serialized) in each copy's archive; return the ids, in order.
        Must not block on I/O for long: the id is needed before the live copy is sent."""

    @abstractmethod
    def query(self, owner: str, q: ArchiveQuery) -> ArchivePage:
        """One page; raise ItemNotFound for an unknown id in after_id/before_id/ids/after/before."""

    @abstractmethod
    def bounds(self, owner: str) -> tuple[ArchivedMessage, ArchivedMessage] | None:
        """First and last message (XEP-0313 §5 archive metadata), None if empty."""

    @abstractmethod
    def prefs(self, owner: str) -> Prefs: ...

    @abstractmethod
    def set_prefs(self, owner: str, prefs: Prefs) -> Prefs:
        """Store and return the applied preferences."""

    @abstractmethod
    def expire(self, before: float) -> int:
        """Delete every message older than ``before``; return how many archive entries went."""

    @abstractmethod
    def flush(self) -> int:
        """Commit what is queued; return how many messages were written."""

    def start(self) -> None:
        """Start background work (retention)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release."""


# --- SQLite implementation ----------------------------------------------------------------

_N_BITS = 40  # per-owner ordinal: 2^40 messages per owner
_N_MAX = (1 << _N_BITS) - 1
_OWNER_MAX = (1 << 23) - 1  # owner ids (k = owner << 40 | n stays below 2^63)
_PEER_BITS = 31
_PEER_MASK = (1 << _PEER_BITS) - 1
_CHUNK = 500  # messages per write transaction (a few ms); the writer yields between chunks
_EXPIRE_CHUNK = 2000  # archive entries deleted per transaction by retention
_CACHE_MAX = 100_000  # owners / peers / pairs remembered in memory before the caches are reset
_PREFS_CACHE_MAX = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) ;
CREATE TABLE IF NOT EXISTS owners (id INTEGER PRIMARY KEY, jid TEXT NOT NULL UNIQUE, last_n INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS peers (id INTEGER PRIMARY KEY, jid TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS body (id INTEGER PRIMARY KEY, stamp INTEGER NOT NULL, stanza TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS archive (
    k INTEGER PRIMARY KEY,      -- owner id << 40 | n: one owner's messages are one rowid range, in order
    pk INTEGER NOT NULL,        -- owner id << 31 | peer id
    pn INTEGER NOT NULL,        -- ordinal within (owner, peer): counts for 'with' queries
    stamp INTEGER NOT NULL,     -- microseconds since the epoch, never decreasing in n
    flags INTEGER NOT NULL,     -- bit 0: outgoing; bits 1..: epoch of the id
    resource TEXT,              -- the peer's resource, for a full-JID 'with'
    body INTEGER NOT NULL       -- body.id: the stanza, shared by both parties' copies
);
CREATE INDEX IF NOT EXISTS archive_pair ON archive(pk);  -- (pk, rowid): a conversation in order
CREATE TABLE IF NOT EXISTS prefs (owner TEXT PRIMARY KEY, dflt TEXT NOT NULL, always TEXT NOT NULL, never TEXT NOT NULL);
"""


class _Owner:
    __slots__ = ("id", "last_n", "check")

    def __init__(self, owner_id: int, last_n: int, check: bytes):
        self.id = owner_id
        self.last_n = last_n
        self.check = check


def _check(owner: str) -> bytes:
    return hashlib.sha256(owner.encode("utf-8")).digest()[:6]


class SqliteArchive(MessageArchive):
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
        self.db.executescript(_SCHEMA)
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
        self._flush_scheduled = False
        self._owners: dict[str, _Owner] = {}
        self._peers: dict[str, int] = {}
        self._pairs: dict[int, int] = {}  # pk -> last pn
        self._prefs: dict[str, Prefs] = {}
        self._last_full_warning = 0.0
        self._cleaner: gevent.Greenlet | None = None
        self._closed = False

    # -- ids -------------------------------------------------------------------------------

    def _encode(self, n: int, owner: _Owner, epoch: int) -> str:
        block = n.to_bytes(6, "big") + epoch.to_bytes(4, "big") + owner.check
        return base64.urlsafe_b64encode(self._enc.update(block))[:22].decode("ascii")

    def _decode(self, owner: str, sid: str) -> tuple[int, int] | None:
        """(n, epoch) if ``sid`` is one of ours for ``owner``; None otherwise (forged, foreign, garbage)."""
        if len(sid) != 22:
            return None
        try:
            block = base64.urlsafe_b64decode(sid + "==")
        except (binascii.Error, ValueError):
            return None
        if len(block) != 16 or base64.urlsafe_b64encode(block)[:22].decode("ascii") != sid:
            return None
        plain = self._dec.update(block)
        if plain[10:] != _check(owner):
            return None
        return int.from_bytes(plain[:6], "big"), int.from_bytes(plain[6:10], "big")

    # -- writing ---------------------------------------------------------------------------

    def _meta(self, key: str):
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _owner(self, owner: str, create: bool) -> _Owner | None:
        state = self._owners.get(owner)
        if state is None:
            row = self.db.execute("SELECT id, last_n FROM owners WHERE jid=?", (owner,)).fetchone()
            if row is None:
                if not create:
                    return None
                # Once per owner ever; a tiny transaction of its own.
                cur = self.db.execute("INSERT INTO owners (jid, last_n) VALUES (?, 0)", (owner,))
                row = (cur.lastrowid, 0)
            if row[0] > _OWNER_MAX:
                raise RuntimeError("archive: too many owners for the key layout")
            state = self._owners[owner] = _Owner(row[0], row[1], _check(owner))
        return state

    def store(self, stanza: str, copies: Sequence[Copy]) -> list[str]:
        if self._closed:
            raise RuntimeError("archive is closed")
        if not copies:
            return []
        now = int(self._clock() * 1_000_000)
        if now < self._last_stamp:
            now = self._last_stamp  # the clock went back: keep time order == archive order
        self._last_stamp = now
        self._body_seq += 1
        rows = []
        ids = []
        for c in copies:
            owner = self._owner(c.owner, create=True)
            owner.last_n += 1
            rows.append((owner.id, owner.last_n, c.peer, c.resource, c.outgoing))
            ids.append(self._encode(owner.last_n, owner, self._epoch))
        self._pending.append(((self._body_seq, now, stanza), rows))
        if len(self._pending) >= self.max_pending:
            if now / 1e6 - self._last_full_warning > 60:
                self._last_full_warning = now / 1e6
                log.warning("archive write queue full (%d messages): flushing in the sender's greenlet", len(self._pending))
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            if self.flush_interval > 0:
                gevent.spawn_later(self.flush_interval, self._background_flush)
            else:
                gevent.spawn(self._background_flush)  # next loop turn
        return ids

    def _background_flush(self) -> None:
        try:
            self._flush(yield_between=True)
        except Exception:  # noqa: BLE001 - a background writer must not die silently
            log.exception("archive flush failed")

    def flush(self) -> int:
        return self._flush(yield_between=False)

    def _flush(self, yield_between: bool) -> int:
        written = 0
        with self._lock:
            self._flush_scheduled = False
            while self._pending:
                chunk = self._pending[:_CHUNK]
                try:
                    self._write(chunk)
                except sqlite3.Error as exc:
                    self._write_failed(exc)
                    break
                del self._pending[: len(chunk)]
                written += len(chunk)
                if yield_between and self._pending:
                    self._lock.release()
                    try:
                        gevent.sleep(0)
                    finally:
                        self._lock.acquire()
            if not self._pending and (len(self._owners) > _CACHE_MAX or len(self._peers) > _CACHE_MAX
                                      or len(self._pairs) > _CACHE_MAX):
                self._reset_caches()
        return written

    def _peer_id(self, jid: str) -> int:
        peer = self._peers.get(jid)
        if peer is None:
            row = self.db.execute("SELECT id FROM peers WHERE jid=?", (jid,)).fetchone()
            if row is None:
                row = (self.db.execute("INSERT INTO peers (jid) VALUES (?)", (jid,)).lastrowid,)
            peer = self._peers[jid] = row[0]
            if peer > _PEER_MASK:
                raise RuntimeError("archive: too many peers for the key layout")
        return peer

    def _last_pn(self, pk: int) -> int:
        last = self._pairs.get(pk)
        if last is None:
            row = self.db.execute("SELECT pn FROM archive WHERE pk=? ORDER BY k DESC LIMIT 1", (pk,)).fetchone()
            last = row[0] if row else 0
        return last

    def _write(self, chunk: list[tuple[tuple, list[tuple]]]) -> None:
        """One transaction: the bodies, the archive rows, the owners' counters."""
        db = self.db
        flags_epoch = self._epoch << 1
        pairs = self._pairs
        db.execute("BEGIN")
        try:
            bodies = []
            rows = []
            last_n: dict[int, int] = {}
            for body, copies in chunk:
                bodies.append(body)
                bid, stamp = body[0], body[1]
                for owner_id, n, peer, resource, outgoing in copies:
                    pk = (owner_id << _PEER_BITS) | self._peer_id(peer)
                    pn = pairs[pk] = self._last_pn(pk) + 1
                    rows.append(((owner_id << _N_BITS) | n, pk, pn, stamp, flags_epoch | outgoing, resource, bid))
                    last_n[owner_id] = n
            db.executemany("INSERT INTO body (id, stamp, stanza) VALUES (?, ?, ?)", bodies)
            db.executemany("INSERT INTO archive (k, pk, pn, stamp, flags, resource, body) VALUES (?,?,?,?,?,?,?)", rows)
            db.executemany("UPDATE owners SET last_n=? WHERE id=? AND last_n<?", [(n, o, n) for o, n in last_n.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._pairs.clear()  # counters read inside the rolled-back transaction
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
        self._owners.clear()
        self._peers.clear()
        self._pairs.clear()

    # -- reading ---------------------------------------------------------------------------

    def _row_at(self, owner: str, o: _Owner, sid: str) -> int:
        """n of the message ``sid`` in this archive; ItemNotFound otherwise."""
        decoded = self._decode(owner, sid)
        if decoded is not None:
            n, epoch = decoded
            row = self.db.execute("SELECT flags FROM archive WHERE k=?", ((o.id << _N_BITS) | n,)).fetchone()
            if row is not None and row[0] >> 1 == epoch:
                return n
        raise ItemNotFound(sid)

    def _edge(self, o: int, lo: int, hi: int, pk: int | None, last: bool):
        """First (or last) row of the owner in n-range [lo, hi], in the pair ``pk`` if given:
        (n, stamp, pn) or None."""
        if lo > hi:
            return None
        order = "DESC" if last else ""
        base = o << _N_BITS
        if pk is None:
            sql = f"SELECT k, stamp, pn FROM archive WHERE k BETWEEN ? AND ? ORDER BY k {order} LIMIT 1"
            row = self.db.execute(sql, (base | lo, base | hi)).fetchone()
        else:
            sql = f"SELECT k, stamp, pn FROM archive WHERE pk=? AND k BETWEEN ? AND ? ORDER BY k {order} LIMIT 1"
            row = self.db.execute(sql, (pk, base | lo, base | hi)).fetchone()
        return None if row is None else (row[0] & _N_MAX, row[1], row[2])

    def _first_where(self, o: int, lo: int, hi: int, pk: int | None, pred) -> int | None:
        """Smallest n in [lo, hi] (of the pair ``pk`` if given) whose row satisfies ``pred``,
        a predicate monotonic in n (false ... true).  Binary search: O(log(hi-lo)) seeks."""
        answer = None
        while lo <= hi:
            mid = (lo + hi) // 2
            row = self._edge(o, mid, hi, pk, last=False)
            if row is None:
                hi = mid - 1
            elif pred(row):
                answer = row[0]
                hi = mid - 1  # rows in [mid, row.n) do not exist
            else:
                lo = row[0] + 1
        return answer

    def query(self, owner: str, q: ArchiveQuery) -> ArchivePage:
        self.flush()
        o = self._owner(owner, create=False)
        empty = ArchivePage([], True, 0, None)
        if o is None:
            for sid in (q.after_id, q.before_id, q.after, q.before or None, *(q.ids or ())):
                if sid is not None:
                    raise ItemNotFound(sid)
            return empty
        # Every id named must exist, whatever the other filters (XEP-0313 §4.1.3, §4.3.2).
        after_n = self._row_at(owner, o, q.after_id) if q.after_id is not None else None
        before_n = self._row_at(owner, o, q.before_id) if q.before_id is not None else None
        rsm_after = self._row_at(owner, o, q.after) if q.after is not None else None
        rsm_before = self._row_at(owner, o, q.before) if q.before else None
        id_ns = sorted({self._row_at(owner, o, sid) for sid in q.ids}) if q.ids else None

        pk = None
        if q.with_jid is not None:
            peer = self._peers.get(q.with_jid)
            if peer is None:
                row = self.db.execute("SELECT id FROM peers WHERE jid=?", (q.with_jid,)).fetchone()
                if row is None:
                    return empty
                peer = row[0]
            pk = (o.id << _PEER_BITS) | peer

        # The full result set is the n-range [lo, hi] of the owner (then pk / resource / ids).
        first = self._edge(o.id, 1, _N_MAX, None, last=False)
        if first is None:
            return empty
        lo, hi = first[0], o.last_n
        start = q.start
        if self.expires_after is not None:
            cutoff = self._clock() - self.expires_after
            if start is None or start < cutoff:
                start = cutoff  # expired but not cleaned up yet: already gone for the client
        if start is not None:
            start_us = int(start * 1_000_000)
            if first[1] < start_us:
                n = self._first_where(o.id, lo, hi, None, lambda r: r[1] >= start_us)
                lo = hi + 1 if n is None else n
        if q.end is not None:
            end_us = int(q.end * 1_000_000)
            n = self._first_where(o.id, lo, hi, None, lambda r: r[1] > end_us)
            if n is not None:
                hi = n - 1
        if after_n is not None:
            lo = max(lo, after_n + 1)
        if before_n is not None:
            hi = min(hi, before_n - 1)

        resource = q.with_resource if pk is not None else None
        if id_ns is not None:
            return self._page_of_ids(o, [n for n in id_ns if lo <= n <= hi], pk, resource, q, rsm_after, rsm_before)
        if resource is not None:
            return self._page_scan(o, lo, hi, pk, resource, q, rsm_after, rsm_before)

        set_first = self._edge(o.id, lo, hi, pk, last=False)
        if set_first is None:
            return empty
        set_last = self._edge(o.id, lo, hi, pk, last=True)
        ordinal = 0 if pk is None else 2  # n, or pn within the pair: both without holes
        count = set_last[ordinal] - set_first[ordinal] + 1
        page_lo, page_hi = lo, hi
        if q.index is not None:
            if pk is None:
                page_lo = set_first[0] + q.index
            else:
                target = set_first[2] + q.index
                n = self._first_where(o.id, lo, hi, pk, lambda r: r[2] >= target)
                page_lo = hi + 1 if n is None else n
        if rsm_after is not None:
            page_lo = max(page_lo, rsm_after + 1)
        if rsm_before is not None:
            page_hi = min(page_hi, rsm_before - 1)
        rows = self._fetch(o, page_lo, page_hi, pk, None, q.max, backwards=q.before is not None)
        page = self._page(rows, q)
        first_index = None
        if page:
            first_index = page[0][ordinal] - set_first[ordinal]
        return ArchivePage([m for _n, _st, _pn, m in page], len(rows) <= q.max, count, first_index)

    @staticmethod
    def _page(rows: list, q: ArchiveQuery) -> list:
        """At most q.max rows, chronological (rows came newest first when paging backwards)."""
        rows = rows[: q.max]
        if q.before is not None:
            rows.reverse()
        return rows

    _COLUMNS = ("SELECT a.k, a.stamp, a.pn, a.flags, p.jid, a.resource, b.stanza FROM archive a"
                " JOIN body b ON b.id = a.body JOIN peers p ON p.id = (a.pk & %d)" % _PEER_MASK)

    def _fetch(self, o: _Owner, lo: int, hi: int, pk: int | None, resource: str | None, limit: int,
               backwards: bool) -> list[tuple[int, int, int, ArchivedMessage]]:
        """Up to limit+1 rows (n, stamp, pn, message) in [lo, hi], from the low end (or the
        high end if ``backwards``): the extra row says whether the page is complete."""
        if lo > hi:
            return []
        base = o.id << _N_BITS
        sql = self._COLUMNS + " WHERE a.k BETWEEN ? AND ?"
        args: list = [base | lo, base | hi]
        if pk is not None:
            sql += " AND a.pk=?"
            args.append(pk)
        if resource is not None:
            sql += " AND a.resource=?"
            args.append(resource)
        sql += " ORDER BY a.k DESC LIMIT ?" if backwards else " ORDER BY a.k LIMIT ?"
        args.append(limit + 1)
        return [self._item(o, row) for row in self.db.execute(sql, args)]

    def _item(self, o: _Owner, row) -> tuple[int, int, int, ArchivedMessage]:
        k, stamp, pn, flags, peer, resource, stanza = row
        n = k & _N_MAX
        sid = self._encode(n, o, flags >> 1)
        return n, stamp, pn, ArchivedMessage(sid, stamp / 1_000_000, bool(flags & 1), peer, resource, stanza)

    def _page_scan(self, o, lo, hi, pk, resource, q, rsm_after, rsm_before) -> ArchivePage:
        """Full-JID 'with' (rare): no ordinal to subtract, so counts are COUNT(*) over the
        conversation with that bare JID, bounded by its length."""
        base = o.id << _N_BITS
        where = "pk=? AND k BETWEEN ? AND ? AND resource=?"

        def count_upto(n_hi: int) -> int:
            args = (pk, base | lo, base | n_hi, resource)
            return self.db.execute(f"SELECT COUNT(*) FROM archive WHERE {where}", args).fetchone()[0]

        count = count_upto(hi) if lo <= hi else 0
        if count == 0:
            return ArchivePage([], True, 0, None)
        page_lo, page_hi = lo, hi
        if q.index is not None:
            row = self.db.execute(f"SELECT k FROM archive WHERE {where} ORDER BY k LIMIT 1 OFFSET ?",
                                  (pk, base | lo, base | hi, resource, q.index)).fetchone()
            page_lo = hi + 1 if row is None else row[0] & _N_MAX
        if rsm_after is not None:
            page_lo = max(page_lo, rsm_after + 1)
        if rsm_before is not None:
            page_hi = min(page_hi, rsm_before - 1)
        rows = self._fetch(o, page_lo, page_hi, pk, resource, q.max, backwards=q.before is not None)
        page = self._page(rows, q)
        first_index = count_upto(page[0][0] - 1) if page else None
        return ArchivePage([m for _n, _st, _pn, m in page], len(rows) <= q.max, count, first_index)

    def _page_of_ids(self, o, ns, pk, resource, q, rsm_after, rsm_before) -> ArchivePage:
        """The 'ids' field (XEP-0313 §4.1.3): those messages that also pass the other filters,
        paged by RSM like any result set."""
        base = o.id << _N_BITS
        found = []
        for n in ns:
            sql = self._COLUMNS + " WHERE a.k=?"
            args: list = [base | n]
            if pk is not None:
                sql += " AND a.pk=?"
                args.append(pk)
            if resource is not None:
                sql += " AND a.resource=?"
                args.append(resource)
            row = self.db.execute(sql, args).fetchone()
            if row is not None:
                found.append(self._item(o, row))
        position = {row[0]: i for i, row in enumerate(found)}
        rows = found
        if q.index is not None:
            rows = rows[q.index:]
        if rsm_after is not None:
            rows = [r for r in rows if r[0] > rsm_after]
        if rsm_before is not None:
            rows = [r for r in rows if r[0] < rsm_before]
        if q.before is not None:
            rows = rows[::-1]  # newest first, as _fetch gives them when paging backwards
        rows = rows[: q.max + 1]
        page = self._page(rows, q)
        first_index = position[page[0][0]] if page else None
        return ArchivePage([m for _n, _st, _pn, m in page], len(rows) <= q.max, len(found), first_index)

    def bounds(self, owner: str) -> tuple[ArchivedMessage, ArchivedMessage] | None:
        self.flush()
        o = self._owner(owner, create=False)
        if o is None:
            return None
        lo = 1
        if self.expires_after is not None:
            cutoff_us = int((self._clock() - self.expires_after) * 1_000_000)
            n = self._first_where(o.id, 1, o.last_n, None, lambda r: r[1] >= cutoff_us)
            if n is None:
                return None
            lo = n
        first = self._fetch(o, lo, o.last_n, None, None, 0, backwards=False)
        last = self._fetch(o, lo, o.last_n, None, None, 0, backwards=True)
        if not first:
            return None
        return first[0][3], last[0][3]

    # -- preferences -----------------------------------------------------------------------

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
        if prefs.default not in POLICIES:
            raise ValueError(f"default must be one of {POLICIES}")
        if len(prefs.always) > MAX_PREF_JIDS or len(prefs.never) > MAX_PREF_JIDS:
            raise ValueError(f"at most {MAX_PREF_JIDS} JIDs per list")
        never = tuple(dict.fromkeys(prefs.never))
        always = tuple(j for j in dict.fromkeys(prefs.always) if j not in never)
        applied = Prefs(prefs.default, always, never)
        self.db.execute(
            "INSERT OR REPLACE INTO prefs (owner, dflt, always, never) VALUES (?, ?, ?, ?)",
            (owner, applied.default, json.dumps(list(always)), json.dumps(list(never))),
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
        last_owner = 0
        while True:
            owners = self.db.execute("SELECT id, last_n FROM owners WHERE id>? ORDER BY id LIMIT 500",
                                     (last_owner,)).fetchall()
            if not owners:
                break
            for o, last_n in owners:
                last_owner = o
                first = self._edge(o, 1, _N_MAX, None, last=False)
                if first is None or first[1] >= cutoff:
                    continue
                keep = self._first_where(o, first[0], last_n, None, lambda r: r[1] >= cutoff)
                stop = (keep - 1) if keep is not None else last_n
                n = first[0]
                base = o << _N_BITS
                while n <= stop:
                    upper = min(stop, n + _EXPIRE_CHUNK - 1)
                    with self._lock:
                        cur = self.db.execute("DELETE FROM archive WHERE k BETWEEN ? AND ?", (base | n, base | upper))
                    deleted += cur.rowcount
                    n = upper + 1
                    if yield_between:
                        gevent.sleep(0)
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

    def start(self) -> None:
        if self.expires_after is not None and self._cleaner is None:
            self._cleaner = gevent.spawn(self._cleanup_loop)

    def _cleanup_loop(self) -> None:
        while not self._closed:
            try:
                self.expire(self._clock() - self.expires_after, yield_between=True)
            except Exception:  # noqa: BLE001 - keep retention running; the next turn retries
                log.exception("archive retention failed")
            gevent.sleep(self.cleanup_interval)

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

