"""JIDs (RFC 7622), prepared once on input and compared as prepared strings.

Localparts use the PRECIS UsernameCaseMapped profile plus RFC 7622 §3.3.1's
extra exclusions (precis-i18n does not apply those), resources use
OpaqueString, domains are lower-cased and IDNA-checked.  Pure module: no I/O,
no gevent, safe to call from any greenlet.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

import precis_i18n

_USERNAME = precis_i18n.get_profile("UsernameCaseMapped")
_OPAQUE = precis_i18n.get_profile("OpaqueString")
# RFC 7622 §3.3.1: characters a localpart may never contain.
_LOCALPART_EXCLUDED = frozenset("\"&'/:<>@")
_MAX_PART = 1023  # octets, RFC 7622 §3.1

# ASCII fast paths (issue 12: precis-i18n costs ~19 µs per name never seen before, ~0.4 ms for
# a login's roster of 20 new contacts).  Exact, not an approximation:
# * printable ASCII other than space and RFC 7622 §3.3.1's exclusions is PVALID in the
#   IdentifierClass (RFC 8264 §9.11, ASCII7); UsernameCaseMapped's width mapping and NFC are
#   no-ops on it, its case mapping is ``str.lower()``, and the Bidi Rule concerns only strings
#   with right-to-left characters (RFC 8265 §3.3.2): so the prepared form is ``value.lower()``;
# * printable ASCII with space is PVALID in the FreeformClass, and OpaqueString maps only
#   non-ASCII spaces (RFC 8265 §4.2.2): the prepared resource is the value itself.
# 1..1023 characters of ASCII are 1..1023 octets (RFC 7622 §3.1).  Anything else takes the
# PRECIS path; tests/test_jid.py compares both paths on every printable ASCII character.
_ASCII_LOCALPART = re.compile(r"[!#-%(-.0-9;=?A-~]{1,1023}")
_ASCII_RESOURCE = re.compile(r"[ -~]{1,1023}")


class JIDError(ValueError):
    """A JID (or one of its parts) that cannot be prepared: answer jid-malformed."""


@functools.lru_cache(maxsize=65536)
def prep_localpart(value: str) -> str:
    """Enforce UsernameCaseMapped + RFC 7622 exclusions; raise JIDError."""
    if _ASCII_LOCALPART.fullmatch(value):
        return value.lower()
    return _precis_localpart(value)


def _precis_localpart(value: str) -> str:
    """prep_localpart through precis-i18n (any input; the ASCII fast path's reference)."""
    if not value:
        raise JIDError("empty localpart")
    try:
        prepared = _USERNAME.enforce(value)
    except UnicodeError as exc:
        raise JIDError(f"invalid localpart: {exc}") from None
    if _LOCALPART_EXCLUDED.intersection(prepared):
        raise JIDError("localpart contains a character RFC 7622 forbids")
    if len(prepared.encode("utf-8")) > _MAX_PART:
        raise JIDError("localpart too long")
    return prepared


@functools.lru_cache(maxsize=65536)
def prep_resource(value: str) -> str:
    """Enforce OpaqueString on a resourcepart; raise JIDError."""
    if _ASCII_RESOURCE.fullmatch(value):
        return value
    return _precis_resource(value)


def _precis_resource(value: str) -> str:
    """prep_resource through precis-i18n (any input; the ASCII fast path's reference)."""
    if not value:
        raise JIDError("empty resourcepart")
    try:
        prepared = _OPAQUE.enforce(value)
    except UnicodeError as exc:
        raise JIDError(f"invalid resourcepart: {exc}") from None
    if len(prepared.encode("utf-8")) > _MAX_PART:
        raise JIDError("resourcepart too long")
    return prepared


def _width_map(value: str) -> str:
    """RFC 5895 §2 step 2: fullwidth/halfwidth code points to their decomposition."""
    return "".join(
        unicodedata.normalize("NFKC", c) if unicodedata.decomposition(c).startswith(("<wide>", "<narrow>")) else c
        for c in value
    )


@functools.lru_cache(maxsize=4096)
def prep_domain(value: str) -> str:
    """Width-map, lower-case, NFC (RFC 7622 §3.2.2 / RFC 5895), drop one trailing dot,
    check IDNA; raise JIDError."""
    value = unicodedata.normalize("NFC", _width_map(value).lower())
    if value.endswith("."):
        value = value[:-1]
    if not value:
        raise JIDError("empty domainpart")
    if value.startswith("[") and value.endswith("]"):  # IPv6 literal
        return value
    if any(not label for label in value.split(".")):
        raise JIDError("empty label in domainpart")
    try:
        labels = value.encode("idna").decode("ascii")
    except UnicodeError:
        raise JIDError("invalid domainpart") from None
    if any(c in value for c in " @/\"&'<>:") or len(labels) > _MAX_PART:
        raise JIDError("invalid domainpart")
    return value


@dataclass(frozen=True, slots=True)
class JID:
    """A prepared JID.  Build with JID.parse() or JID.make(); never by hand."""

    local: str | None
    domain: str
    resource: str | None

    @classmethod
    def make(cls, local: str | None, domain: str, resource: str | None = None) -> "JID":
        return cls(
            prep_localpart(local) if local is not None else None,
            prep_domain(domain),
            prep_resource(resource) if resource is not None else None,
        )

    @classmethod
    def parse(cls, text: str) -> "JID":
        return _parse_cached(text)

    @property
    def bare(self) -> "JID":
        return self if self.resource is None else JID(self.local, self.domain, None)

    @property
    def is_bare(self) -> bool:
        return self.resource is None

    def with_resource(self, resource: str) -> "JID":
        return JID(self.local, self.domain, prep_resource(resource))

    def __str__(self) -> str:
        text = self.domain
        if self.local is not None:
            text = f"{self.local}@{text}"
        if self.resource is not None:
            text = f"{text}/{self.resource}"
        return text


@functools.lru_cache(maxsize=65536)
def _parse_cached(text: str) -> JID:
    if not text:
        raise JIDError("empty JID")
    # RFC 7622 §3.1: split on the first '/', then on the first '@' before it.
    rest, slash, resource = text.partition("/")
    if slash and not resource:
        raise JIDError("empty resourcepart")
    local, at, domain = rest.partition("@")
    if not at:
        local, domain = None, rest
    elif not local:
        raise JIDError("empty localpart")
    return JID.make(local, domain, resource if slash else None)


def local_user(bare: str, domain: str) -> str | None:
    """The username of ``bare`` (a prepared bare JID string, as rosters hold them)
    if it is a user of ``domain``; else None."""
    local, at, host = bare.partition("@")
    return local if at and local and host == domain else None
