"""Counters for /metrics (Prometheus text format) and /health.

Each server has its own CollectorRegistry so that several servers in one
test process do not collide.

Greenlet safety: the hot counters (stanzas routed, open sessions) are plain
ints mutated by whichever greenlet handles the stanza or the session; an
``+= 1`` never yields, so no lock is needed.  They are turned into Prometheus
families only at scrape time (``_HotCounters``), which keeps a lock and a
label lookup off the per-stanza path (it was ~5% of a WebSocket message's
CPU).  The rare counters (logins, refreshes) use prometheus_client directly.
The roster backend's series come from RosterBackend itself (see web.py).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TRANSPORTS = ("bosh", "websocket")


class _HotCounters:
    """Reads Metrics' plain-int counters at scrape time."""

    def __init__(self, metrics: "Metrics"):
        self.metrics = metrics

    def collect(self):
        sessions = GaugeMetricFamily("boshroster_sessions", "Open XMPP streams", labels=["transport"])
        for transport, count in sorted(self.metrics.open_sessions().items()):
            sessions.add_metric([transport], count)
        yield sessions
        yield CounterMetricFamily("boshroster_stanzas_routed", "Stanzas routed from clients",
                                  value=self.metrics.stanzas_routed)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.started = time.time()
        self.stanzas_routed = 0
        self._open = {"bosh": 0, "websocket": 0}
        self.registry.register(_HotCounters(self))
        self.logins = Counter("boshroster_logins", "Successful SASL logins", registry=self.registry)
        self.login_failures = Counter("boshroster_login_failures", "Failed SASL logins", registry=self.registry)
        self.refreshes = Counter("boshroster_refresh_requests", "Roster refresh requests", ["outcome"], registry=self.registry)
        # Labelled series exist from the start (at 0), so a dashboard or an alert
        # does not see "no data" until the first refresh.
        for outcome in ("ok", "bad-request", "refused"):
            self.refreshes.labels(outcome)
        # The offline-message webhook (im/webhook.py) and the app's API (web/api.py), issue 13.
        self.webhook = Counter("boshroster_offline_webhook", "Offline-message webhook notifications",
                               ["outcome"], registry=self.registry)
        for outcome in ("sent", "failed", "dropped", "retried"):
            self.webhook.labels(outcome)
        self.api_requests = Counter("boshroster_api_requests", "App API requests", ["outcome"], registry=self.registry)
        for outcome in ("ok", "bad-request", "refused", "not-found"):
            self.api_requests.labels(outcome)

    def session_opened(self, transport: str) -> None:
        self._open[transport] = self._open.get(transport, 0) + 1

    def session_closed(self, transport: str) -> None:
        self._open[transport] = self._open.get(transport, 0) - 1

    def open_sessions(self) -> dict:
        """Open streams per transport; bosh and websocket always listed, others while open."""
        return {k: v for k, v in self._open.items() if v or k in TRANSPORTS}

    def login_ok(self) -> None:
        self.logins.inc()

    def login_failed(self) -> None:
        self.login_failures.inc()

    def stanza_routed(self) -> None:
        self.stanzas_routed += 1

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
