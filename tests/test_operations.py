"""Operations endpoints of the real server: /health, /metrics, host-meta, the demo
page at /, and the WebSocket endpoint answering plain GETs (issue 4, point 5)."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import gevent
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness import NS_STREAM, BoshClient, ServerProcess, WsClient, q

XRD = "{http://docs.oasis-open.org/ns/xri/xrd-1.0}"


def health(server) -> dict:
    reply = requests.get(server.base_url + "/health", timeout=5)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    return reply.json()


def wait_for(predicate, timeout=8.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        gevent.sleep(0.1)


def scrape(server) -> dict:
    """{(sample name, frozenset(labels)): value}; also checks the text parses and has no duplicate families."""
    reply = requests.get(server.base_url + "/metrics", timeout=5)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(reply.text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), f"duplicate metric families: {sorted(n for n in names if names.count(n) > 1)}"
    type_lines = [line for line in reply.text.splitlines() if line.startswith("# TYPE ")]
    assert len(type_lines) == len(set(type_lines)), "a metric is declared twice"
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_health_reports_uptime_sessions_by_transport_and_backend(make_server, backend):
    server = make_server(bosh_max_wait=5)
    first = health(server)
    assert first["status"] == "ok" and isinstance(first["version"], str)
    assert isinstance(first["uptime_seconds"], (int, float)) and first["uptime_seconds"] >= 0
    assert first["sessions"] == {"bosh": 0, "websocket": 0}
    assert first["online_users"] == 0
    assert first["backend"]["configured"] is True and first["backend"]["fetches"] == 0

    alice, bob = BoshClient(server.bosh_url, wait=5), WsClient(server.ws_url)
    try:
        alice.login("alice")
        bob.login("bob")
        alice.get_roster()
        bob.get_roster()
        live = health(server)
        assert live["sessions"] == {"bosh": 1, "websocket": 1}
        assert live["bosh_sessions"] == 1 and live["online_users"] == 2
        assert live["backend"]["fetches"] >= 2 and live["backend"]["failures"] == 0
        assert live["backend"]["last_error"] is None and live["backend"]["reachable"] is True
        assert live["uptime_seconds"] >= first["uptime_seconds"]

        # The backend fails for carol: /health says so.
        backend.set_fault("carol", "status", 500)
        carol = WsClient(server.ws_url)
        try:
            carol.login("carol")
            carol.get_roster()  # served empty; the failure is counted, the stream stays up
            failing = wait_for(lambda: (h := health(server))["backend"]["failures"] >= 1 and h, what="a backend failure in /health")
            assert "500" in failing["backend"]["last_error"]
            assert failing["backend"]["reachable"] is False
            assert failing["sessions"]["websocket"] == 2
        finally:
            carol.close()
    finally:
        alice.close()
        bob.close()
    after = wait_for(lambda: (h := health(server))["sessions"] == {"bosh": 0, "websocket": 0} and h,
                     what="sessions back to 0")
    assert after["online_users"] == 0


def test_metrics_series_move_after_logins_messages_and_a_refresh(make_server, backend):
    server = make_server()
    before = scrape(server)
    for name in ("boshroster_logins_total", "boshroster_login_failures_total", "boshroster_stanzas_routed_total",
                 "boshroster_backend_fetches_total", "boshroster_backend_failures_total",
                 "boshroster_backend_latency_seconds_count"):
        assert (name, frozenset()) in before, f"{name} missing from /metrics"
    assert ("boshroster_sessions", frozenset({("transport", "websocket")})) in before
    assert ("boshroster_refresh_requests_total", frozenset({("outcome", "ok")})) in before

    alice, bob, intruder = WsClient(server.ws_url), BoshClient(server.bosh_url, wait=5), WsClient(server.ws_url)
    try:
        alice.login("alice")
        bob.login("bob")
        alice.get_roster()
        intruder.wait_features()
        assert intruder.authenticate("bob", "wrong").tag.endswith("failure")
        alice.message(bob.jid, "metrics please")
        bob.recv_message(sender="alice@localhost")
        live = scrape(server)
        assert value(live, "boshroster_logins_total") == value(before, "boshroster_logins_total") + 2
        assert value(live, "boshroster_login_failures_total") == value(before, "boshroster_login_failures_total") + 1
        assert value(live, "boshroster_sessions", transport="websocket") >= 1
        assert value(live, "boshroster_sessions", transport="bosh") == 1
        assert value(live, "boshroster_stanzas_routed_total") > value(before, "boshroster_stanzas_routed_total")
        assert value(live, "boshroster_backend_fetches_total") >= 1
        assert value(live, "boshroster_backend_latency_seconds_count") == value(live, "boshroster_backend_fetches_total")
        assert value(live, "boshroster_backend_latency_seconds_sum") > 0

        backend.contacts["alice"] = {"bob@localhost": {"name": "Bob", "groups": []}}
        reply = requests.post(server.base_url + "/roster_admin/refresh", json=["alice"], timeout=10)
        assert reply.status_code == 200 and reply.json()["updated"] == 1
        refreshed = scrape(server)
        assert (value(refreshed, "boshroster_refresh_requests_total", outcome="ok")
                == value(live, "boshroster_refresh_requests_total", outcome="ok") + 1)
        assert value(refreshed, "boshroster_backend_fetches_total") > value(live, "boshroster_backend_fetches_total")
        assert requests.post(server.base_url + "/roster_admin/refresh", data=b"{", timeout=5).status_code == 400
        assert value(scrape(server), "boshroster_refresh_requests_total", outcome="bad-request") == 1
    finally:
        for client in (alice, bob, intruder):
            client.stop()


def test_host_meta_xrd_and_json_with_cors(server):
    host = f"127.0.0.1:{server.port}"
    xrd = requests.get(server.base_url + "/.well-known/host-meta", headers={"Origin": "http://elsewhere.example"}, timeout=5)
    assert xrd.status_code == 200
    assert xrd.headers["Content-Type"].startswith("application/xrd+xml")
    assert xrd.headers["Access-Control-Allow-Origin"] == "*"
    root = ET.fromstring(xrd.content)
    assert root.tag == f"{XRD}XRD"
    links = {link.get("rel"): link.get("href") for link in root.findall(f"{XRD}Link")}
    assert links == {"urn:xmpp:alt-connections:xbosh": f"http://{host}/http-bind",
                     "urn:xmpp:alt-connections:websocket": f"ws://{host}/xmpp-websocket"}

    js = requests.get(server.base_url + "/.well-known/host-meta.json", timeout=5)
    assert js.status_code == 200 and js.headers["Content-Type"].startswith("application/json")
    assert js.headers["Access-Control-Allow-Origin"] == "*"
    assert {link["rel"]: link["href"] for link in js.json()["links"]} == links

    for path in ("/.well-known/host-meta", "/.well-known/host-meta.json"):
        pre = requests.options(server.base_url + path, headers={"Origin": "http://elsewhere.example",
                                                                "Access-Control-Request-Method": "GET"}, timeout=5)
        assert pre.status_code in (200, 204) and pre.headers["Access-Control-Allow-Origin"] == "*"


def test_root_serves_the_demo_page(server):
    reply = requests.get(server.base_url + "/", timeout=5)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/html")
    assert "boshroster demo chat" in reply.text and "vendor/converse/converse.min.js" in reply.text
    assert requests.get(server.base_url + "/index.html", timeout=5).text == reply.text
    assert requests.get(server.base_url + "/no-such-page.html", timeout=5).status_code == 404


def test_websocket_endpoint_without_upgrade_is_426(server):
    reply = requests.get(server.base_url + "/xmpp-websocket", timeout=5)
    assert reply.status_code == 426
    assert reply.headers["Upgrade"].lower() == "websocket"
    assert "xmpp" in reply.text


def test_forwarded_proto_is_believed_from_a_trusted_proxy_network_only(make_server):
    """trusted_proxies may list networks: X-Forwarded-Proto from a peer inside one
    counts (the BOSH session is secure), from a peer outside none does."""
    from harness import NS_BOSH

    def create(server):
        body = (f"<body xmlns='{NS_BOSH}' rid='1000' to='localhost' wait='5' hold='1' ver='1.6' "
                f"xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>")
        reply = requests.post(server.bosh_url, data=body, timeout=10,
                              headers={"X-Forwarded-Proto": "https", "Content-Type": "text/xml"})
        return ET.fromstring(reply.content)

    assert create(make_server(trusted_proxies=["127.0.0.0/8"])).get("secure") == "true"
    assert create(make_server(trusted_proxies=["192.0.2.0/24"])).get("secure") == "false"


def test_python_m_boshroster_serve_runs_and_stops_gracefully_on_sigterm(tmp_path, backend):
    """The deployed entry point itself (the other tests fork servers from an imported copy,
    see tests/forkserver.py): it serves, and SIGTERM tells clients system-shutdown and exits 0
    without waiting for an idle keep-alive connection."""
    import signal

    server = ServerProcess(tmp_path, http_roster_url=backend.url_template, bosh_max_wait=5, fork=False).start()
    try:
        assert server.proc.args[1:4] == ["-m", "boshroster", "serve"]
        assert health(server)["status"] == "ok"
        ws, bosh = WsClient(server.ws_url), BoshClient(server.bosh_url, wait=5)
        ws.login("alice")
        bosh.login("bob")
        idle = requests.Session()  # a kept-alive connection with no request in progress
        assert idle.get(server.base_url + "/health", timeout=5).status_code == 200
        assert server.stop(signal.SIGTERM) == 0
        error = ws.recv(match=lambda e: e.tag == q(NS_STREAM, "error"))
        assert error.find("{urn:ietf:params:xml:ns:xmpp-streams}system-shutdown") is not None
        assert bosh.recv(match=lambda e: e.get("type") == "terminate").get("condition") == "system-shutdown"
        log = server.log()
        assert "signal SIGTERM received" in log and "stopped" in log
        assert "still busy" not in log, log  # nothing had to be killed after the grace period
        idle.close()
        ws.stop()
        bosh.stop()
    finally:
        server.stop()


def _host_meta_links(server, headers=None) -> tuple[dict, dict]:
    xrd = requests.get(server.base_url + "/.well-known/host-meta", headers=headers or {}, timeout=5)
    assert xrd.status_code == 200
    links = {link.get("rel"): link.get("href") for link in ET.fromstring(xrd.content).findall(f"{XRD}Link")}
    assert len(ET.fromstring(xrd.content)) == 2  # nothing injected next to the two links
    js = requests.get(server.base_url + "/.well-known/host-meta.json", headers=headers or {}, timeout=5)
    return links, {link["rel"]: link["href"] for link in js.json()["links"]}


def test_host_meta_never_copies_a_hostile_host_header(make_server):
    """Issue 10 point 16: the Host header was copied unescaped into the XRD, so an attacker's
    <Link> landed in it. A Host that is not host[:port] now yields domain:port."""
    server = make_server(trusted_proxies=["127.0.0.1"])
    fallback = {"urn:xmpp:alt-connections:xbosh": f"http://localhost:{server.port}/http-bind",
                "urn:xmpp:alt-connections:websocket": f"ws://localhost:{server.port}/xmpp-websocket"}
    hostile = ["evil'/><Link rel='urn:xmpp:alt-connections:xbosh' href='http://evil.example/x'/><x a='",
               'evil"><script>', "a b", "evil.example/path", "evil.example:80:81", "évil.example", "[::1"]
    for host in hostile:
        for header in ("Host", "X-Forwarded-Host"):
            xrd, js = _host_meta_links(server, {header: host.encode("utf-8")})
            assert xrd == fallback and js == fallback, (header, host, xrd, js)
    # Plain host[:port] values are still used as sent, IPv6 literals included.
    for host in ("chat.example.org", "chat.example.org:8443", "[2001:db8::1]:5280", "192.0.2.1"):
        xrd, js = _host_meta_links(server, {"Host": host})
        assert xrd["urn:xmpp:alt-connections:xbosh"] == f"http://{host}/http-bind" and js == xrd
    assert "Traceback" not in server.log()


def test_host_meta_prefers_http_external_url(make_server):
    server = make_server(http_external_url="https://chat.example.org/xmpp/")
    expected = {"urn:xmpp:alt-connections:xbosh": "https://chat.example.org/xmpp/http-bind",
                "urn:xmpp:alt-connections:websocket": "wss://chat.example.org/xmpp/xmpp-websocket"}
    for headers in ({}, {"Host": "evil.example"}, {"X-Forwarded-Host": "evil.example"}):
        assert _host_meta_links(server, headers) == (expected, expected)


@pytest.mark.parametrize("settings", [
    {"http_external_url": "chat.example.org"},                    # no scheme
    {"http_external_url": "ftp://chat.example.org"},
    {"http_external_url": "https://chat.example.org/?x=1"},
    {"http_external_url": "https://chat.example.org/'><Link"},
    {"http_external_url": "https://chat.example.org:99999"},
    {"http_header_timeout": 0},
    {"http_max_header_line": 10},
    {"http_max_connections_per_address": -1},
    {"http_connection_limit_exempt": ["10.0.0.0/33"]},
    {"trusted_proxies": ["nginx.local"]},
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_bad_http_limit_settings_stop_the_server_with_a_clear_message(tmp_path, settings):
    import subprocess
    import sys

    from harness import ROOT, toml_value

    path = tmp_path / "boshroster.toml"
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in {"http_ports": [0], "data_dir": "data", **settings}.items()))
    result = subprocess.run([sys.executable, "-m", "boshroster", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert next(iter(settings)) in result.stderr and "Traceback" not in result.stderr
