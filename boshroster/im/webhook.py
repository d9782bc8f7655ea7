"""The offline-message webhook: tell the web app that a user got a message while offline (issue 13 item 3).

Hooks ``message-stored`` (fired by messages.py with a StoredMessage once a
message is in offline storage) and POSTs ``{"to", "from", "body", "stamp"}``
as JSON to ``offline_message_webhook_url`` (``Authorization: Bearer
<offline_message_webhook_secret>`` when set), so the app can send an e-mail
or a push.  Messages without a ``<body/>`` (chat states, receipts) are not
notified: there is nothing to tell.

It never blocks delivery: the hook only appends to a bounded queue
(``offline_message_webhook_queue`` notifications, and at most
``MAX_QUEUED_BYTES`` of bodies); when it is full the notification is dropped
with a WARNING and counted.  One worker greenlet drains the queue, one POST
at a time over a pooled ``requests.Session``: each attempt is bounded by
``offline_message_webhook_timeout`` (connect, read, and the whole attempt),
failures are retried ``offline_message_webhook_retries`` times with a
doubling backoff, then given up.  A dead endpoint costs a log line (at most
one WARNING per ``WARN_INTERVAL`` while it keeps failing) and the counters
``boshroster_offline_webhook_total{outcome="sent|failed|dropped|retried"}``.
Every attempt for one message carries the same ``X-Boshroster-Delivery``
id, so a receiver can drop a duplicate (a retry after a timeout may arrive
twice).

Greenlet safety: the queue is shared by the greenlets that store messages
(``put_nowait`` and the byte count, which never yield) and the worker
(``get``); the failure-log state is touched only by the worker.
"""

from __future__ import annotations

import http.cookiejar
import json
import logging
import time
import uuid
from datetime import datetime, timezone

import gevent
import gevent.queue
import requests
from requests.adapters import HTTPAdapter

from boshroster import __version__
from boshroster.xmpp.tags import BODY

log = logging.getLogger("boshroster.webhook")

MAX_QUEUED_BYTES = 32 * 1024 * 1024  # bodies waiting, all notifications together
WARN_INTERVAL = 60.0  # seconds between two WARNINGs about a failing endpoint
_RETRYABLE = {408, 425, 429}  # and every 5xx


def iso_utc(when: float) -> str:
    """XEP-0082 / ISO 8601 UTC timestamp with milliseconds (what XEP-0203 stamps look like)."""
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class OfflineWebhook:
    """The queue, the worker and the HTTP client of the webhook; see the module doc."""

    def __init__(self, url: str, domain: str, counter, *, secret: str = "", timeout: float = 5.0,
                 retries: int = 3, backoff: float = 1.0, queue_size: int = 1000,
                 clock=time.time, sleep=gevent.sleep):
        self.url = url
        self.domain = domain
        self.counter = counter  # prometheus Counter labelled by outcome (web/metrics.py)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.clock = clock
        self.sleep = sleep
        self.queue: gevent.queue.Queue = gevent.queue.Queue(maxsize=queue_size)
        self.queued_bytes = 0
        self.headers = {"Content-Type": "application/json", "User-Agent": f"boshroster/{__version__}"}
        if secret:
            self.headers["Authorization"] = f"Bearer {secret}"
        self.http = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
        self.http.mount("http://", adapter)
        self.http.mount("https://", adapter)
        self.http.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self.http.trust_env = False  # the app's URL is configured here, not by the environment's proxies
        self._failing_since_warning = 0  # failures not yet reported (worker only)
        self._last_warning = None  # monotonic time of the last WARNING (worker only)
        self._worker = gevent.spawn(self._run)

    @classmethod
    def from_config(cls, config, metrics) -> "OfflineWebhook | None":
        if not config.offline_message_webhook_url:
            return None
        return cls(config.offline_message_webhook_url, config.domain, metrics.webhook,
                   secret=config.offline_message_webhook_secret, timeout=config.offline_message_webhook_timeout,
                   retries=config.offline_message_webhook_retries, backoff=config.offline_message_webhook_backoff,
                   queue_size=config.offline_message_webhook_queue)

    def register(self, bus) -> None:
        bus.hook("message-stored", self.on_stored)

    # -- the hook: never yields -----------------------------------------------------

    def on_stored(self, event) -> None:
        body = event.stanza.find(BODY)
        if body is None or not body.text:
            return None
        payload = {
            "to": f"{event.username}@{self.domain}",
            "from": event.stanza.get("from"),
            "body": body.text,
            "stamp": iso_utc(self.clock()),
        }
        size = len(body.text)
        if self.queue.full() or self.queued_bytes + size > MAX_QUEUED_BYTES:
            self.counter.labels("dropped").inc()
            log.warning("offline webhook: queue full (%d waiting, %d bytes), notification for %s dropped",
                        self.queue.qsize(), self.queued_bytes, payload["to"])
            return None
        self.queued_bytes += size
        self.queue.put_nowait((payload, size))
        return None

    # -- the worker -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            payload, size = self.queue.get()
            self.queued_bytes -= size
            try:
                self._deliver(payload)
            except gevent.GreenletExit:
                raise
            except Exception:  # a bug costs one notification, never the worker
                log.exception("offline webhook: unexpected error sending a notification for %s", payload["to"])
                self.counter.labels("failed").inc()

    def _deliver(self, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        headers = {**self.headers, "X-Boshroster-Delivery": uuid.uuid4().hex}
        reason, attempts = "", 0
        for attempt in range(self.retries + 1):
            if attempt:
                self.counter.labels("retried").inc()
                self.sleep(self.backoff * 2 ** (attempt - 1))
            attempts += 1
            retry, reason = self._attempt(data, headers)
            if retry is None:
                self.counter.labels("sent").inc()
                if self._last_warning is not None:
                    log.info("offline webhook: %s answers again", self.url)
                    self._last_warning = None
                    self._failing_since_warning = 0
                log.debug("offline webhook: notified %s of a message for %s", self.url, payload["to"])
                return
            log.debug("offline webhook: attempt %d for %s failed: %s", attempt + 1, payload["to"], reason)
            if not retry:
                break
        self.counter.labels("failed").inc()
        self._report_failure(payload["to"], reason, attempts)

    def _attempt(self, data: bytes, headers: dict) -> tuple[bool | None, str]:
        """One POST: (None, "") on a 2xx, else (retryable?, why)."""
        try:
            with gevent.Timeout(self.timeout + 0.5):  # the whole attempt, however the endpoint trickles
                response = self.http.post(self.url, data=data, headers=headers,
                                          timeout=(self.timeout, self.timeout), stream=True)
                response.close()  # the answer's body is not needed (and not read)
        except gevent.Timeout:
            return True, f"no answer within {self.timeout}s"
        except requests.exceptions.RequestException as exc:
            return True, _reason(exc)
        status = response.status_code
        if 200 <= status < 300:
            return None, ""
        return status >= 500 or status in _RETRYABLE, f"HTTP {status}"

    def _report_failure(self, to: str, reason: str, attempts: int) -> None:
        """One WARNING now and then, not one per message, while the endpoint keeps failing."""
        self._failing_since_warning += 1
        now = time.monotonic()
        if self._last_warning is not None and now - self._last_warning < WARN_INTERVAL:
            return
        log.warning("offline webhook: could not notify %s of a message for %s after %d attempt(s): %s "
                    "(%d notification(s) given up since the last warning; messages stay stored)",
                    self.url, to, attempts, reason, self._failing_since_warning)
        self._last_warning = now
        self._failing_since_warning = 0

    def close(self) -> None:
        """At shutdown: stop the worker; what is still queued is counted as dropped."""
        self._worker.kill(block=False)
        left = self.queue.qsize()
        if left:
            self.counter.labels("dropped").inc(left)
            log.warning("offline webhook: %d notification(s) not sent at shutdown", left)
        self.http.close()


def _reason(exc: Exception) -> str:
    """The innermost OS-level cause of a requests error ('Connection refused'), else its class and text."""
    seen, err = 0, exc
    while err is not None and seen < 12:
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
        err = getattr(err, "reason", None) or err.__cause__ or err.__context__
        seen += 1
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    return f"{type(exc).__name__}: {str(exc)[:200]}"
