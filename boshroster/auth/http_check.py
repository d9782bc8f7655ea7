"""The optional HTTP password check (``auth = "http"``).

The embedded account store (accounts.py) holds SCRAM keys; with
``auth = "http"`` passwords live in the backend app instead and only PLAIN
can be offered (there are no SCRAM keys to check against).

Does a user exist?  (issue 10 point 15: with ``auth = "http"`` every made-up
username was treated as a user, and messages to it stored offline.)  The
password check cannot tell: a backend written for it answers "invalid" for an
unknown user and for a wrong password alike, and the roster contract serves
an empty roster for anyone.  So the app may give a separate URL,
``http_user_exists_url`` (``%s`` = URL-encoded username, ``GET``): 2xx means
the user exists, 404 or 410 that it does not (a roster endpoint that answers
404 for unknown users can serve as is).  ``HttpUserCheck`` caches both answers
for ``http_user_exists_cache_seconds`` and fails open: a timeout, a refused
connection or any other status counts as "exists" (the message is stored, as
before) and the backend is not asked again for ``_DOWN_SECONDS``, so a backend
that is down neither bounces every message nor stalls every sender.

Shared state: each class's cache dicts, mutated between I/O calls only
(a ``requests`` call yields to the hub, the dict updates around it do not).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from urllib.parse import quote

import requests

log = logging.getLogger("boshroster.auth")


class PasswordCheckUnavailable(Exception):
    """The backend could not answer a password check (down, timeout, 5xx)."""


class HttpAuthenticator:
    """Checks username/password with the backend app: POST JSON, any 2xx means valid.

    Offers no SCRAM (it has no keys), so sasl.mechanisms_for() offers PLAIN only.
    Valid answers are cached briefly (keyed by a hash, never the password).
    """

    def __init__(self, url: str, domain: str, timeout: float = 5.0, cache_seconds: float = 60.0, clock=time.monotonic,
                 user_check: "HttpUserCheck | None" = None):
        self.url = url
        self.user_check = user_check
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
            if self.user_check is not None:
                self.user_check.known(username)
        return ok

    def user_exists(self, username: str) -> bool:
        """True unless ``http_user_exists_url`` says the user does not exist (see the module doc)."""
        if self.user_check is None:
            return True  # cannot tell: store, as before
        return self.user_check.user_exists(username)


_DOWN_SECONDS = 10.0
_MAX_IN_FLIGHT = 8
_MAX_CACHED = 10000


class HttpUserCheck:
    """``GET http_user_exists_url``: does the app know this username?  See the module doc."""

    def __init__(self, url_template: str, timeout: float = 5.0, cache_seconds: float = 60.0, clock=time.monotonic):
        self.url_template = url_template
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.clock = clock
        self.http = requests.Session()
        self._answers: OrderedDict[str, tuple[bool, float]] = OrderedDict()  # username -> (exists, expires)
        self._down_until = 0.0
        self._in_flight = 0

    def _remember(self, username: str, exists: bool) -> None:
        self._answers.pop(username, None)
        self._answers[username] = (exists, self.clock() + self.cache_seconds)
        while len(self._answers) > _MAX_CACHED:
            self._answers.popitem(last=False)

    def known(self, username: str) -> None:
        """The user just logged in: it exists (no need to ask)."""
        self._remember(username, True)

    def user_exists(self, username: str) -> bool:
        cached = self._answers.get(username)
        now = self.clock()
        if cached is not None and cached[1] > now:
            return cached[0]
        if now < self._down_until:
            return True
        if self._in_flight >= _MAX_IN_FLIGHT:
            # Bounded: a burst to many new names must not open a connection each.
            log.warning("user check for %r skipped: %d checks already in flight; assuming it exists",
                        username[:64], self._in_flight)
            return True
        url = self.url_template.replace("%s", quote(username, safe=""))
        self._in_flight += 1
        try:
            reply = self.http.get(url, timeout=(self.timeout, self.timeout), allow_redirects=False,
                                  stream=True, headers={"Accept": "application/json"})  # body never read
            reply.close()
        except requests.RequestException as exc:
            self._down_until = self.clock() + _DOWN_SECONDS
            log.warning("user check for %r could not reach %s: %s; assuming users exist for %.0f s",
                        username[:64], self.url_template, type(exc).__name__, _DOWN_SECONDS)
            return True
        finally:
            self._in_flight -= 1
        if 200 <= reply.status_code < 300:
            self._remember(username, True)
            return True
        if reply.status_code in (404, 410):
            self._remember(username, False)
            log.info("user check: %r does not exist (HTTP %s)", username[:64], reply.status_code)
            return False
        self._down_until = self.clock() + _DOWN_SECONDS
        log.warning("user check for %r: backend answered HTTP %s; assuming users exist for %.0f s",
                    username[:64], reply.status_code, _DOWN_SECONDS)
        return True
