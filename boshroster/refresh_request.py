"""Validating ``POST /roster_admin/refresh`` calls (contract §2, design notes C.4, C.8).

Pure functions, no I/O: the HTTP layer reads the body and headers, calls
these, and turns ``RefreshBadRequest`` into a ``400`` JSON error and a
``(status, message)`` from ``check_refresh_access`` into that status (add
``WWW-Authenticate: Bearer`` to a 401).
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import re
from typing import Iterable

from boshroster.jid import JIDError, prep_localpart
from boshroster.roster import json_type_name

__all__ = ["RefreshBadRequest", "parse_refresh_body", "check_refresh_access", "client_address"]

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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


# -- access ---------------------------------------------------------------------

def check_refresh_access(*, peer_ip: str, forwarded_for: str | None,
                         trusted_proxies: list[str], allowed_networks: list[str],
                         secret: str | None, authorization: str | None
                         ) -> tuple[int, str] | None:
    """None if the caller may refresh, else ``(403 or 401, message)``.

    The client address (``client_address``) must be in ``allowed_networks``
    (CIDRs or single addresses; a whitelist, so an empty list allows no one:
    to rely on the secret alone pass ``['0.0.0.0/0', '::/0']``) -> else 403.
    Then, if ``secret`` is not None, ``Authorization: Bearer <secret>`` is
    required (compared in constant time) -> else 401.  An empty secret
    matches nothing.  Malformed ``trusted_proxies``/``allowed_networks``
    entries raise ValueError: validate them when loading the config."""
    client = client_address(peer_ip, forwarded_for, trusted_proxies)
    address = _parse_ip(client)
    networks = _networks(tuple(allowed_networks))
    if address is None or not _in_networks(address, networks):
        return 403, f"refresh not allowed from {client}"
    if secret is not None:
        token = _bearer_token(authorization)
        if token is None:
            return 401, "missing Authorization: Bearer token"
        if not secret or not hmac.compare_digest(token.encode("utf-8"), secret.encode("utf-8")):
            return 401, "invalid bearer token"
    return None


def client_address(peer_ip: str, forwarded_for: str | None, trusted_proxies: list[str]) -> str:
    """The address of the real client, as Prosody's mod_http computes it.

    ``X-Forwarded-For`` is believed only when the TCP peer is a trusted
    proxy (IPs or CIDRs).  Then the hops are walked right to left, skipping
    trusted proxies, and the first untrusted hop is the client; if every hop
    is trusted, the peer is.  Several X-Forwarded-For headers must be joined
    with "," first (WSGI servers do).  Returns the address normalised (an
    IPv4-mapped IPv6 peer becomes IPv4), or the raw hop when it is not an IP
    address (it then matches no network)."""
    peer = _parse_ip(peer_ip)
    if peer is None or not forwarded_for:
        return str(peer) if peer is not None else peer_ip
    proxies = _networks(tuple(trusted_proxies))
    if not _in_networks(peer, proxies):
        return str(peer)
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        if not hop:
            continue
        address = _parse_ip(hop)
        if address is None:
            return hop
        if not _in_networks(address, proxies):
            return str(address)
    return str(peer)


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def _parse_ip(text: str | None) -> _IPAddress | None:
    """An IP address from a peer address or an X-Forwarded-For hop.

    Accepts ``1.2.3.4``, ``1.2.3.4:port``, ``::1``, ``[::1]``, ``[::1]:port``
    and drops an IPv6 zone (``fe80::1%eth0``)."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
    text = text.partition("%")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=64)
def _networks(specs: tuple[str, ...]) -> tuple[_IPNetwork, ...]:
    networks = []
    for spec in specs:
        try:
            networks.append(ipaddress.ip_network(spec.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or network: {spec!r}") from None
    return tuple(networks)


def _in_networks(address: _IPAddress, networks: Iterable[_IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in networks)
