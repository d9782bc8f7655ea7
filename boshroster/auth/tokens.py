"""Token login: a JWT travels as the SASL PLAIN password (ejabberd's ``auth_method: jwt``).

The web app signs its logged-in user in without a second password: it mints
a short-lived JWT ``{"jid": "alice@example.com", "exp": ...}`` and the chat
client sends it as the PLAIN password (Converse.js fetches it from the app's
``credentials_url``).  A token is accepted when

* its signature checks with ``jwt_key`` under one of ``jwt_algorithms``
  (default: every algorithm the key type allows; never ``none``, never an
  HMAC algorithm with a public key: the classic RS256/HS256 confusion is
  refused twice, by the allowed list and by PyJWT itself);
* ``exp`` is present and in the future, ``nbf`` and ``iat`` (when present)
  are not in the future, each with ``jwt_leeway`` seconds of clock skew
  (RFC 7519 §4.1.4-6); a token with ``aud`` is refused (§4.1.3: boshroster is
  no audience it could name);
* the ``jwt_jid_field`` claim is a JID whose localpart is the authenticating
  user (after PRECIS preparation) and whose domain is ours;
* it was not issued (``iat``) before a cutoff set for that user with
  ``TokenState.revoke_tokens`` (the app disabling an account);
* with ``jwt_single_use``, its ``jti`` has not been used before (remembered,
  across restarts, until the token's ``exp``).

Anything else is ``<not-authorized/>``, logged at WARNING with the reason and
never the token.  Tokens longer than ``MAX_TOKEN_LENGTH`` are refused before
any parsing.

Library: PyJWT (with ``cryptography`` for RSA/EC/EdDSA), chosen over joserfc
because it is the most widely deployed Python JWT library (maintained since
2015, used by Django REST framework's simplejwt and many others), its
``decode`` makes the allowed algorithms mandatory, refuses ``alg: none``
unless asked, refuses PEM/JWK public keys as HMAC secrets, and checks
``exp``/``nbf``/``iat`` with a leeway; it also reads JWK sets (``PyJWKSet``).
joserfc would do as well; PyJWT needs one small dependency less
(joserfc also needs ``cryptography``) and its API is the smaller one here.

Shared state: ``TokenState`` (token_state.py: revocation cutoffs, used
``jti``, users seen logging in by token in SQLite); the verifier itself holds
only the keys, read once.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from dataclasses import dataclass

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from boshroster.auth.token_state import TokenState
from boshroster.xmpp.jid import JID, JIDError, prep_domain, prep_localpart

log = logging.getLogger("boshroster.auth")

MAX_TOKEN_LENGTH = 8192  # bytes; real tokens are a few hundred
MIN_HMAC_SECRET = 32  # bytes: RFC 7518 §3.2, a key at least as long as the HS256 output
MAX_KEY_FILE = 1 << 20

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGORITHMS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",), "secp256k1": ("ES256K",)}
EDDSA_ALGORITHMS = ("EdDSA",)

_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")


class KeyFileError(ValueError):
    """``jwt_key`` cannot be used; the message says why (never the key)."""


class TokenRefused(Exception):
    """A token that does not log in; ``reason`` is for the log."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _Key:
    key: object  # bytes (HMAC) or a cryptography public key
    algorithms: tuple[str, ...]
    kid: str | None


def _algorithms_for(key) -> tuple[str, ...]:
    if isinstance(key, (bytes, bytearray)):
        return HMAC_ALGORITHMS
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algs = _EC_ALGORITHMS.get(key.curve.name)
        if algs is None:
            raise KeyFileError(f"unsupported elliptic curve {key.curve.name}")
        return algs
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return EDDSA_ALGORITHMS
    raise KeyFileError(f"unsupported key type {type(key).__name__}")


def _public(key, where: str):
    """The public half of a private key (the server only verifies), with a warning."""
    if hasattr(key, "public_key") and not isinstance(key, (bytes, bytearray)):
        if isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey,
                            ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
            log.warning("%s holds a private key: only its public key is used; give the server the public key only",
                        where)
            return key.public_key()
    return key


def _load_pem(data: bytes, path: str):
    try:
        return serialization.load_pem_public_key(data)
    except ValueError:
        pass
    try:
        return _public(serialization.load_pem_private_key(data, password=None), path)
    except (ValueError, TypeError):
        pass
    try:
        from cryptography import x509

        return x509.load_pem_x509_certificate(data).public_key()
    except ValueError:
        raise KeyFileError(f"{path}: not a PEM public key, private key or certificate") from None


def _load_jwks(data: bytes, path: str) -> list[_Key]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise KeyFileError(f"{path}: not valid JSON ({exc.msg})") from None
    entries = doc.get("keys") if isinstance(doc, dict) and "keys" in doc else [doc]
    if not isinstance(entries, list) or not entries:
        raise KeyFileError(f"{path}: a JWK set needs a non-empty 'keys' array")
    keys = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise KeyFileError(f"{path}: key {index} is not a JSON object")
        if entry.get("use") not in (None, "sig"):
            continue  # RFC 7517 §4.2: an encryption key does not verify signatures
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWTError as exc:
            raise KeyFileError(f"{path}: key {index}: {type(exc).__name__}") from None
        key = _public(jwk.key, path)
        algs = _algorithms_for(key)
        if "alg" in entry:
            if entry["alg"] not in algs:
                raise KeyFileError(f"{path}: key {index}: alg {entry['alg']!r} does not fit a {jwk.key_type} key")
            algs = (entry["alg"],)
        if isinstance(key, (bytes, bytearray)) and len(key) < MIN_HMAC_SECRET:
            raise KeyFileError(f"{path}: key {index}: an HMAC secret needs at least {MIN_HMAC_SECRET} bytes")
        kid = entry.get("kid")
        keys.append(_Key(key, algs, kid if isinstance(kid, str) else None))
    if not keys:
        raise KeyFileError(f"{path}: no signature key in the JWK set")
    return keys


def load_keys(path: str, algorithms: list[str] | tuple[str, ...] = ()) -> list[_Key]:
    """Read ``jwt_key``: a JWK or JWK set (JSON), a PEM key/certificate, or else an HMAC secret.

    The secret is the file's bytes minus one trailing newline (``\\n`` or
    ``\\r\\n``), at least 32 bytes.  ``algorithms`` (``jwt_algorithms``), if not
    empty, narrows what each key accepts; naming ``none`` or an algorithm no
    key can verify is a KeyFileError, so a typo cannot silently open or close
    the door.
    """
    wanted = [a for a in algorithms]
    if any(a.lower() == "none" for a in wanted):
        raise KeyFileError("jwt_algorithms: 'none' is never accepted")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"jwt_key: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"jwt_key: {path} is larger than {MAX_KEY_FILE} bytes")
    stripped = data.strip()
    if stripped.startswith(b"{"):
        keys = _load_jwks(stripped, path)
    elif b"-----BEGIN" in data:
        key = _load_pem(data, path)
        keys = [_Key(key, _algorithms_for(key), None)]
    else:
        secret = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
        if len(secret) < MIN_HMAC_SECRET:
            raise KeyFileError(f"jwt_key: {path}: an HS256 secret needs at least {MIN_HMAC_SECRET} bytes "
                               f"(RFC 7518 §3.2), this one has {len(secret)}")
        keys = [_Key(secret, HMAC_ALGORITHMS, None)]
    if wanted:
        allowed = set()
        for key in keys:
            allowed.update(key.algorithms)
        unknown = [a for a in wanted if a not in allowed]
        if unknown:
            raise KeyFileError(f"jwt_algorithms: {', '.join(unknown)} cannot be verified with the key in {path} "
                               f"(it allows {', '.join(sorted(allowed))})")
        keys = [_Key(k.key, tuple(a for a in k.algorithms if a in wanted), k.kid) for k in keys]
        keys = [k for k in keys if k.algorithms]
    return keys


def looks_like_jwt(password: str) -> bool:
    """True if ``password`` is a JWS compact serialization with a JSON header naming an ``alg``.

    Decides whether a PLAIN password is a token or a password: no real
    password is three base64url parts whose first decodes to ``{"alg": ...}``.
    """
    head, dot, _rest = password.partition(".")
    if not dot or len(head) > 4096 or password.count(".") != 2 or not _JWT_SHAPE.fullmatch(password):
        return False
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(header, dict) and "alg" in header


# PyJWT exception -> reason for the log (fixed texts: nothing of the token is repeated).
_REASONS = (
    (jwt.ExpiredSignatureError, "expired (exp is past)"),
    (jwt.ImmatureSignatureError, "not yet valid (nbf or iat in the future)"),
    (jwt.InvalidIssuedAtError, "iat is not a number"),
    (jwt.MissingRequiredClaimError, "no exp claim"),
    (jwt.InvalidAudienceError, "has an aud claim (tokens for another audience are refused)"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.DecodeError, "malformed token"),
    (jwt.InvalidTokenError, "invalid token"),
)


def _reason(exc: Exception | None) -> str:
    for cls, text in _REASONS:
        if isinstance(exc, cls):
            return text
    return "no key verifies it"


class TokenVerifier:
    """Checks one token for one user; see the module docstring for the rules."""

    def __init__(self, keys: list[_Key], domain: str, state: TokenState, *, jid_field: str = "jid",
                 leeway: float = 30.0, single_use: bool = False, clock=time.time):
        if not keys:
            raise KeyFileError("no usable key")
        self.keys = keys
        self.domain = prep_domain(domain)
        self.state = state
        self.jid_field = jid_field
        self.leeway = leeway
        self.single_use = single_use
        self.clock = clock
        self.algorithms = tuple(sorted({a for k in keys for a in k.algorithms}))

    @classmethod
    def from_config(cls, config, state: TokenState) -> "TokenVerifier":
        return cls(load_keys(config.jwt_key, config.jwt_algorithms), config.domain, state,
                   jid_field=config.jwt_jid_field, leeway=config.jwt_leeway, single_use=config.jwt_single_use)

    def verify(self, username: str, token: str) -> dict:
        """The token's claims if it logs ``username`` (a prepared localpart) in; else TokenRefused."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenRefused(f"token too long ({len(token)} characters, at most {MAX_TOKEN_LENGTH})")
        if not looks_like_jwt(token):
            raise TokenRefused("not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefused("malformed token (not three base64url parts with a JSON header)") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            shown = alg if isinstance(alg, str) and len(alg) <= 16 else "?"
            raise TokenRefused(f"algorithm {shown!r} not allowed (allowed: {', '.join(self.algorithms)})")
        kid = header.get("kid")
        candidates = [k for k in self.keys if alg in k.algorithms]
        if isinstance(kid, str) and any(k.kid is not None for k in candidates):
            candidates = [k for k in candidates if k.kid == kid]
            if not candidates:
                raise TokenRefused("unknown kid")
        claims = None
        last: Exception | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token, key.key, algorithms=list(key.algorithms), leeway=self.leeway,
                    options={"require": ["exp"], "enforce_minimum_key_length": True},
                )
                break
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError) as exc:
                last = exc  # another key of the set may fit
            except jwt.PyJWTError as exc:
                last = exc  # signature checked: the claims are wrong, whatever the key
                break
        if claims is None:
            raise TokenRefused(_reason(last))
        self._check_subject(username, claims)
        self._check_revocation(username, claims)
        if self.single_use:
            self._use_once(username, claims)
        return claims

    def _check_subject(self, username: str, claims: dict) -> None:
        value = claims.get(self.jid_field)
        if not isinstance(value, str):
            raise TokenRefused(f"no {self.jid_field!r} claim (a JID string)")
        try:
            jid = JID.parse(value)
        except JIDError:
            raise TokenRefused(f"the {self.jid_field!r} claim is not a valid JID") from None
        if jid.domain != self.domain:
            raise TokenRefused(f"the {self.jid_field!r} claim is for another domain")
        try:
            user = prep_localpart(username)
        except JIDError:
            raise TokenRefused("invalid username") from None
        if jid.local != user:
            raise TokenRefused(f"the {self.jid_field!r} claim names another user")

    def _check_revocation(self, username: str, claims: dict) -> None:
        cutoff = self.state.tokens_revoked_before(username)
        if cutoff is None:
            return
        iat = claims.get("iat")
        if not isinstance(iat, (int, float)) or isinstance(iat, bool):
            raise TokenRefused("no iat claim, and this user's older tokens are revoked")
        if iat < cutoff:
            raise TokenRefused("issued before this user's tokens were revoked")

    def _use_once(self, username: str, claims: dict) -> None:
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise TokenRefused("jwt_single_use is on and the token has no usable jti")
        if not self.state.use_jti(jti, username, float(claims["exp"]) + self.leeway):
            raise TokenRefused("replayed jti (single-use token already used)")


class TokenAuthenticator:
    """The authenticator sasl.py sees when ``jwt_key`` is set.

    ``check_password``: a password that looks like a JWT is verified as a
    token; any other goes to ``passwords`` (the account store or the HTTP
    check) when password logins are on, and is refused otherwise.  SCRAM is
    offered (``scram_auth_info`` is present) only when password logins are on
    and ``passwords`` holds SCRAM keys: a client that logs in with a token
    must then choose PLAIN itself (Strophe ``mechanisms``, xmpp.js a
    ``credentials`` function, StanzaJS ``sasl.disable``); with
    ``password_logins = false`` PLAIN is all that is offered.
    """

    def __init__(self, verifier: TokenVerifier, passwords=None, user_check=None, accounts=None):
        self.verifier = verifier
        self.passwords = passwords
        self.user_check = user_check  # optional http_check.HttpUserCheck
        self.accounts = accounts  # the AccountStore, if any, even with password logins off
        if passwords is not None and callable(getattr(passwords, "scram_auth_info", None)):
            self.scram_auth_info = passwords.scram_auth_info
            self.iterations = getattr(passwords, "iterations", 4096)

    @property
    def state(self) -> TokenState:
        return self.verifier.state

    def check_password(self, username: str, password: str) -> bool:
        if self.passwords is not None and not looks_like_jwt(password):
            return self.passwords.check_password(username, password)
        try:
            claims = self.verifier.verify(username, password)
        except TokenRefused as refused:
            log.warning("token login refused for %r: %s", username[:64], refused.reason)
            return False
        log.debug("token login for %r (jti %r)", username, str(claims.get("jti", ""))[:64])
        self.state.token_user_seen(username)
        return True

    def user_exists(self, username: str) -> bool:
        """Known locally (an account, a past token login), else the app's answer.

        Token users need no account, so without ``http_user_exists_url`` an
        unknown name is assumed to exist (messages to it are stored offline,
        as before): the server cannot tell."""
        if self.state.is_token_user(username):
            return True
        if self.accounts is not None and self.accounts.exists(username):
            return True
        if self.user_check is not None:
            return self.user_check.user_exists(username)
        return True
