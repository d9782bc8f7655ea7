"""The optional HTTP password check (``auth = "http"``).

The embedded account store (accounts.py) holds SCRAM keys; with
``auth = "http"`` passwords live in the backend app instead and only PLAIN
can be offered (there are no SCRAM keys to check against).
"""

from __future__ import annotations

import hashlib
import logging
import time

import requests

log = logging.getLogger("boshroster.auth")


class PasswordCheckUnavailable(Exception):
    """The backend could not answer a password check (down, timeout, 5xx)."""


class HttpAuthenticator:
    """Checks username/password with the backend app: POST JSON, any 2xx means valid.

    Offers no SCRAM (it has no keys), so sasl.mechanisms_for() offers PLAIN only.
    Valid answers are cached briefly (keyed by a hash, never the password).
    """

    def __init__(self, url: str, domain: str, timeout: float = 5.0, cache_seconds: float = 60.0, clock=time.monotonic):
        self.url = url
        self.domain = domain
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.clock = clock
        self.http = requests.Session()
        self._valid: dict[str, float] = {}

    def _key(self, username: str, password: str) -> str:
        return hashlib.sha256(f"{username}\0{password}".encode("utf-8")).hexdigest()

    def check_password(self, username: str, password: str) -> bool:
        key = self._key(username, password)
        expires = self._valid.get(key)
        if expires is not None and expires > self.clock():
            return True
        started = self.clock()
        try:
            reply = self.http.post(
                self.url,
                json={"username": username, "password": password, "domain": self.domain},
                timeout=(self.timeout, self.timeout),
            )
        except requests.RequestException as exc:
            # Not the user's fault: sasl.py turns this into <temporary-auth-failure/>.
            log.warning("password check for %s could not reach %s: %s", username, self.url, type(exc).__name__)
            raise PasswordCheckUnavailable(type(exc).__name__) from None
        if reply.status_code >= 500:
            log.warning("password check for %s: backend answered HTTP %s", username, reply.status_code)
            raise PasswordCheckUnavailable(f"HTTP {reply.status_code}")
        ok = 200 <= reply.status_code < 300
        log.debug("password check for %s: HTTP %s in %.0f ms", username, reply.status_code, 1000 * (self.clock() - started))
        if ok:
            if len(self._valid) > 10000:
                self._valid.clear()
            self._valid[key] = self.clock() + self.cache_seconds
        return ok
