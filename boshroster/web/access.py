"""Who is calling: the client address behind trusted proxies, and the access
rule of the app-facing endpoints (refresh, API): an address allowlist plus
an optional Bearer secret.

Pure functions, no I/O.  A ``(status, message)`` from ``check_access`` is
turned into that HTTP status by the caller (with ``WWW-Authenticate: Bearer``
on a 401).
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import re
from typing import Iterable

__all__ = ["check_access", "client_address", "from_trusted_proxy"]

_CREDENTIALS = re.compile(r"[ \t]*([^ \t]+)[ \t]+([^ \t](?:.*[^ \t])?)[ \t]*", re.DOTALL)
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def request_denied(environ: dict, config, action: str = "refresh") -> tuple[int, str] | None:
    """``check_access`` for a WSGI request, with the operator's refresh/API settings
    (trusted_proxies, refresh_allowed_networks, refresh_secret)."""
    return check_access(
        peer_ip=environ.get("REMOTE_ADDR", ""),
        forwarded_for=environ.get("HTTP_X_FORWARDED_FOR"),
        trusted_proxies=config.trusted_proxies,
        allowed_networks=config.refresh_allowed_networks,
        secret=config.refresh_secret or None,
        authorization=environ.get("HTTP_AUTHORIZATION"),
        action=action,
    )


def check_access(*, peer_ip: str, forwarded_for: str | None,
                 trusted_proxies: list[str], allowed_networks: list[str],
                 secret: str | None, authorization: str | None, action: str = "refresh"
                 ) -> tuple[int, str] | None:
    """None if the caller may do ``action``, else ``(403 or 401, message)``.

    The client address (``client_address``) must be in ``allowed_networks``
    (CIDRs or single addresses; a whitelist, so an empty list allows no one:
    to rely on the secret alone pass ``['0.0.0.0/0', '::/0']``) -> else 403.
    Then, if ``secret`` is not None, ``Authorization: Bearer <secret>`` is
    required -> else 401: the scheme in any case (RFC 7235), the token
    compared in constant time as the bytes the client sent, against the
    secret in UTF-8 or latin-1 (``_secret_matches``).  An empty secret
    matches nothing.  Malformed ``trusted_proxies``/``allowed_networks``
    entries raise ValueError: validate them when loading the config."""
    client = client_address(peer_ip, forwarded_for, trusted_proxies)
    address = _parse_ip(client)
    networks = _networks(tuple(allowed_networks))
    if address is None or not _in_networks(address, networks):
        return 403, f"{action} not allowed from {client}"
    if secret is not None:
        token = _bearer_token(authorization)
        if token is None:
            return 401, "missing Authorization: Bearer token"
        if not secret or not _secret_matches(_header_bytes(token), secret):
            return 401, "invalid bearer token"
    return None


def _secret_matches(sent: bytes, secret: str) -> bool:
    """Constant-time comparison of the client's bytes with the secret in UTF-8 (what a web
    app sends) or, when the secret has a latin-1 form, in latin-1 (what Python's http.client
    and requests send for a str header). Both are computed, so the time says nothing."""
    utf8 = hmac.compare_digest(sent, secret.encode("utf-8"))
    try:
        latin1 = hmac.compare_digest(sent, secret.encode("latin-1"))
    except UnicodeEncodeError:
        latin1 = hmac.compare_digest(sent, b"\0" + secret.encode("utf-8"))  # same work, never equal
    return utf8 or latin1


def _header_bytes(value: str) -> bytes:
    """The bytes the client sent for a header value.

    WSGI (PEP 3333) hands header values over as latin-1-decoded native strings, so a UTF-8
    secret ("sécret") arrives as mojibake ("sÃ©cret"): encode back to latin-1 to compare the
    client's bytes with the UTF-8 bytes of the configured secret. A caller that passes real
    Unicode text (not from a WSGI environ) gets its UTF-8 bytes instead of an exception."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


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
    """The token of ``Authorization: Bearer <token>`` (RFC 6750 §2.1).

    The scheme is case-insensitive (RFC 7235 §2.1: "Bearer", "bearer", "BEARER"); the
    token may be separated by spaces or tabs and is taken as sent (no decoding)."""
    if not authorization:
        return None
    # Only SP and HTAB are whitespace here: str.split()/strip() would also eat "\xa0", a
    # byte of many UTF-8 characters ("à" is C3 A0) once WSGI decoded it as latin-1.
    match = _CREDENTIALS.fullmatch(authorization)
    if match is None or match.group(1).lower() != "bearer":
        return None
    return match.group(2)


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


def from_trusted_proxy(peer_ip: str, trusted_proxies: list[str]) -> bool:
    """Is the TCP peer one of ``trusted_proxies`` (addresses or networks)?

    Network membership, not string equality: a proxy listed as a CIDR
    (``10.0.0.0/8``) or seen as an IPv4-mapped IPv6 address must count, and
    an untrusted IPv4-mapped peer must not."""
    peer = _parse_ip(peer_ip)
    return peer is not None and _in_networks(peer, _networks(tuple(trusted_proxies)))

