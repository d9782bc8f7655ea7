"""Fetching a user's roster from the backend app (roster-delegation-contract §1).

``RosterBackend.fetch(username)`` does one ``GET`` of ``http_roster_url`` with
``%s`` replaced by the URL-encoded username, and returns a ``Roster`` or raises
``RosterFetchError``.  Unlike Prosody's module it always answers, bounded in
time (design notes C.7, B.8 defects 2 and 5):

* connect and read timeouts on the socket, plus an overall deadline
  (``gevent.Timeout``) so a backend that trickles bytes forever cannot hold us;
* a body limit enforced while streaming (and up front from Content-Length);
* a global ``BoundedSemaphore`` on concurrent requests, with a bounded wait
  for a free slot;
* only a 200 is a roster: redirects are not followed (a backend that
  redirects to a login page gets a clear 'status' error);
* one pooled ``requests.Session`` (keep-alive), which never stores cookies
  (a cookie set while fetching alice's roster must not be sent for bob's) and
  by default ignores proxy environment variables and ``.netrc``.

The process must be monkey-patched by gevent (``monkey.patch_all()`` before
``requests`` is imported) or every fetch blocks the whole hub.

There is no single flight here: that is ``roster_cache.RosterCache``.
"""

from __future__ import annotations

import http.cookiejar
import json
import logging
import time
from urllib.parse import quote, urlsplit, urlunsplit

import gevent
import requests
import urllib3
from gevent.lock import BoundedSemaphore
from requests.adapters import HTTPAdapter

from boshroster.roster.model import Roster, RosterFormatError

log = logging.getLogger("boshroster.roster_backend")

__all__ = ["RosterBackend", "RosterFetchError"]

_CHUNK = 64 * 1024
_DEADLINE_SLACK = 0.5  # seconds added to connect+read for the overall deadline


class RosterFetchError(Exception):
    """A roster could not be fetched.

    ``reason`` is one of ``'timeout'``, ``'connection'``, ``'status'``,
    ``'format'``, ``'too-large'``; ``str(exc)`` says what happened, with the
    URL (credentials removed) and the HTTP status when there was one.
    ``status`` is the HTTP status for ``'status'`` errors, else None."""

    REASONS = frozenset({"timeout", "connection", "status", "format", "too-large"})

    def __init__(self, reason: str, message: str, *, url: str | None = None,
                 status: int | None = None) -> None:
        assert reason in self.REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.url = url
        self.status = status


class RosterBackend:
    """HTTP client for the backend app's roster URL.

    Counters for the metrics layer (plain attributes, read them any time):
    ``fetches`` (attempts finished, successful or not), ``failures``,
    ``total_latency`` (seconds summed over all attempts, including the wait
    for a free slot), ``in_flight`` (requests holding a slot right now),
    ``last_error`` (``"reason: message"`` of the latest failure, or None).
    """

    def __init__(self, url_template: str, *, connect_timeout: float = 2.0,
                 read_timeout: float = 5.0, max_body: int = 10 * 1024 * 1024,
                 max_concurrency: int = 20, session: requests.Session | None = None,
                 total_timeout: float | None = None, queue_timeout: float | None = None,
                 trust_env: bool = False) -> None:
        """``url_template`` must be an http(s) URL containing ``%s``, or ``""``
        for "no backend configured": then every roster is empty, no I/O.

        ``total_timeout`` (default connect+read+0.5 s) bounds one request from
        connecting to the last body byte; ``queue_timeout`` (default: the
        same) bounds the wait for one of the ``max_concurrency`` slots.
        ``session``: use this ``requests.Session`` as given (tests); by
        default a private one is built with an ``HTTPAdapter(pool_maxsize=
        max_concurrency)``, no cookies, and ``trust_env`` as given."""
        self.configured = bool(url_template)
        if self.configured and "%s" not in url_template:
            raise ValueError(f"roster URL template {url_template!r} has no %s")
        if self.configured and urlsplit(url_template).scheme not in ("http", "https"):
            raise ValueError(f"roster URL template {url_template!r} is not http(s)")
        if max_concurrency < 1 or max_body < 1:
            raise ValueError("max_concurrency and max_body must be positive")
        self.url_template = url_template
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_body = max_body
        self.max_concurrency = max_concurrency
        self.total_timeout = (total_timeout if total_timeout is not None
                              else connect_timeout + read_timeout + _DEADLINE_SLACK)
        self.queue_timeout = queue_timeout if queue_timeout is not None else self.total_timeout
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max_concurrency,
                                  max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            session.trust_env = trust_env
        self._session = session
        # Session.get() merges the session's settings with the environment's on
        # every call (~0.5 ms of CPU, a fifth of a fetch). They are the same for
        # every roster URL, so they are merged once, on the first fetch, and each
        # fetch sends a request prepared from them (see _get_body).
        self._headers = requests.structures.CaseInsensitiveDict(session.headers)
        self._headers["Accept"] = "application/json"
        self._send_settings: dict | None = None
        self._slots = BoundedSemaphore(max_concurrency)
        self.fetches = 0
        self.failures = 0
        self.total_latency = 0.0
        self.in_flight = 0
        self.last_error: str | None = None  # message of the latest failure, for /health
        self.last_ok: float | None = None  # wall-clock time of the latest success
        self.last_failure: float | None = None  # wall-clock time of the latest failure

    def url_for(self, username: str) -> str:
        return self.url_template.replace("%s", quote(username, safe=""))

    def close(self) -> None:
        """Close pooled connections (at shutdown)."""
        self._session.close()

    def fetch(self, username: str) -> Roster:
        """GET the user's roster; return it or raise RosterFetchError.

        Yields to the hub (network I/O, waiting for a slot); bounded by
        ``queue_timeout + total_timeout`` in all."""
        if not self.configured:
            self._account(0.0, failed=False)
            return Roster()
        url = self.url_for(username)
        shown = _redact(url)
        started = time.monotonic()
        try:
            roster = self._fetch(username, url, shown)
        except RosterFetchError as exc:
            elapsed = time.monotonic() - started
            self._account(elapsed, failed=True)
            self.last_error = f"{exc.reason}: {exc.message}"
            self.last_failure = time.time()
            # exc.message starts with "GET <url>", and names the status if any.
            log.warning("roster fetch failed: user=%r reason=%s elapsed_ms=%d: %s",
                        username, exc.reason, elapsed * 1000, exc.message)
            raise
        except BaseException:
            # A bug, or our greenlet being killed: count it, let it through.
            self._account(time.monotonic() - started, failed=True)
            raise
        elapsed = time.monotonic() - started
        self._account(elapsed, failed=False)
        self.last_ok = time.time()
        log.debug("roster fetched: user=%r url=%s items=%d ver=%s elapsed_ms=%d",
                  username, shown, len(roster), roster.ver, elapsed * 1000)
        return roster

    # -- internals ------------------------------------------------------------
    def _account(self, elapsed: float, *, failed: bool) -> None:
        self.fetches += 1
        self.total_latency += elapsed
        if failed:
            self.failures += 1

    def _fetch(self, username: str, url: str, shown: str) -> Roster:
        if not self._slots.acquire(timeout=self.queue_timeout):
            raise RosterFetchError(
                "timeout", f"GET {shown}: no free backend slot within {self.queue_timeout:g} s "
                f"({self.in_flight} requests in flight)", url=shown)
        self.in_flight += 1
        try:
            body, content_type = self._get_body(url, shown)
        finally:
            self.in_flight -= 1
            self._slots.release()
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise RosterFetchError(
                "format", f"GET {shown}: body is not JSON ({_one_line(exc)}); "
                f"Content-Type {content_type!r}, body starts {body[:60]!r}", url=shown) from None
        try:
            return Roster.from_backend_json(data, log_context=username)
        except RosterFormatError as exc:
            raise RosterFetchError("format", f"GET {shown}: {exc}", url=shown) from None

    def _get_body(self, url: str, shown: str) -> tuple[bytes, str]:
        # A BaseException (gevent.Timeout) so no `except Exception` in
        # requests/urllib3 can swallow it; matched by identity below.
        deadline = gevent.Timeout(self.total_timeout)
        response = None
        deadline.start()
        try:
            session = self._session
            if self._send_settings is None:
                self._send_settings = session.merge_environment_settings(
                    url, {}, True, None, None)
            prepared = requests.Request("GET", url, headers=self._headers,
                                        auth=session.auth).prepare()
            response = session.send(
                prepared, timeout=(self.connect_timeout, self.read_timeout),
                allow_redirects=False, **self._send_settings)
            if response.status_code != 200:
                message = f"GET {shown}: HTTP {response.status_code} {response.reason or ''}".rstrip()
                location = response.headers.get("Location")
                if response.is_redirect and location:
                    message += f" (to {_redact(location)}; redirects are not followed)"
                raise RosterFetchError("status", message, url=shown, status=response.status_code)
            content_type = response.headers.get("Content-Type", "")
            declared = _content_length(response)
            if declared is not None and declared > self.max_body:
                raise RosterFetchError(
                    "too-large", f"GET {shown}: Content-Length {declared} exceeds the "
                    f"{self.max_body}-byte limit", url=shown)
            body = bytearray()
            for chunk in response.iter_content(_CHUNK):
                body += chunk
                if len(body) > self.max_body:
                    raise RosterFetchError(
                        "too-large", f"GET {shown}: body exceeds the {self.max_body}-byte "
                        "limit (reading stopped)", url=shown)
            return bytes(body), content_type
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            raise RosterFetchError(
                "timeout", f"GET {shown}: no complete reply within {self.total_timeout:g} s",
                url=shown) from None
        except requests.exceptions.Timeout as exc:  # ConnectTimeout, ReadTimeout
            raise RosterFetchError("timeout", f"GET {shown}: {_describe(exc)}",
                                   url=shown) from None
        except requests.exceptions.ConnectionError as exc:
            # A read timeout while streaming the body arrives wrapped in a
            # ConnectionError by iter_content.
            reason = "timeout" if _is_read_timeout(exc) else "connection"
            raise RosterFetchError(reason, f"GET {shown}: {_describe(exc)}",
                                   url=shown) from None
        except requests.exceptions.ContentDecodingError as exc:
            raise RosterFetchError("format", f"GET {shown}: cannot decode body: {_describe(exc)}",
                                   url=shown) from None
        except requests.exceptions.RequestException as exc:
            # ChunkedEncodingError (connection dropped mid-body), InvalidURL, ...
            raise RosterFetchError("connection", f"GET {shown}: {_describe(exc)}",
                                   url=shown) from None
        finally:
            deadline.close()
            if response is not None:
                # Closes the connection unless the body was fully read, in
                # which case it already went back to the pool.
                response.close()


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length")
    if value is None:
        return None
    try:
        return int(value.split(",")[0].strip())
    except ValueError:
        return None


def _is_read_timeout(exc: BaseException) -> bool:
    seen = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return True
        stack.append(cur.__cause__)
        stack.append(cur.__context__)
        stack.extend(a for a in getattr(cur, "args", ()) if isinstance(a, BaseException))
        stack.append(getattr(cur, "reason", None)
                     if isinstance(getattr(cur, "reason", None), BaseException) else None)
    return False


def _describe(exc: BaseException) -> str:
    # requests/urllib3 messages nest repr()s several levels deep; keep the
    # innermost useful part short and on one line.
    return _one_line(exc)[:300] or type(exc).__name__


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _redact(url: str) -> str:
    """Remove user:password from a URL before it is logged or shown."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, "***@" + host, parts.path, parts.query, parts.fragment))
