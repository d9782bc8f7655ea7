"""The HTTP face: one WSGI app for /http-bind, /xmpp-websocket, the refresh API and the rest.

The two hot paths (BOSH and the WebSocket upgrade) are dispatched before
Bottle to keep per-request overhead low; Bottle serves everything else
(refresh, health, metrics, host-meta, static files).  The client's address
and whether the path is TLS-protected come from X-Forwarded-* headers only
when the TCP peer is a trusted proxy (never from Bottle's remote_addr,
which believes any X-Forwarded-For).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import xml.sax.saxutils

import bottle
from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily

from boshroster import __version__

from boshroster.xmpp import xmlio
from boshroster.transports.bosh import terminate_body
from boshroster.transports.bosh_body import parse_empty_body
from boshroster.transports.bosh_manager import BoshManager
from boshroster.transports.bosh_watch import ENVIRON_KEY as BOSH_SOCKET
from boshroster.roster.refresh import RefreshBadRequest, parse_refresh_body
from boshroster.web.access import client_address, request_denied, from_trusted_proxy
from boshroster.transports.http_limits import ClientGone
from boshroster.transports.request_body import read_body
from boshroster.xmpp.stream import Peer
from boshroster.transports.websocket import WebSocketStream
from boshroster.transports.ws_connection import ENVIRON_KEY
from boshroster.web.api import AppApi  # the app's API (issue 13)

log = logging.getLogger("boshroster.web")

# RFC 3986 §3.2.2 host (reg-name or IP-literal) with an optional port: what a Host header may be.
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


def _xml_attr(text: str) -> str:
    """Escaped for a single- or double-quoted XML attribute."""
    return xml.sax.saxutils.escape(text, {"'": "&apos;", '"': "&quot;"})


# The checkout's static/ (boshroster/web/app.py -> ../../static).
STATIC_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "static")
_XML_TYPE = "text/xml; charset=utf-8"

_BOSH_PAGE = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>boshroster BOSH endpoint</title></head>
<body><h1>BOSH endpoint</h1>
<p>This is the XMPP-over-BOSH endpoint (XEP-0124/XEP-0206) of a boshroster server.
Point an XMPP client such as Converse.js or Strophe.js at this URL; browsers
do not talk to it directly.</p></body></html>
"""


class BackendCollector:
    """The roster backend's counters (plain attributes of RosterBackend) as
    Prometheus families, read at scrape time: fetch attempts, failures, and the
    latency as a summary (count = attempts, sum = seconds)."""

    def __init__(self, core):
        self.core = core

    def collect(self):
        backend = self.core.roster_backend
        fetches = getattr(backend, "fetches", None)
        if fetches is None:
            return
        yield CounterMetricFamily("boshroster_backend_fetches", "Roster fetch attempts to the backend", value=fetches)
        yield CounterMetricFamily("boshroster_backend_failures", "Failed roster fetches",
                                  value=getattr(backend, "failures", 0))
        yield SummaryMetricFamily("boshroster_backend_latency_seconds", "Roster fetch latency, all attempts",
                                  count_value=fetches, sum_value=getattr(backend, "total_latency", 0.0))


def _reachable(backend) -> bool | None:
    ok, failed = getattr(backend, "last_ok", None), getattr(backend, "last_failure", None)
    if ok is None and failed is None:
        return None
    return failed is None or (ok is not None and ok >= failed)


class WebApp:
    """The WSGI application of one server."""

    def __init__(self, core):
        self.core = core
        self.config = core.config
        self.bosh = BoshManager(core.stream_context)
        # Cluster (issue 14): sids name their node; a request for another node's sid is relayed there.
        self.bosh_forwarder = getattr(core, "bosh_forwarder", None)
        if self.bosh_forwarder is not None:
            self.bosh.sid_prefix = self.bosh_forwarder.sid_prefix
        # Node-to-node requests of a cluster (XEP-0198 hand-over), each checks the cluster secret.
        self.internal_routes = getattr(core, "internal_routes", None) or {}
        self.static_dir = self.config.static_dir or STATIC_DEFAULT
        self.started = time.time()
        self._install_backend_metrics()
        self.bottle = self._build_bottle()

    def _install_backend_metrics(self) -> None:
        """Serve the roster backend's series from RosterBackend's own counters,
        read at scrape time (the backend counts for itself)."""
        self.core.metrics.registry.register(BackendCollector(self.core))

    # -- request context ---------------------------------------------------

    def peer(self, environ, transport: str) -> Peer:
        """The client behind any trusted proxies, and whether its path is TLS."""
        remote = environ.get("REMOTE_ADDR", "")
        ip = client_address(remote, environ.get("HTTP_X_FORWARDED_FOR"), self.config.trusted_proxies)
        secure = environ.get("wsgi.url_scheme") == "https"
        if self.from_trusted_proxy(environ):
            secure = secure or environ.get("HTTP_X_FORWARDED_PROTO", "").lower() == "https"
        if transport == "bosh" and self.config.consider_bosh_secure:
            secure = True
        if transport == "websocket" and self.config.consider_websocket_secure:
            secure = True
        return Peer(ip, secure)

    def from_trusted_proxy(self, environ) -> bool:
        return from_trusted_proxy(environ.get("REMOTE_ADDR", ""), self.config.trusted_proxies)

    def cors_headers(self, environ) -> list[tuple[str, str]]:
        allowed = self.config.cors_allowed_origins
        origin = environ.get("HTTP_ORIGIN")
        if "*" in allowed:
            value = "*"
        elif origin and origin in allowed:
            value = origin
        else:
            return []
        headers = [
            ("Access-Control-Allow-Origin", value),
            ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
            ("Access-Control-Allow-Headers", "Content-Type"),
            ("Access-Control-Max-Age", "7200"),
        ]
        if value != "*":
            headers.append(("Vary", "Origin"))
        return headers

    # -- WSGI entry ----------------------------------------------------------

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/http-bind" or path == "/http-bind/":
            return self._bosh(environ, start_response)
        if path == "/xmpp-websocket" and ENVIRON_KEY in environ:
            return self._websocket(environ, start_response)
        internal = self.internal_routes.get(path)
        if internal is not None:
            return internal(environ, start_response)
        return self.bottle(environ, start_response)

    def _bosh(self, environ, start_response):
        method = environ.get("REQUEST_METHOD")
        cors = self.cors_headers(environ)
        if method == "OPTIONS":
            start_response("200 OK", cors + [("Content-Length", "0")])
            return [b""]
        if method == "GET":
            start_response("200 OK", cors + [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(_BOSH_PAGE)))])
            return [_BOSH_PAGE]
        if method != "POST":
            start_response("405 Method Not Allowed", cors + [("Allow", "GET, POST, OPTIONS"), ("Content-Length", "0")])
            return [b""]
        data = read_body(environ, self.config.bosh_max_body)
        if data is None:
            log.warning("BOSH body over %d bytes from %s refused", self.config.bosh_max_body, environ.get("REMOTE_ADDR"))
            reply = terminate_body("policy-violation")
        else:
            try:
                body = parse_empty_body(data)  # a re-poll, most often: no parser (bosh_body.py)
                if body is None:
                    body = xmlio.parse(data, self.config.bosh_max_body, child_limit=self.config.stanza_size_limit,
                                       max_depth=self.config.stanza_max_depth)
            except xmlio.XMLError as err:
                reply = self._refused_body(environ, err)
            else:
                relayed = self.bosh_forwarder.relay(body, data, environ) if self.bosh_forwarder is not None else None
                reply = relayed if relayed is not None else self.bosh.handle(
                    body, lambda: self.peer(environ, "bosh"), environ.get(BOSH_SOCKET))
        start_response("200 OK", cors + [("Content-Type", _XML_TYPE), ("Content-Length", str(len(reply)))])
        return [reply]

    def _refused_body(self, environ, err: xmlio.XMLError) -> bytes:
        """The answer to a BOSH body the parser refused (issue 10, points 6 and 7).

        Not acceptable XML: ``bad-request`` (XEP-0124 §17.2).  Well-formed but over
        a limit (a stanza in it larger than ``stanza_size_limit`` or nested deeper
        than ``stanza_max_depth``): the session the body names ends with a
        ``policy-violation`` stream error, as a WebSocket client's would (RFC 6120
        §4.9.3.18, XEP-0206 §7), and nothing in the body is processed.  Runs in the
        request's greenlet; ``session.fail`` answers the session's held request too."""
        peer = environ.get("REMOTE_ADDR")
        if err.condition != "policy-violation":
            log.info("bad BOSH body from %s: %s", peer, err.text)
            return terminate_body("bad-request")
        log.warning("BOSH body from %s refused: %s", peer, err.text)
        doc = err.document
        sid = doc.get("sid") if doc is not None and doc.tag == f"{{{xmlio.NS_BOSH}}}body" else None
        bosh = self.bosh.sessions.get(sid) if sid else None
        if bosh is None:
            return terminate_body("policy-violation")
        bosh.session.fail("policy-violation", err.text)
        return bosh.terminal or terminate_body("policy-violation")

    def _websocket(self, environ, start_response):
        conn = environ[ENVIRON_KEY]
        stream = WebSocketStream(self.core.stream_context, conn, self.peer(environ, "websocket"))
        stream.run()
        return []

    # -- everything else: Bottle ---------------------------------------------------

    def _build_bottle(self) -> bottle.Bottle:
        app = bottle.Bottle(autojson=False)
        app.route("/roster_admin/refresh", "POST", self.refresh_many)
        app.route("/roster_admin/refresh/<username>", "GET", self.refresh_one)
        AppApi(self.core).register(app)  # /api/...: the app's API (issue 13), before the static catch-all
        app.route("/health", "GET", self.health)
        app.route("/metrics", "GET", self.metrics)
        app.route("/.well-known/host-meta", ["GET", "OPTIONS"], self.host_meta)
        app.route("/.well-known/host-meta.json", ["GET", "OPTIONS"], self.host_meta_json)
        app.route("/xmpp-websocket", "GET", self.websocket_page)
        app.route("/", "GET", lambda: self.static("index.html"))
        app.route("/<path:path>", "GET", self.static)
        return app

    def _json(self, status: int, payload: dict) -> str:
        bottle.response.status = status
        bottle.response.content_type = "application/json"
        return json.dumps(payload)

    def _refresh_denied(self):
        req = bottle.request
        denied = request_denied(req.environ, self.config)
        if denied is None:
            return None
        status, message = denied
        log.warning("refresh refused (%d) for %s: %s", status, req.environ.get("REMOTE_ADDR"), message)
        self.core.metrics.refreshes.labels("refused").inc()
        if status == 401:
            bottle.response.set_header("WWW-Authenticate", 'Bearer realm="boshroster"')
        return self._json(status, {"status": "error", "message": message})

    def refresh_many(self):
        denied = self._refresh_denied()
        if denied is not None:
            return denied
        try:
            data = read_body(bottle.request.environ, self.config.refresh_max_body)
        except ClientGone as err:  # Bottle would log a traceback and answer 500
            log.info("refresh request from %s: body incomplete (%s)", bottle.request.environ.get("REMOTE_ADDR"), err)
            bottle.response.set_header("Connection", "close")
            return self._json(400, {"status": "error", "message": "request body incomplete"})
        try:
            if data is None:
                raise RefreshBadRequest(f"body larger than {self.config.refresh_max_body} bytes")
            usernames = parse_refresh_body(data, max_users=self.config.refresh_max_users)
        except RefreshBadRequest as err:
            self.core.metrics.refreshes.labels("bad-request").inc()
            log.warning("bad refresh request from %s: %s", bottle.request.environ.get("REMOTE_ADDR"), err.message)
            return self._json(400, {"status": "error", "message": err.message})
        return self._do_refresh(usernames)

    def refresh_one(self, username):
        denied = self._refresh_denied()
        if denied is not None:
            return denied
        try:
            usernames = parse_refresh_body(json.dumps([username]).encode("utf-8"), max_users=1)
        except RefreshBadRequest as err:
            return self._json(400, {"status": "error", "message": err.message})
        return self._do_refresh(usernames)

    def _do_refresh(self, usernames):
        started = time.monotonic()
        updated, errors = self.core.roster.refresh_users(usernames, self.config.refresh_timeout)
        self.core.metrics.refreshes.labels("ok").inc()
        log.info(
            "refresh of %d user(s): %d updated, %d errors in %.0f ms",
            len(usernames), updated, errors, 1000 * (time.monotonic() - started),
        )
        return self._json(200, {"status": "ok", "message": "roster update complete", "updated": updated, "errors": errors})

    def health(self):
        backend = self.core.roster_backend
        payload = {
            "status": "ok",
            "version": __version__,
            "uptime_seconds": round(time.time() - self.started, 1),
            "sessions": self.core.metrics.open_sessions(),
            "bosh_sessions": len(self.bosh.sessions),
            "online_users": len(self.core.sessions.usernames()),
            "backend": {
                "configured": bool(self.config.http_roster_url),
                "fetches": getattr(backend, "fetches", None),
                "failures": getattr(backend, "failures", None),
                "last_error": getattr(backend, "last_error", None),
                "last_ok": getattr(backend, "last_ok", None),
                "last_failure": getattr(backend, "last_failure", None),
                # Reachable = the latest fetch succeeded (None before any fetch).
                "reachable": _reachable(backend),
            },
        }
        return self._json(200, payload)

    def metrics(self):
        bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return self.core.metrics.exposition()

    def _base_urls(self) -> tuple[str, str]:
        """The public http(s):// and ws(s):// base URLs of this server (XEP-0156).

        ``http_external_url`` when set (behind a proxy that rewrites Host, or to pin the
        public name); else the Host the client used (X-Forwarded-Host from a trusted proxy),
        if it is a plain host[:port] (RFC 3986 §3.2.2): anything else (an attacker's
        "<Link .../>") falls back to domain:port instead of being copied into the XRD."""
        external = self.config.http_external_url.rstrip("/")
        if external:
            scheme, rest = external.split("://", 1)
            return external, f"{'wss' if scheme == 'https' else 'ws'}://{rest}"
        env = bottle.request.environ
        host = env.get("HTTP_X_FORWARDED_HOST") if self.from_trusted_proxy(env) else None
        host = (host or env.get("HTTP_HOST") or "").split(",")[0].strip()
        if not _HOST.fullmatch(host):
            if host:
                log.info("host-meta for %s: Host header %r is not host[:port], using the domain",
                         env.get("REMOTE_ADDR"), host[:100])
            host = f"{self.config.domain}:{self.config.http_ports[0]}"
        secure = self.peer(env, "http").secure
        return (f"{'https' if secure else 'http'}://{host}", f"{'wss' if secure else 'ws'}://{host}")

    def _cors_for_discovery(self):
        bottle.response.set_header("Access-Control-Allow-Origin", "*")

    def host_meta(self):
        """XEP-0156: where the BOSH and WebSocket endpoints are."""
        self._cors_for_discovery()
        if bottle.request.method == "OPTIONS":
            return ""
        http, ws = (_xml_attr(url) for url in self._base_urls())
        bottle.response.content_type = "application/xrd+xml; charset=utf-8"
        return (
            "<?xml version='1.0' encoding='utf-8'?>\n"
            "<XRD xmlns='http://docs.oasis-open.org/ns/xri/xrd-1.0'>\n"
            f"  <Link rel='urn:xmpp:alt-connections:xbosh' href='{http}/http-bind'/>\n"
            f"  <Link rel='urn:xmpp:alt-connections:websocket' href='{ws}/xmpp-websocket'/>\n"
            "</XRD>\n"
        )

    def host_meta_json(self):
        self._cors_for_discovery()
        if bottle.request.method == "OPTIONS":
            return ""
        http, ws = self._base_urls()
        return self._json(200, {"links": [
            {"rel": "urn:xmpp:alt-connections:xbosh", "href": f"{http}/http-bind"},
            {"rel": "urn:xmpp:alt-connections:websocket", "href": f"{ws}/xmpp-websocket"},
        ]})

    def websocket_page(self):
        bottle.response.status = 426
        bottle.response.set_header("Upgrade", "websocket")
        bottle.response.content_type = "text/plain; charset=utf-8"
        return "This is the XMPP-over-WebSocket endpoint (RFC 7395): connect with a WebSocket client offering the 'xmpp' subprotocol.\n"

    def static(self, path):
        return bottle.static_file(path, root=self.static_dir)
