"""BOSH behind a load balancer without stickiness: relay a request to the node owning its sid.

nginx cannot see the sid (it is in the POST body), so any node may get any
request.  A node's sids start with ``<node_id>.`` (BoshManager.sid_prefix); a
request for another node's sid is POSTed, body unchanged, to that node's
``cluster_internal_url`` and its answer relayed as it is.  The owner applies
every XEP-0124 rule (rid window, hold, wait, overactivity) itself, so they
hold across nodes.  The relay waits longer than the longest wait
(``bosh_max_wait`` + 10 s).  A relayed request is never relayed again
(``X-Boshroster-Relayed``): a sid whose owner is unknown or unreachable gets
``item-not-found`` (XEP-0124 §17.2: the client starts a new session, through
any node).

Greenlet safety: the HTTP session (requests, gevent-patched sockets) keeps a
bounded pool per owner; ``_urls`` (node -> (expiry, url)) is a small cache
written without yielding.
"""

from __future__ import annotations

import logging
import time

import requests
from requests.adapters import HTTPAdapter

from boshroster.transports.bosh import terminate_body

log = logging.getLogger("boshroster.cluster.bosh")

RELAYED = "HTTP_X_BOSHROSTER_RELAYED"
URL_SECONDS = 10.0


class BoshForwarder:
    def __init__(self, node, max_wait: int, pool_size: int = 100):
        self.node = node  # ClusterNode: node id, url_of
        self.sid_prefix = f"{node.node}."
        self.timeout = (3.0, max_wait + 10.0)
        self.http = requests.Session()
        self.http.mount("http://", HTTPAdapter(pool_connections=16, pool_maxsize=pool_size))
        self.http.mount("https://", HTTPAdapter(pool_connections=16, pool_maxsize=pool_size))
        self._urls: dict[str, tuple[float, str | None]] = {}
        self.relayed = 0
        self.failed = 0

    def relay(self, body, data: bytes, environ) -> bytes | None:
        """The owner's answer for a foreign sid, or None when this node should answer."""
        sid = body.get("sid")
        if not sid or sid.startswith(self.sid_prefix):
            return None
        owner, dot, _ = sid.partition(".")
        if not dot:
            return None  # not a cluster sid: ours to refuse
        if environ.get(RELAYED):
            log.warning("BOSH sid of %s relayed to %s: not relayed again", owner, self.node.node)
            return terminate_body("item-not-found")
        url = self._url(owner)
        if url is None:
            log.info("BOSH request for node %s, which is not in the cluster: item-not-found", owner)
            return terminate_body("item-not-found")
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        client = environ.get("REMOTE_ADDR", "")
        headers = {
            "Content-Type": "text/xml; charset=utf-8",
            "X-Boshroster-Relayed": self.node.node,
            "X-Forwarded-For": f"{forwarded}, {client}" if forwarded else client,
        }
        proto = environ.get("HTTP_X_FORWARDED_PROTO")
        if proto:
            headers["X-Forwarded-Proto"] = proto
        try:
            response = self.http.post(url.rstrip("/") + "/http-bind", data=data, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            self.failed += 1
            self._urls.pop(owner, None)
            log.warning("BOSH relay to %s (%s) failed: %s", owner, url, exc)
            return terminate_body("item-not-found")
        if response.status_code != 200:
            self.failed += 1
            log.warning("BOSH relay to %s answered HTTP %d", owner, response.status_code)
            return terminate_body("item-not-found")
        self.relayed += 1
        return response.content

    def _url(self, owner: str) -> str | None:
        now = time.monotonic()
        cached = self._urls.get(owner)
        if cached is not None and cached[0] > now:
            return cached[1]
        url = self.node.url_of(owner)
        self._urls[owner] = (now + URL_SECONDS, url)
        return url
