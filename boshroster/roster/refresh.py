"""Validating the body of ``POST /roster_admin/refresh`` (README, "The backend contract": refresh).

Pure functions, no I/O: the HTTP layer reads the body, calls
``parse_refresh_body`` and turns ``RefreshBadRequest`` into a ``400`` JSON error.
"""

from __future__ import annotations

import json
import re

from boshroster.roster.model import json_type_name
from boshroster.xmpp.jid import JIDError, prep_localpart

__all__ = ["RefreshBadRequest", "parse_refresh_body"]


class RefreshBadRequest(ValueError):
    """The body is not a JSON array of valid usernames; ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# -- body -----------------------------------------------------------------------

# Printable ASCII without the characters RFC 7622 §3.3.1 excludes: for such a
# string the PRECIS UsernameCaseMapped profile is exactly str.lower() (ASCII is
# PVALID in IdentifierClass; width mapping, NFC and the bidi rule are no-ops).
# prep_localpart costs ~20 µs a name; this keeps 100,000 names fast.
# tests/test_roster_data.py checks the equivalence.
_ASCII_USERNAME = re.compile(r"[!#-%(-.0-9;=?A-~]{1,1023}")


def _prep_username(value: str) -> str:
    if _ASCII_USERNAME.fullmatch(value):
        return value.lower()
    if len(value) > 4 * 1023:  # cannot prepare to <= 1023 octets; spare PRECIS the work
        raise JIDError("localpart too long")
    return prep_localpart(value)


def parse_refresh_body(body: bytes, *, max_users: int = 10000) -> list[str]:
    """The usernames of a refresh body, prepared and deduplicated in order.

    The body must be a JSON array of at most ``max_users`` strings, each a
    valid username (localpart).  ``[]`` gives ``[]``.  Anything else raises
    RefreshBadRequest with a message meant for the backend's developer;
    entries are numbered from 0 (their index in the array)."""
    if not body or not body.strip():
        raise RefreshBadRequest("empty body, expected a JSON array of usernames")
    try:
        data = json.loads(body)
    except UnicodeDecodeError as exc:
        raise RefreshBadRequest(f"body is not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RefreshBadRequest(
            f"malformed JSON at line {exc.lineno} column {exc.colno} "
            f"(char {exc.pos}): {exc.msg}") from None
    except RecursionError:
        raise RefreshBadRequest("malformed JSON: nested too deeply") from None
    if not isinstance(data, list):
        raise RefreshBadRequest(f"expected a JSON array of usernames, got {json_type_name(data)}")
    if len(data) > max_users:
        raise RefreshBadRequest(
            f"too many usernames: {len(data)}, at most {max_users} per request")
    usernames: dict[str, None] = {}
    for index, entry in enumerate(data):
        if not isinstance(entry, str):
            raise RefreshBadRequest(
                f"entry {index} is {json_type_name(entry)}, expected a string")
        try:
            usernames.setdefault(_prep_username(entry), None)
        except JIDError as exc:
            raise RefreshBadRequest(
                f"entry {index} ({_quote(entry)}) is not a valid username: {exc}") from None
    return list(usernames)


def _quote(text: str, limit: int = 64) -> str:
    shown = text if len(text) <= limit else text[:limit] + "..."
    return json.dumps(shown)
