"""Message archive storage for XEP-0313 (MAM): the interface and its data.

``MessageArchive`` is what mam.py and the wiring use; ``archive_sqlite.SqliteArchive``
implements it in one SQLite file in ``data_dir``, ``cluster/pg_archive.PgArchive`` in
PostgreSQL (``database_url``); both run the same queries and the same tests.  Owners and peers are bare JID strings,
times are seconds since the epoch (UTC), stanzas are ElementTree elements (each
store keeps them in a format of its own).

What a stored message is (XEP-0313 §3): per archive owner, the peer's bare JID
and resource, the direction, a server-assigned id (XEP-0359), a timestamp, and
the stanza.  Pure module: no I/O.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence
from xml.etree.ElementTree import Element

POLICIES = ("always", "never", "roster")  # XEP-0441 §2.1.1 'default' values
MAX_PREF_JIDS = 1000  # per list; a longer list is refused (policy-violation in mam.py)


class ItemNotFound(LookupError):
    """An id given in a query is not in this archive (XEP-0313 §4.1.3 / §4.3.2: item-not-found)."""


class ArchiveUnavailable(Exception):
    """The store cannot be reached now (its database is away): a message goes on without
    an id, a query is refused (internal-server-error, wait)."""


class Unsupported(Exception):
    """A query this store cannot answer cheaply (XEP-0059 §2.5: feature-not-implemented)."""


class Copy(NamedTuple):
    """One archive entry for one message: whose archive, and who the other party is.
    (A NamedTuple: one or two are made per chat message, and it is cheap to make.)"""

    owner: str  # bare JID of the archive owner
    peer: str  # bare JID of the other party (the owner's own for a note to self)
    resource: str | None  # the other party's resource, if the address had one
    outgoing: bool  # sent by the owner


class Stored(Sequence[str]):
    """What ``store`` returns: the ids of the copies, in order, each computed when first read
    (the live path reads only the recipient's; the sender's id is only needed by queries),
    and ``token``, what ``retract`` takes back."""

    __slots__ = ("_make", "_entries", "_ids", "token")

    def __init__(self, make: Callable[[Any], str], entries: Sequence, token: Any):
        self._make = make
        self._entries = entries
        self._ids: list[str | None] = [None] * len(entries)
        self.token = token

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        sid = self._ids[i]
        if sid is None:
            sid = self._ids[i] = self._make(self._entries[i])
        return sid


@dataclass(frozen=True, slots=True)
class ArchivedMessage:
    id: str
    stamp: float  # seconds since the epoch, UTC
    outgoing: bool
    peer: str
    resource: str | None
    stanza: Element | None  # a fresh element; None if the stored form could not be read back


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
    count: int | None  # size of the full result set (form filters, not the page); None: not counted
    first_index: int | None  # position of items[0] in the full set (None: empty page, or not counted)


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


def applied_prefs(prefs: Prefs) -> Prefs:
    """What ``set_prefs`` stores: the default checked, each list bounded (ValueError: mam.py's
    bad-request), duplicates dropped, a JID in both lists kept in ``never`` only."""
    if prefs.default not in POLICIES:
        raise ValueError(f"default must be one of {POLICIES}")
    if len(prefs.always) > MAX_PREF_JIDS or len(prefs.never) > MAX_PREF_JIDS:
        raise ValueError(f"at most {MAX_PREF_JIDS} JIDs per list")
    never = tuple(dict.fromkeys(prefs.never))
    return Prefs(prefs.default, tuple(j for j in dict.fromkeys(prefs.always) if j not in never), never)


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
    def store(self, stanza: Element, copies: Sequence[Copy]) -> Stored:
        """Archive ``stanza`` in each copy's archive; return the ids, in order.  The store
        takes what it needs at once: the caller goes on to add the recipient's id to it.
        Must not block on I/O for long: the id is needed before the live copy is sent."""

    @abstractmethod
    def retract(self, token: Any) -> int:
        """Take back a message ``store`` accepted (``Stored.token``) that was then bounced
        (mam.py: ``message-bounced``): it leaves every archive and its ids name nothing,
        ever.  Return how many archive entries went."""

    @abstractmethod
    def query(self, owner: str, q: ArchiveQuery) -> ArchivePage:
        """One page; raise ItemNotFound for an unknown id in after_id/before_id/ids/after/before,
        Unsupported for what the store cannot do cheaply."""

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
