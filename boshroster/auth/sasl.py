"""Server side of SASL for XMPP (RFC 6120 §6): PLAIN, SCRAM-SHA-1, SCRAM-SHA-256.

Transport- and XML-agnostic: ``SaslExchange.step()`` takes the decoded bytes
of ``<auth/>`` (the initial response, ``b''`` when absent or ``=``) and then of
each ``<response/>``, and returns ``('challenge', bytes)`` or
``('success', bytes | None)``; the caller does base64 and XML and turns a
``SaslFailure`` into ``<failure><{condition}/></failure>``.

SCRAM is done by scramp (``ScramMechanism.make_server``).  Notes on how it is
glued here:

* Channel binding is never offered (we sit behind a TLS-terminating proxy),
  so no ``-PLUS`` mechanism is advertised, a GS2 header with ``p=`` fails and
  ``y`` is accepted (both decided by scramp).
* scramp rejects any non-empty GS2 authzid (``n,a=...,``), even one equal to
  the user's own bare JID.  It cannot be stripped here because the client's
  proof covers the ``c=`` attribute that encodes the header, so such an
  exchange fails with ``not-authorized``.  Strophe sends ``n,,``; stanza.js
  adds ``a=`` only when the application sets an authzid.
* An unknown (or unpreparable) username gets dummy auth info, derived
  deterministically from the name with a per-process secret, so the exchange
  runs to the proof check and fails exactly like a wrong password: same
  challenge shape, same salt for repeated tries, same condition.
* Messages that do not have the RFC 5802 structure fail with
  ``malformed-request`` (checked by our own patterns before scramp sees
  them); everything scramp rejects after that is ``not-authorized``.

Throttling (issue 10 point 13): the username is known only inside the
exchange (the PLAIN message, the SCRAM client-first), so the exchange itself
asks its ``throttle`` (throttle.AuthThrottle) whether (peer address, username)
may try now, before any password is checked, and tells it of each
``not-authorized`` failure and each success.  A throttled attempt fails with
``temporary-auth-failure``.

Passwords (and tokens, which travel as PLAIN passwords) are never logged nor
put in exception messages.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from typing import Protocol

import scramp

from boshroster.xmpp.errors import SaslFailure
from boshroster.xmpp.jid import JID, JIDError, prep_domain, prep_localpart

log = logging.getLogger(__name__)

SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1")
ALL_MECHANISMS = (*SCRAM_MECHANISMS, "PLAIN")




class Authenticator(Protocol):
    """What a credential source offers; ``AccountStore`` satisfies it.

    An HTTP password checker may only have ``check_password``; then only PLAIN
    is offered.
    """

    def scram_auth_info(self, username: str, mechanism: str): ...

    def check_password(self, username: str, password: str) -> bool: ...


def _has(authenticator, name: str) -> bool:
    return callable(getattr(authenticator, name, None))


def mechanisms_for(authenticator, secure: bool, allow_plain_insecure: bool) -> list[str]:
    """Mechanisms to advertise, strongest first; never a ``-PLUS`` variant.

    SCRAM only if the authenticator holds SCRAM keys (has ``scram_auth_info``);
    PLAIN only over a secure channel unless ``allow_plain_insecure``.  Token
    login (tokens.py) travels as the PLAIN password and keeps that rule: a
    token sent in clear could be replayed until it expires.
    """
    mechs: list[str] = []
    if _has(authenticator, "scram_auth_info"):
        mechs.extend(SCRAM_MECHANISMS)
    if _has(authenticator, "check_password") and (secure or allow_plain_insecure):
        mechs.append("PLAIN")
    return mechs


# RFC 5802 §7 structure, loosely: anything matching goes to scramp, anything
# not matching is malformed-request.
_CLIENT_FIRST = re.compile(r"(?:n|y|p=[A-Za-z0-9.-]+),(?:a=[^,]+)?,(?:m=[^,]+,)?n=[^,]+,r=[^,]+(?:,.*)?", re.S)
_CLIENT_FINAL = re.compile(r"c=[A-Za-z0-9+/=]+,r=[^,]+(?:,[^,]*)*,p=[A-Za-z0-9+/=]+", re.S)

_DUMMY_SECRET = secrets.token_bytes(32)
_DIGEST = {"SCRAM-SHA-1": hashlib.sha1, "SCRAM-SHA-256": hashlib.sha256}


def _dummy_auth_info(mechanism: str, username: str, iterations: int):
    """Auth info no password matches; stable per (process, mechanism, username)."""

    def part(label: str, size: int) -> bytes:
        msg = f"{label}\0{mechanism}\0{username}".encode("utf-8", "surrogatepass")
        return hmac.new(_DUMMY_SECRET, msg, hashlib.sha512).digest()[:size]

    size = _DIGEST[mechanism]().digest_size
    return part("salt", 32), part("stored", size), part("server", size), iterations


class SaslExchange:
    """One SASL exchange on one stream.  Create a new one for a retry.

    ``throttle`` (optional, an AuthThrottle shared by every stream of the server)
    and ``address`` (the peer's IP) enable login throttling; see the module doc.
    """

    def __init__(self, mechanism: str, authenticator, domain: str, offered: list[str],
                 throttle=None, address: str | None = None):
        if mechanism not in offered or mechanism not in ALL_MECHANISMS:
            raise SaslFailure("invalid-mechanism")
        if mechanism in SCRAM_MECHANISMS and not _has(authenticator, "scram_auth_info"):
            raise SaslFailure("invalid-mechanism")
        if mechanism == "PLAIN" and not _has(authenticator, "check_password"):
            raise SaslFailure("invalid-mechanism")
        self.mechanism = mechanism
        self.authenticator = authenticator
        self.domain = prep_domain(domain)
        self.username: str | None = None
        self._stage = 0  # 0: nothing received yet; -1: finished (success or failure)
        self._scram = None
        self._candidate: str | None = None  # SCRAM username captured in auth_fn
        self._backend_error = False
        self.throttle = throttle
        self.address = address
        self.attempted: str | None = None  # prepared username tried, once known
        self._named = False  # the client has named a user (maybe not a valid localpart)

    # -- driver ------------------------------------------------------------

    def step(self, data: bytes) -> tuple[str, bytes | None]:
        """Feed the initial response (first call) or a response; see module doc."""
        if self._stage < 0:
            raise SaslFailure("malformed-request", "exchange already finished")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("step() takes bytes")
        try:
            if self.mechanism == "PLAIN":
                result = self._step_plain(bytes(data))
            else:
                result = self._step_scram(bytes(data))
        except SaslFailure as failure:
            self._stage = -1
            self._scram = None
            if failure.condition == "not-authorized" and self._named and self._throttled():
                self.throttle.failed(self.address, self.attempted)
            raise
        if result[0] == "success":
            self._stage = -1
            self._scram = None
            if self._throttled():
                self.throttle.succeeded(self.address, self.username)
        return result

    # -- throttling (issue 10 point 13) ------------------------------------

    def _throttled(self) -> bool:
        return self.throttle is not None and self.address is not None

    def _named_user(self, user: str | None) -> None:
        """The client named ``user`` (None: not a valid localpart): may it try now?"""
        self._named = True
        self.attempted = user
        if self._throttled() and self.throttle.check(self.address, user) is not None:
            raise SaslFailure("temporary-auth-failure", "too many failed logins, try again later")

    # -- PLAIN (RFC 4616) --------------------------------------------------

    def _step_plain(self, data: bytes) -> tuple[str, bytes | None]:
        if self._stage == 0 and not data:
            self._stage = 1  # no initial response: empty challenge, data comes next
            return "challenge", b""
        self._stage = 1
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SaslFailure("malformed-request", "PLAIN message is not UTF-8") from None
        parts = text.split("\0")
        if len(parts) != 3:
            raise SaslFailure("malformed-request", "PLAIN message needs exactly two NULs")
        authzid, authcid, password = parts
        if not authcid or not password:
            raise SaslFailure("malformed-request", "empty PLAIN authcid or password")
        try:
            user = prep_localpart(authcid)
        except JIDError:
            self._named_user(None)
            raise SaslFailure("not-authorized") from None
        self._named_user(user)
        if authzid:
            try:
                wanted = JID.parse(authzid)
            except JIDError:
                raise SaslFailure("not-authorized", "invalid authzid") from None
            if wanted != JID(user, self.domain, None):
                raise SaslFailure("not-authorized", "authzid is not the user's bare JID")
        try:
            ok = self.authenticator.check_password(user, password)
        except Exception as exc:  # backend down; never log the password
            log.warning("password check failed for %r: %s", user, type(exc).__name__)
            raise SaslFailure("temporary-auth-failure") from None
        if not ok:
            raise SaslFailure("not-authorized")
        self.username = user
        return "success", None

    # -- SCRAM (RFC 5802 / 7677) ------------------------------------------

    def _auth_fn(self, username: str):
        # scramp has SASLprep'ed and unescaped the name; make it a localpart.
        iterations = getattr(self.authenticator, "iterations", 4096)
        if not isinstance(iterations, int) or iterations < 4096:
            iterations = 4096
        try:
            user = prep_localpart(username)
        except JIDError:
            self._candidate = None
            self._named, self.attempted = True, None
            return _dummy_auth_info(self.mechanism, username, iterations)
        self._named, self.attempted = True, user
        try:
            info = self.authenticator.scram_auth_info(user, self.mechanism)
        except Exception:
            self._backend_error = True
            raise
        if info is None:
            self._candidate = None
            return _dummy_auth_info(self.mechanism, user, iterations)
        self._candidate = user
        return info

    def _step_scram(self, data: bytes) -> tuple[str, bytes | None]:
        if self._stage == 0 and not data:
            self._stage = 1  # client-first comes in the next response
            return "challenge", b""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SaslFailure("malformed-request", "SCRAM message is not UTF-8") from None

        if self._stage in (0, 1):
            self._stage = 2
            if not _CLIENT_FIRST.fullmatch(text):
                raise SaslFailure("malformed-request", "bad SCRAM client-first message")
            self._scram = scramp.ScramMechanism(self.mechanism).make_server(self._auth_fn)
            try:
                self._scram.set_client_first(text)
            except scramp.ScramException as exc:
                raise self._scram_failure(exc) from None
            if self._named:  # auth_fn ran: the username is known
                self._named_user(self.attempted)
            try:
                server_first = self._scram.get_server_first()
            except scramp.ScramException as exc:
                raise self._scram_failure(exc) from None
            return "challenge", server_first.encode("utf-8")

        # stage 2: client-final
        if not _CLIENT_FINAL.fullmatch(text):
            raise SaslFailure("malformed-request", "bad SCRAM client-final message")
        try:
            self._scram.set_client_final(text)
            server_final = self._scram.get_server_final()
        except scramp.ScramException as exc:
            raise self._scram_failure(exc) from None
        if self._candidate is None:  # dummy info cannot verify; belt and braces
            raise SaslFailure("not-authorized")
        self.username = self._candidate
        return "success", server_final.encode("utf-8")

    def _scram_failure(self, exc: scramp.ScramException) -> SaslFailure:
        if self._backend_error:
            log.warning("SCRAM credential lookup failed: %s", type(exc.__cause__).__name__)
            return SaslFailure("temporary-auth-failure")
        # scramp's text names the broken rule (never the password).  It is logged,
        # not returned: the client gets the same answer whatever went wrong.
        log.debug("SCRAM exchange refused: %s", exc)
        return SaslFailure("not-authorized")
