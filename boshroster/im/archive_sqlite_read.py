"""SQLite archive: the key layout, the ids and the read half (queries) of ``SqliteArchive``.

Layout: an owner's messages are one rowid range of ``archive`` (``k = owner id
<< 40 | n``, ``n`` the per-owner ordinal without holes), a conversation is the
index ``archive_pair`` on ``pk = owner id << 31 | peer id`` (plus the rowid),
stanzas live once in ``body``.  So the latest page is one range scan, a
``with`` page one index range, a count two seeks and a subtraction, and a time
bound a binary search over ``n`` (stamps never decrease in ``n``).

Ids (XEP-0359 §6: unpredictable, revealing nothing such as the archive size):
AES-128 (``cryptography``) of the block (n: 6 bytes, epoch: 4, SHA-256(owner):
6) under the key in ``meta``, base64url: 22 characters that decode straight
back to the row, so no id index is written with every message.

Stanzas are stored as JSON of the element tree, ``[tag, attrib, text, tail, *children]``
(tags and attribute names in ElementTree's ``{namespace}local`` form), in SQLite and
PostgreSQL alike: written and read by the C ``json`` module, it costs a third to a half of
XML serialization and parsing, and it is data, never code.  (A ``marshal`` BLOB was
measured at 2–4 µs per chat message against JSON's 6–9 µs, with no difference through
sockets, and marshal is no storage format: bench/README.md, "The message archive's cost".)

``SqliteReads`` is a mixin: it reads the archive's ``db``, owner states, peers
cache and cipher; it runs in the querying greenlet and never yields.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

import json
import logging
from xml.etree.ElementTree import Element

import gevent

from boshroster.im.archive import ArchivedMessage, ArchivePage, ArchiveQuery, ArchiveUnavailable, ItemNotFound, Unsupported

N_BITS = 40  # per-owner ordinal: 2^40 messages per owner
N_MAX = (1 << N_BITS) - 1
OWNER_MAX = (1 << 23) - 1  # owner ids (k = owner << 40 | n stays below 2^63)
PEER_BITS = 31
PEER_MASK = (1 << PEER_BITS) - 1

SCHEMA = """
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


log = logging.getLogger("boshroster.archive")

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode


def _tree(el: Element) -> list:
    # Leaves (most children of a chat message: body, chat state, receipt request) inline.
    return [el.tag, el.attrib, el.text, el.tail,
            *[[c.tag, c.attrib, c.text, c.tail] if not len(c) else _tree(c) for c in el]]


def encode_stanza(el: Element) -> str:
    """The stored form of a stanza (its tail is not part of it)."""
    return _dumps([el.tag, el.attrib, el.text, None,
                   *[[c.tag, c.attrib, c.text, c.tail] if not len(c) else _tree(c) for c in el]])


def _build(node: list) -> Element:
    el = Element(node[0], node[1])
    el.text = node[2]
    el.tail = node[3]
    for child in node[4:]:
        el.append(_build(child))
    return el


def decode_stanza(text: str) -> Element | None:
    """A fresh element from encode_stanza's form; None (logged) if it is not that."""
    try:
        return _build(json.loads(text))
    except (ValueError, TypeError, IndexError, AttributeError):
        log.error("an archived stanza cannot be read back: %.80r", text)
        return None


class OwnerState:
    """One owner's id, last ordinal handed out (ahead of the database by the write queue)
    and id check bytes; kept by SqliteArchive, written by ``store`` and the flush."""

    __slots__ = ("id", "last_n", "check")

    def __init__(self, owner_id: int, last_n: int, check: bytes):
        self.id = owner_id
        self.last_n = last_n
        self.check = check


def owner_check(owner: str) -> bytes:
    """The 6 bytes inside every id of ``owner``'s archive: an id of another archive fails."""
    return hashlib.sha256(owner.encode("utf-8")).digest()[:6]


class SqliteReads:
    """The read half of SqliteArchive (see the module docstring)."""

    def _encode(self, n: int, owner: OwnerState, epoch: int) -> str:
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
        if plain[10:] != owner_check(owner):
            return None
        return int.from_bytes(plain[:6], "big"), int.from_bytes(plain[6:10], "big")

    # -- writing ---------------------------------------------------------------------------

    def _row_at(self, owner: str, o: OwnerState, sid: str) -> int:
        """n of the message ``sid`` in this archive; ItemNotFound otherwise."""
        decoded = self._decode(owner, sid)
        if decoded is not None:
            n, epoch = decoded
            row = self.db.execute(f"SELECT flags FROM {self.T_ARCHIVE} WHERE k=?", ((o.id << N_BITS) | n,)).fetchone()
            if row is not None and row[0] >> 1 == epoch:
                return n
        raise ItemNotFound(sid)

    def _edge(self, o: int, lo: int, hi: int, pk: int | None, last: bool):
        """First (or last) row of the owner in n-range [lo, hi], in the pair ``pk`` if given:
        (n, stamp, pn) or None."""
        if lo > hi:
            return None
        order = "DESC" if last else ""
        base = o << N_BITS
        if pk is None:
            sql = f"SELECT k, stamp, pn FROM {self.T_ARCHIVE} WHERE k BETWEEN ? AND ? ORDER BY k {order} LIMIT 1"
            row = self.db.execute(sql, (base | lo, base | hi)).fetchone()
        else:
            sql = f"SELECT k, stamp, pn FROM {self.T_ARCHIVE} WHERE pk=? AND k BETWEEN ? AND ? ORDER BY k {order} LIMIT 1"
            row = self.db.execute(sql, (pk, base | lo, base | hi)).fetchone()
        return None if row is None else (row[0] & N_MAX, row[1], row[2])

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
                row = self.db.execute(f"SELECT id FROM {self.T_PEERS} WHERE jid=?", (q.with_jid,)).fetchone()
                if row is None:
                    return empty
                peer = row[0]
            pk = (o.id << PEER_BITS) | peer

        # The full result set is the n-range [lo, hi] of the owner (then pk / resource / ids).
        first = self._edge(o.id, 1, N_MAX, None, last=False)
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

    # Table names: a PostgreSQL database shares its namespace with other stores (cluster/pg_archive.py).
    T_ARCHIVE, T_BODY, T_PEERS, T_OWNERS = "archive", "body", "peers", "owners"

    def _expired_prefixes(self, cutoff: int):
        """(owner id, first n, last n) of each owner's archive prefix stamped before
        ``cutoff``: retention removes the oldest entries first and leaves no holes (§3.2)."""
        last_owner = 0
        while True:
            owners = self.db.execute(f"SELECT id, last_n FROM {self.T_OWNERS} WHERE id > ? ORDER BY id LIMIT 500",
                                     (last_owner,)).fetchall()
            if not owners:
                return
            for o, last_n in owners:
                last_owner = o
                first = self._edge(o, 1, N_MAX, None, last=False)
                if first is None or first[1] >= cutoff:
                    continue
                keep = self._first_where(o, first[0], last_n, None, lambda r: r[1] >= cutoff)
                yield o, first[0], (keep - 1) if keep is not None else last_n

    def start(self) -> None:
        """Retention (both stores): every ``cleanup_interval`` seconds, ``expire`` what is older
        than ``expires_after``.  ``_cleaner``/``_closed`` are the store's (close() kills it)."""
        if self.expires_after is not None and self._cleaner is None:
            self._cleaner = gevent.spawn(self._cleanup_loop)

    def _cleanup_loop(self) -> None:
        while not self._closed:
            try:
                self.expire(self._clock() - self.expires_after, yield_between=True)
            except ArchiveUnavailable as exc:
                log.warning("archive retention postponed: %s", exc)
            except Exception:  # noqa: BLE001 - keep retention running; the next turn retries
                log.exception("archive retention failed")
            gevent.sleep(self.cleanup_interval)

    @property
    def _COLUMNS(self) -> str:
        return (f"SELECT a.k, a.stamp, a.pn, a.flags, p.jid, a.resource, b.stanza FROM {self.T_ARCHIVE} a"
                f" JOIN {self.T_BODY} b ON b.id = a.body JOIN {self.T_PEERS} p ON p.id = (a.pk & {PEER_MASK})")

    def _fetch(self, o: OwnerState, lo: int, hi: int, pk: int | None, resource: str | None, limit: int,
               backwards: bool) -> list[tuple[int, int, int, ArchivedMessage]]:
        """Up to limit+1 rows (n, stamp, pn, message) in [lo, hi], from the low end (or the
        high end if ``backwards``): the extra row says whether the page is complete."""
        if lo > hi:
            return []
        base = o.id << N_BITS
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

    def _item(self, o: OwnerState, row) -> tuple[int, int, int, ArchivedMessage]:
        k, stamp, pn, flags, peer, resource, stanza = row
        n = k & N_MAX
        sid = self._encode(n, o, flags >> 1)
        message = ArchivedMessage(sid, stamp / 1_000_000, bool(flags & 1), peer, resource, decode_stanza(stanza))
        return n, stamp, pn, message

    def _page_scan(self, o, lo, hi, pk, resource, q, rsm_after, rsm_before) -> ArchivePage:
        """Full-JID 'with' (rare): the conversation with that bare JID, filtered by resource.
        No ordinal counts it, and COUNT(*) would read every row of the conversation (165 ms
        for 10,000 on a 1,000,000-message file), so the page has no count and no index
        (XEP-0059 §2.1 lets both be omitted when exceptionally resource intensive) and an
        RSM <index/> is refused (§2.5: feature-not-implemented)."""
        if q.index is not None:
            raise Unsupported("RSM <index/> with a full-JID 'with'")
        page_lo, page_hi = lo, hi
        if rsm_after is not None:
            page_lo = max(page_lo, rsm_after + 1)
        if rsm_before is not None:
            page_hi = min(page_hi, rsm_before - 1)
        rows = self._fetch(o, page_lo, page_hi, pk, resource, q.max, backwards=q.before is not None)
        page = self._page(rows, q)
        return ArchivePage([m for _n, _st, _pn, m in page], len(rows) <= q.max, None, None)

    def _page_of_ids(self, o, ns, pk, resource, q, rsm_after, rsm_before) -> ArchivePage:
        """The 'ids' field (XEP-0313 §4.1.3): those messages that also pass the other filters,
        paged by RSM like any result set."""
        base = o.id << N_BITS
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
