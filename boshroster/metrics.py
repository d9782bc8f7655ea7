"""Counters for /metrics (Prometheus text format) and /health.

Each server has its own CollectorRegistry so that several servers in one
test process do not collide.  prometheus_client guards values with locks
that are gevent-aware once the process is monkey-patched.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.started = time.time()
        self.sessions = Gauge("boshroster_sessions", "Open XMPP streams", ["transport"], registry=self.registry)
        self.logins = Counter("boshroster_logins", "Successful SASL logins", registry=self.registry)
        self.login_failures = Counter("boshroster_login_failures", "Failed SASL logins", registry=self.registry)
        self.stanzas = Counter("boshroster_stanzas_routed", "Stanzas routed from clients", registry=self.registry)
        self.refreshes = Counter("boshroster_refresh_requests", "Roster refresh requests", ["outcome"], registry=self.registry)
        self.backend_fetches = Counter("boshroster_backend_fetches", "Roster fetches from the backend", registry=self.registry)
        self.backend_failures = Counter("boshroster_backend_failures", "Failed roster fetches", registry=self.registry)
        self.backend_latency = Histogram(
            "boshroster_backend_latency_seconds", "Roster fetch latency", registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self._open = {"bosh": 0, "websocket": 0, "test": 0}

    def session_opened(self, transport: str) -> None:
        self._open[transport] = self._open.get(transport, 0) + 1
        self.sessions.labels(transport).inc()

    def session_closed(self, transport: str) -> None:
        self._open[transport] = self._open.get(transport, 0) - 1
        self.sessions.labels(transport).dec()

    def open_sessions(self) -> dict:
        return {k: v for k, v in self._open.items() if v or k != "test"}

    def login_ok(self) -> None:
        self.logins.inc()

    def login_failed(self) -> None:
        self.login_failures.inc()

    def stanza_routed(self) -> None:
        self.stanzas.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
