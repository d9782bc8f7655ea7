"""Fetching a user's roster from the backend app (roster-delegation-contract §1).

``RosterBackend.fetch(username)`` does one ``GET`` of ``http_roster_url`` with
``%s`` replaced by the URL-encoded username, and returns a ``Roster`` or raises
``RosterFetchError``.  Unlike Prosody's module (which can wait on a backend
forever and treats any 2xx as a roster) it always answers, bounded in time:

* connect and read timeouts on the socket, plus an overall deadline
  (``gevent.Timeout``) so a backend that trickles bytes forever cannot hold us;
* a body limit enforced while streaming (and up front from Content-Length);
* a global ``BoundedSemaphore`` on concurrent requests, with a bounded wait
  for a free slot;
* only a 200 is a roster: redirects are not followed (a backend that
  redirects to a login page gets a clear 'status' error);
* one pooled ``requests.Session`` (keep-alive), which never stores cookies
  (a cookie set while fetching alice's roster must not be sent for bob's) and
  by default ignores proxy environment variables and ``.netrc``; its adapter
  keeps ``max_concurrency`` connections, so every request in flight has one
  to go back to (``connections_opened`` counts new TCP connections);
* conditional GETs for revalidation (``fetch_validated``): ``If-None-Match``
  with the ETag and ``If-Modified-Since`` with the Last-Modified the backend
  sent with the roster (RFC 9110 §13.1.2, §13.1.3); ``304`` means "the roster
  you have is current".

Per-call cost (issue 12): the settings of the session are merged once and
every fetch sends a request built from a template prepared once (only the
URL and the conditional headers differ); the adapter does not extract cookies
(they are refused anyway) and reuses the one connection pool of the one
origin.  Before reading each reply the socket gets ``TCP_QUICKACK``: a
backend that writes headers and body in two writes without ``TCP_NODELAY``
(Python's ``http.server``, and others) otherwise waits for our delayed ACK,
~40 ms per fetch on a kept-alive connection.

The process must be monkey-patched by gevent (``monkey.patch_all()`` before
``requests`` is imported) or every fetch blocks the whole hub.

There is no single flight here: that is ``roster_cache.RosterCache``.
"""

from __future__ import annotations

import http.cookiejar
import json
import logging
import time
from typing import NamedTuple
from urllib.parse import quote, urlsplit, urlunsplit

import gevent
import requests
import urllib3
from gevent.lock import BoundedSemaphore
from requests.models import PreparedRequest

from boshroster.roster.backend_http import _BackendAdapter, _Counters
from boshroster.roster.model import Roster, RosterFormatError

log = logging.getLogger("boshroster.roster_backend")

__all__ = ["RosterBackend", "RosterFetchError", "Validators"]

_CHUNK = 64 * 1024
_DEADLINE_SLACK = 0.5  # seconds added to connect+read for the overall deadline
_MARKER = "BOSHROSTERUSERNAME"  # stands for the username while the template is prepared


class Validators(NamedTuple):
    """What the backend sent to identify a roster version (RFC 9110 §8.8): the
    ``ETag`` and ``Last-Modified`` header values, as sent, or None."""

    etag: str | None
    last_modified: str | None


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
        ``session``: use this ``requests.Session`` as given (tests; its
        connections are not counted); by default a private one is built with
        an HTTPAdapter keeping ``max_concurrency`` connections, no cookies,
        and ``trust_env`` as given."""
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
        self._counters = _Counters()
        if session is None:
            session = requests.Session()
            # pool_maxsize = the concurrency bound: with fewer pooled connections
            # than requests in flight, the surplus is opened and thrown away
            # each time (urllib3 keeps 10 by default).
            adapter = _BackendAdapter(self._counters, pool_connections=1,
                                      pool_maxsize=max_concurrency, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            session.trust_env = trust_env
        self._session = session
        # Session.get() merges the session's settings with the environment's and
        # prepares the request (URL parsing, IDNA, auth, cookies) on every call;
        # all of it is the same for every username.  So it is done once, on the
        # first fetch (_prepare_once): a template request, the merged send
        # settings and the adapter; a fetch then only puts the URL in.
        self._headers = requests.structures.CaseInsensitiveDict(session.headers)
        self._headers["Accept"] = "application/json"
        self._send_settings: dict | None = None
        self._template: PreparedRequest | None = None
        self._url_parts: tuple[str, str] = ("", "")
        self._adapter = None
        self._shown_template = _redact(url_template) if url_template else ""
        self._slots = BoundedSemaphore(max_concurrency)
        self.fetches = 0
        self.failures = 0
        self.total_latency = 0.0
        self.in_flight = 0
        self.last_error: str | None = None  # message of the latest failure, for /health
        self.last_ok: float | None = None  # wall-clock time of the latest success
        self.last_failure: float | None = None  # wall-clock time of the latest failure
        self.conditional = 0  # conditional GETs sent (revalidation)
        self.not_modified = 0  # of which answered 304

    def url_for(self, username: str) -> str:
        return self.url_template.replace("%s", quote(username, safe=""))

    @property
    def connections_opened(self) -> int:
        """New TCP connections to the backend so far (keep-alive check: with
        reuse this stays at most ``max_concurrency`` plus reconnects after the
        backend closed idle ones)."""
        return self._counters.connections

    def close(self) -> None:
        """Close pooled connections (at shutdown)."""
        self._session.close()

    def fetch(self, username: str) -> Roster:
        """GET the user's roster; return it or raise RosterFetchError.

        Yields to the hub (network I/O, waiting for a slot); bounded by
        ``queue_timeout + total_timeout`` in all."""
        return self.fetch_validated(username)[0]

    def fetch_validated(self, username: str, validators: Validators | None = None
                        ) -> tuple[Roster | None, Validators | None]:
        """Like ``fetch``, and also return the roster's validators.

        With ``validators`` (from an earlier fetch of this user) the GET is
        conditional; ``(None, validators)`` means 304 Not Modified: the roster
        the caller has is current.  Otherwise ``(roster, validators or None)``.
        A 304 to an unconditional GET is a 'status' error."""
        if not self.configured:
            self._account(0.0, failed=False)
            return Roster(), None
        quoted = quote(username, safe="")
        shown = self._shown_template.replace("%s", quoted)
        started = time.monotonic()
        try:
            roster, got = self._fetch(username, quoted, shown, validators)
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
        if roster is None:
            self.not_modified += 1
            log.debug("roster not modified: user=%r url=%s elapsed_ms=%d", username, shown, elapsed * 1000)
        else:
            log.debug("roster fetched: user=%r url=%s items=%d ver=%s elapsed_ms=%d",
                      username, shown, len(roster), roster.ver, elapsed * 1000)
        return roster, got

    # -- internals ------------------------------------------------------------
    def _account(self, elapsed: float, *, failed: bool) -> None:
        self.fetches += 1
        self.total_latency += elapsed
        if failed:
            self.failures += 1

    def _fetch(self, username: str, quoted: str, shown: str, validators: Validators | None
               ) -> tuple[Roster | None, Validators | None]:
        if not self._slots.acquire(timeout=self.queue_timeout):
            raise RosterFetchError(
                "timeout", f"GET {shown}: no free backend slot within {self.queue_timeout:g} s "
                f"({self.in_flight} requests in flight)", url=shown)
        self.in_flight += 1
        try:
            body, content_type, got = self._get_body(quoted, shown, validators)
        finally:
            self.in_flight -= 1
            self._slots.release()
        if body is None:  # 304
            return None, validators
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise RosterFetchError(
                "format", f"GET {shown}: body is not JSON ({_one_line(exc)}); "
                f"Content-Type {content_type!r}, body starts {body[:60]!r}", url=shown) from None
        try:
            return Roster.from_backend_json(data, log_context=username), got
        except RosterFormatError as exc:
            raise RosterFetchError("format", f"GET {shown}: {exc}", url=shown) from None

    def _prepare_once(self) -> None:
        """The template request, merged settings and adapter (see __init__).

        The template is prepared with a marker for the username, so the URL
        is normalised by requests exactly once (IDNA host, quoting of the
        fixed parts); the username is quoted by ``quote(safe="")``, which
        leaves nothing for requests' re-quoting to change."""
        session = self._session
        sample = self.url_template.replace("%s", _MARKER)
        template = requests.Request("GET", sample, headers=self._headers, auth=session.auth).prepare()
        head, sep, tail = template.url.partition(_MARKER)
        if not sep:  # pragma: no cover - the marker is plain ASCII letters
            raise ValueError(f"cannot prepare roster URL template {self._shown_template!r}")
        self._url_parts = (head, tail)
        settings = session.merge_environment_settings(sample, {}, True, None, None)
        self._adapter = session.get_adapter(template.url)
        self._send_settings = settings
        self._template = template

    def _request_for(self, quoted: str, validators: Validators | None) -> PreparedRequest:
        template = self._template
        prepared = PreparedRequest()
        prepared.method = "GET"
        head, tail = self._url_parts
        prepared.url = head + quoted + tail
        headers = template.headers.copy()
        if validators is not None:
            # RFC 9110 §13.1.2/§13.1.3: the server evaluates If-None-Match and
            # ignores If-Modified-Since when both are sent.
            if validators.etag is not None:
                headers["If-None-Match"] = validators.etag
            if validators.last_modified is not None:
                headers["If-Modified-Since"] = validators.last_modified
        prepared.headers = headers
        prepared.body = None
        return prepared

    def _get_body(self, quoted: str, shown: str, validators: Validators | None
                  ) -> tuple[bytes | None, str, Validators | None]:
        """(body, Content-Type, validators of the reply); body None for a 304."""
        if self._template is None:
            self._prepare_once()
        conditional = validators is not None and any(validators)
        if not conditional:
            validators = None
        else:
            self.conditional += 1
        # A BaseException (gevent.Timeout) so no `except Exception` in
        # requests/urllib3 can swallow it; matched by identity below.
        deadline = gevent.Timeout(self.total_timeout)
        reply = None
        consumed = False
        deadline.start()
        try:
            reply = self._adapter.send(
                self._request_for(quoted, validators),
                timeout=(self.connect_timeout, self.read_timeout), **self._send_settings)
            status = reply.status_code
            if status == 304 and conditional:
                # RFC 9110 §15.4.5: a 304 has no body; reading it (b"") marks it consumed.
                consumed = not reply.raw.read(_CHUNK)
                return None, "", validators
            headers = reply.headers
            if status != 200:
                message = f"GET {shown}: HTTP {status} {reply.reason or ''}".rstrip()
                location = headers.get("Location")
                if reply.is_redirect and location:
                    message += f" (to {_redact(location)}; redirects are not followed)"
                raise RosterFetchError("status", message, url=shown, status=status)
            content_type = headers.get("Content-Type", "")
            etag, modified = headers.get("ETag"), headers.get("Last-Modified")
            got = Validators(etag, modified) if (etag or modified) else None
            declared = _content_length(headers)
            if declared is not None and declared > self.max_body:
                raise RosterFetchError(
                    "too-large", f"GET {shown}: Content-Length {declared} exceeds the "
                    f"{self.max_body}-byte limit", url=shown)
            # One read of at most max_body + 1 bytes (decoded): a longer body is
            # too large, and reading stops there.
            body = reply.raw.read(self.max_body + 1, decode_content=True)
            if len(body) > self.max_body:
                raise RosterFetchError(
                    "too-large", f"GET {shown}: body exceeds the {self.max_body}-byte "
                    "limit (reading stopped)", url=shown)
            consumed = True
            return body, content_type, got
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            raise RosterFetchError(
                "timeout", f"GET {shown}: no complete reply within {self.total_timeout:g} s",
                url=shown) from None
        except (requests.exceptions.Timeout, urllib3.exceptions.ReadTimeoutError) as exc:
            # ConnectTimeout, ReadTimeout (headers); ReadTimeoutError (body)
            raise RosterFetchError("timeout", f"GET {shown}: {_describe(exc)}",
                                   url=shown) from None
        except requests.exceptions.ConnectionError as exc:
            reason = "timeout" if _is_read_timeout(exc) else "connection"
            raise RosterFetchError(reason, f"GET {shown}: {_describe(exc)}",
                                   url=shown) from None
        except urllib3.exceptions.DecodeError as exc:
            raise RosterFetchError("format", f"GET {shown}: cannot decode body: {_describe(exc)}",
                                   url=shown) from None
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # connection dropped mid-body (ProtocolError), InvalidURL, ...
            raise RosterFetchError("connection", f"GET {shown}: {_describe(exc)}",
                                   url=shown) from None
        finally:
            deadline.close()
            if reply is not None:
                reply.close(consumed)


def _content_length(headers) -> int | None:
    value = headers.get("Content-Length")
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
