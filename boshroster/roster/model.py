"""Roster value types: what the backend app says a user's contacts are.

Pure module: no I/O, no gevent, every object immutable, so a Roster can be
shared between greenlets and sessions without copying.

The backend contract (README, "The backend contract": the roster GET) is a JSON object keyed
by the contact's bare JID, each value an object with an optional ``name`` and
optional ``groups``.  ``groups`` may be an array of names (what the contract
documents) or an object whose keys are the names (the only form Prosody's
mod_http_roster_admin understood); both are accepted.

Leniency, decided once here (``Roster.from_backend_json``):

* The whole document must be a JSON object, else ``RosterFormatError``.
* A key that is not a valid JID, or that carries a resource, is skipped.
* A value of ``null`` or ``[]`` (PHP's ``json_encode`` of an empty array) means
  "a contact with no details"; any other non-object value skips the contact.
* ``name``: a string (``""`` means no name) or ``null``; any other type skips
  the contact.
* ``groups``: an array, an object, or ``null``; any other type skips the
  contact.  Inside an array, entries that are not non-empty strings are
  skipped (the contact stays).
* Characters that XML 1.0 cannot carry (C0 controls, lone surrogates, U+FFFE,
  U+FFFF) are removed from names and group names, so a roster can always be
  serialised; a group that becomes empty is skipped.
* Two keys that prepare to the same JID (``Marie@x`` and ``marie@x``): the
  first one wins.

Every skip is logged on ``boshroster.roster`` with the username it concerns
(at most ``_MAX_LOGGED`` lines per document, then one summary line).

Every item has ``subscription="both"`` (the contract); that is the session
layer's business and not stored here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import types
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from boshroster.xmpp.jid import JID, JIDError

log = logging.getLogger("boshroster.roster")

__all__ = ["RosterItem", "Roster", "RosterDiff", "RosterFormatError"]

_MAX_LOGGED = 10  # skipped entries logged one by one per document, then a summary
# XML 1.0 Char production, complemented (surrogates included: they cannot be encoded).
_XML_INVALID = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_VER_FORMAT = "boshroster-roster-1"  # bump to change every ver at once


class RosterFormatError(ValueError):
    """The backend's reply is not a JSON object of contacts."""


def _xml_safe(text: str) -> str:
    return _XML_INVALID.sub("", text)


@dataclass(frozen=True)
class RosterItem:
    """One contact.  ``jid`` is a prepared bare JID string; ``groups`` is sorted
    and deduplicated whatever iterable is passed in."""

    jid: str
    name: str | None = None
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        groups = self.groups
        if isinstance(groups, str):  # a lone string is one group, not its characters
            groups = (groups,)
        normalised = tuple(sorted(set(groups)))
        if normalised != self.groups:
            object.__setattr__(self, "groups", normalised)


@dataclass(frozen=True)
class RosterDiff:
    """What changed between two rosters, each tuple sorted by JID.

    ``added`` and ``changed`` hold the new items, ``removed`` the items as they
    were.  ``changed`` means same JID, different name or groups."""

    added: tuple[RosterItem, ...] = ()
    removed: tuple[RosterItem, ...] = ()
    changed: tuple[RosterItem, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


class Roster:
    """An immutable mapping of bare-JID string -> RosterItem, with a ``ver``.

    ``ver`` is a short hex hash of a canonical serialisation (RFC 6121 §2.6,
    the ejabberd approach for rosters it does not own): equal content gives an
    equal ``ver``, whatever the order the backend sent the contacts in.

    The mapping is ``roster.items`` (a read-only view); the roster itself also
    supports ``len()``, iteration over JIDs, ``in`` and ``roster[jid]``.
    """

    __slots__ = ("items", "ver")

    items: Mapping[str, RosterItem]
    ver: str

    def __init__(self, items: Iterable[RosterItem] = ()) -> None:
        table: dict[str, RosterItem] = {}
        for item in items:
            table.setdefault(item.jid, item)
        ordered = {jid: table[jid] for jid in sorted(table)}
        object.__setattr__(self, "items", types.MappingProxyType(ordered))
        object.__setattr__(self, "ver", _compute_ver(ordered.values()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Roster is immutable")

    # -- mapping-ish access (Roster is deliberately not a Mapping subclass:
    #    Mapping.items() would clash with the ``items`` attribute) ----------
    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.items)

    def __contains__(self, jid: object) -> bool:
        return jid in self.items

    def __getitem__(self, jid: str) -> RosterItem:
        return self.items[jid]

    def get(self, jid: str, default: RosterItem | None = None) -> RosterItem | None:
        return self.items.get(jid, default)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Roster):
            return NotImplemented
        return self.ver == other.ver and dict(self.items) == dict(other.items)

    def __hash__(self) -> int:
        return hash(self.ver)

    def __repr__(self) -> str:
        return f"<Roster ver={self.ver} items={len(self.items)}>"

    # -- construction from the backend --------------------------------------
    @classmethod
    def from_backend_json(cls, data: Any, *, log_context: str) -> "Roster":
        """Build a roster from the backend's decoded JSON (see module docstring).

        ``log_context`` is the username the roster belongs to, for log lines.
        Raises RosterFormatError if ``data`` is not a JSON object."""
        if not isinstance(data, dict):
            raise RosterFormatError(
                f"expected a JSON object of contacts, got {json_type_name(data)}")
        skips = _SkipLog(log_context)
        items: dict[str, RosterItem] = {}
        for key, value in data.items():
            item = _parse_contact(key, value, skips)
            if item is None:
                continue
            if item.jid in items:
                skips.skip(key, f"duplicate of contact {item.jid!r} (first one kept)")
                continue
            items[item.jid] = item
        skips.summary()
        return cls(items.values())

    # -- comparison -----------------------------------------------------------
    def diff(self, new: "Roster") -> RosterDiff:
        """What to push to go from this roster to ``new``."""
        old_items, new_items = self.items, new.items
        added = tuple(item for jid, item in new_items.items() if jid not in old_items)
        removed = tuple(item for jid, item in old_items.items() if jid not in new_items)
        changed = tuple(item for jid, item in new_items.items()
                        if jid in old_items and old_items[jid] != item)
        return RosterDiff(added=added, removed=removed, changed=changed)


def _compute_ver(items: Iterable[RosterItem]) -> str:
    canonical = json.dumps(
        [_VER_FORMAT, [[i.jid, i.name, list(i.groups)] for i in items]],
        ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def json_type_name(value: Any) -> str:
    """How a JSON value is named in error messages: 'an object', 'a number', 'null'…"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _SkipLog:
    """Logs skipped entries for one document, bounded."""

    __slots__ = ("context", "count", "notes")

    def __init__(self, context: str) -> None:
        self.context = context
        self.count = 0
        self.notes = 0

    def skip(self, key: Any, why: str) -> None:
        self.count += 1
        if self.count <= _MAX_LOGGED:
            log.warning("roster of %r: skipping contact %s: %s",
                        self.context, _short(key), why)

    def note(self, key: Any, why: str) -> None:
        self.notes += 1
        if self.notes <= _MAX_LOGGED:
            log.info("roster of %r: contact %s: %s", self.context, _short(key), why)

    def summary(self) -> None:
        if self.count > _MAX_LOGGED:
            log.warning("roster of %r: %d contacts skipped in all (%d not logged)",
                        self.context, self.count, self.count - _MAX_LOGGED)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _parse_contact(key: Any, value: Any, skips: _SkipLog) -> RosterItem | None:
    if not isinstance(key, str):  # impossible from json.loads, possible from callers
        skips.skip(key, "key is not a string")
        return None
    try:
        jid = JID.parse(key)
    except JIDError as exc:
        skips.skip(key, f"not a valid JID ({exc})")
        return None
    if not jid.is_bare:
        skips.skip(key, "not a bare JID (has a resource)")
        return None

    if value is None or (isinstance(value, list) and not value):
        value = {}
    elif not isinstance(value, dict):
        skips.skip(key, f"value is {json_type_name(value)}, expected an object")
        return None

    name = value.get("name")
    if name is not None:
        if not isinstance(name, str):
            skips.skip(key, f"name is {json_type_name(name)}, expected a string")
            return None
        name = _xml_safe(name) or None

    raw_groups = value.get("groups")
    if raw_groups is None:
        names: list[Any] = []
    elif isinstance(raw_groups, list):
        names = raw_groups
    elif isinstance(raw_groups, dict):
        names = list(raw_groups)
    else:
        skips.skip(key, f"groups is {json_type_name(raw_groups)}, expected an array or an object")
        return None
    groups = []
    for entry in names:
        group = _xml_safe(entry) if isinstance(entry, str) else ""
        if group:
            groups.append(group)
        else:
            skips.note(key, f"ignoring group entry {_short(entry)}")
    return RosterItem(jid=str(jid), name=name, groups=tuple(groups))
