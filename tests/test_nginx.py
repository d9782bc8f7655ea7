"""boshroster behind a real nginx (Debian package) with the shipped conf/nginx.conf.

The template is rendered into a temporary prefix (@LISTEN@ = a free loopback port,
@UPSTREAM@ = the server, @STATIC_ROOT@ = a world-readable copy of the repo's static/, @PREFIX@ = the temp dir),
checked with ``nginx -t`` and run in the foreground as a subprocess. Clients then talk
only to nginx: BOSH and WebSocket logins and messages, a BOSH request held longer than
nginx's default 60 s proxy_read_timeout, the private endpoints refused, static files,
host-meta pointing back at nginx, CORS headers once, and X-Forwarded-For /
X-Forwarded-Proto as the server sees them.

Skips without nginx on a developer machine; fails in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import gevent
import pytest
import requests

from backend_app import TestBackend
from conftest import NAMES, demo_contacts
from harness import NS_BOSH, NS_CLIENT, NS_ROSTER, BoshClient, ServerProcess, WsClient, free_port, q
from realclients import ROOT, require

# run_first: this module runs before every other one, so that the 61 s request held through
# nginx (the proxied fixture) overlaps the rest of the run; the test collecting it is run_last.
pytestmark = [pytest.mark.interop, pytest.mark.run_first]

TEMPLATE = os.path.join(ROOT, "conf", "nginx.conf")
TRICKY = 'héllo <&> "quotes" \'apos\' 😀'
LONG_WAIT = 62          # > nginx's default proxy_read_timeout (60 s); the server answers at wait - 1 s


def nginx_binary() -> str | None:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def readable_static_copy() -> str:
    """A copy of the repo's static/ (vendor/ symlinks followed) that any user can read.

    nginx started as root runs its workers as an unprivileged user (nobody), which cannot
    reach static/ when the checkout sits under a directory only its owner can read (issue 10
    point 17); pytest's own temp dirs are 0700 too. So the files are copied to a fresh
    directory under the system temp dir, made 0755/0644 all the way down."""
    root = tempfile.mkdtemp(prefix="boshroster-nginx-static-")
    target = os.path.join(root, "static")
    shutil.copytree(os.path.join(ROOT, "static"), target, symlinks=False)
    os.chmod(root, 0o755)
    for folder, dirs, files in os.walk(target):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    return target


def render_config(prefix: str, listen: str, upstream: str, static_root: str) -> str:
    with open(TEMPLATE, encoding="utf-8") as fh:
        text = fh.read()
    for key, value in {"@LISTEN@": listen, "@UPSTREAM@": upstream, "@STATIC_ROOT@": static_root,
                       "@PREFIX@": prefix}.items():
        text = text.replace(key, value)
    left = re.findall(r"@[A-Z_]+@", text)
    assert not left, f"placeholders left in the rendered config: {left}"
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


class Nginx:
    def __init__(self, binary: str, prefix: str, upstream_port: int, static_root: str):
        self.binary = binary
        self.prefix = prefix
        self.port = free_port()
        self.conf = render_config(prefix, f"127.0.0.1:{self.port}", f"127.0.0.1:{upstream_port}", static_root)
        self.proc = None

    def check(self) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, "-t", "-p", self.prefix, "-c", self.conf, "-e", "stderr"],
                              capture_output=True, text=True, timeout=30)

    def start(self) -> "Nginx":
        self.stderr = open(os.path.join(self.prefix, "stderr.log"), "w")
        self.proc = subprocess.Popen([self.binary, "-p", self.prefix, "-c", self.conf, "-e", "stderr", "-g", "daemon off;"],
                                     stdout=self.stderr, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            assert self.proc.poll() is None, f"nginx exited: {self.logs()}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                assert time.monotonic() < deadline, f"nginx did not listen: {self.logs()}"
                gevent.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: the master ends its workers
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.stderr.close()

    def logs(self) -> str:
        out = []
        for name in ("stderr.log", "error.log"):
            try:
                with open(os.path.join(self.prefix, name)) as fh:
                    out.append(f"--- {name}\n{fh.read()[-3000:]}")
            except FileNotFoundError:
                pass
        return "\n".join(out)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bosh_url(self) -> str:
        return self.base_url + "/http-bind"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/xmpp-websocket"


RAW_RID = 4_000_000


def raw_bosh_create(url: str, wait: int, headers: dict | None = None) -> ET.Element:
    body = (f"<body xmlns='{NS_BOSH}' rid='{RAW_RID}' to='localhost' wait='{wait}' hold='1' ver='1.6' xml:lang='en' "
            f"xmpp:version='1.0' xmlns:xmpp='urn:xmpp:xbosh'/>")
    reply = requests.post(url, data=body, headers={"Content-Type": "text/xml; charset=utf-8", **(headers or {})}, timeout=15)
    assert reply.status_code == 200, reply.status_code
    return ET.fromstring(reply.content)


def offered_mechanisms(body: ET.Element) -> list[str]:
    mechs = body.find(".//{urn:ietf:params:xml:ns:xmpp-sasl}mechanisms")
    return [m.text for m in mechs] if mechs is not None else []


HOLD_SCRIPT = """
import json, sys, time, urllib.error, urllib.request
url, body = sys.argv[1], sys.argv[2].encode()
started = time.monotonic()
try:
    with urllib.request.urlopen(urllib.request.Request(url, data=body, headers={"Content-Type": "text/xml; charset=utf-8"}),
                                timeout=float(sys.argv[3])) as reply:
        status, content = reply.status, reply.read()
except urllib.error.HTTPError as err:
    status, content = err.code, err.read()
print(json.dumps({"status": status, "seconds": time.monotonic() - started, "body": content.decode("utf-8", "replace")}))
"""


@pytest.fixture(scope="session")
def proxied(tmp_path_factory):
    """(server, nginx, long_hold): one server behind one nginx, for the whole run.

    long_hold holds one BOSH request through nginx for LONG_WAIT - 1 seconds, started
    right away; test_held_bosh_request_outlasts_nginx_default_timeout (run_last: the
    last test of the run) collects it, so the minute runs alongside every other test.
    The request is made by a child process that times it itself: a test that keeps this
    process busy for a while cannot make the measured time longer.
    """
    binary = nginx_binary()
    require(binary is not None, "nginx is not installed (apt-get install nginx)")
    backend = TestBackend(demo_contacts()).start()
    server = ServerProcess(tmp_path_factory.mktemp("server"), http_roster_url=backend.url_template,
                           bosh_max_wait=LONG_WAIT, fork=False).start()  # as deployed: python -m boshroster serve
    static_root = readable_static_copy()
    nginx = Nginx(binary, str(tmp_path_factory.mktemp("nginx")), server.port, static_root)
    checked = nginx.check()
    assert checked.returncode == 0, f"nginx -t failed:\n{checked.stderr}"
    nginx.start()

    created = raw_bosh_create(nginx.bosh_url, LONG_WAIT)
    hold = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRIPT, nginx.bosh_url,
         f"<body xmlns='{NS_BOSH}' rid='{RAW_RID + 1}' sid='{created.get('sid')}'/>", str(LONG_WAIT + 30)],
        stdout=subprocess.PIPE, text=True)
    hold.wait_value = created.get("wait")
    yield server, nginx, hold
    if hold.poll() is None:
        hold.kill()
    hold.wait()
    hold.stdout.close()
    nginx.stop()
    server.stop()
    backend.stop()
    shutil.rmtree(os.path.dirname(static_root), ignore_errors=True)


def test_nginx_config_renders_and_passes_nginx_t(proxied):
    server, nginx, _ = proxied
    with open(nginx.conf) as fh:
        conf = fh.read()
    bosh_block = conf[conf.index("location /http-bind"):conf.index("location = /xmpp-websocket")]
    assert "proxy_buffering off" in bosh_block
    timeout = int(re.search(r"proxy_read_timeout (\d+)s", bosh_block).group(1))
    assert timeout > 60, "BOSH read timeout must exceed the longest wait (60 s)"
    assert nginx.check().returncode == 0


def test_bosh_login_roster_and_messages_through_nginx(proxied):
    server, nginx, _ = proxied
    alice, bob = BoshClient(nginx.bosh_url, wait=5), BoshClient(nginx.bosh_url, wait=5)
    try:
        alice.login("alice")
        bob.login("bob")
        roster = alice.get_roster()
        names = sorted(item.get("name") for item in roster.iter(q(NS_ROSTER, "item")))
        assert names == sorted(NAMES[u] for u in ("bob", "carol", "dave"))
        alice.presence()
        bob.presence()
        bob.recv_presence(sender="alice@localhost")
        alice.recv_presence(sender="bob@localhost")
        # Held request + proxy_buffering off: the message comes back at once, not at 'wait'.
        gevent.sleep(0.5)  # let alice park a fresh request
        started = time.monotonic()
        bob.message(alice.jid, TRICKY)
        got = alice.recv_message(sender="bob@localhost", timeout=4)
        latency = time.monotonic() - started
        assert got.find(q(NS_CLIENT, "body")).text == TRICKY
        assert latency < 2.0, f"message took {latency:.2f}s through nginx (buffered?)"
        alice.message(bob.jid, TRICKY + " back")
        assert bob.recv_message(sender="alice@localhost").find(q(NS_CLIENT, "body")).text == TRICKY + " back"
        alice.close()
        # The next presence bob gets from alice says she left (recv raises if none comes).
        gone = bob.recv(match=lambda e: e.tag == q(NS_CLIENT, "presence") and (e.get("from") or "").startswith("alice@"))
        assert gone.get("type") == "unavailable", ET.tostring(gone)
    finally:
        alice.stop()
        bob.stop()
    assert "login alice from 127.0.0.1 (bosh)" in server.log()


def test_websocket_through_nginx_echoes_the_subprotocol(proxied):
    server, nginx, _ = proxied
    alice = WsClient(nginx.ws_url)
    bob = BoshClient(nginx.bosh_url, wait=5)
    try:
        assert alice.ws.getsubprotocol() == "xmpp"
        assert alice.ws.getheaders().get("upgrade", "").lower() == "websocket"
        alice.login("alice")
        bob.login("bob")
        roster = alice.get_roster()
        assert "Bob Builder" in [i.get("name") for i in roster.iter(q(NS_ROSTER, "item"))]
        alice.presence()
        bob.presence()
        alice.recv_presence(sender="bob@localhost")
        bob.message(alice.jid, TRICKY)
        assert alice.recv_message(sender="bob@localhost").find(q(NS_CLIENT, "body")).text == TRICKY
        alice.message(bob.jid, "over the proxied websocket")
        assert bob.recv_message(sender="alice@localhost").find(q(NS_CLIENT, "body")).text == "over the proxied websocket"
        alice.close()
        bob.recv_presence(sender="alice@localhost", type_="unavailable")
    finally:
        alice.stop()
        bob.stop()
    assert "login alice from 127.0.0.1 (websocket)" in server.log()


def test_private_endpoints_are_403_through_nginx_but_work_directly(proxied):
    server, nginx, _ = proxied
    for method, path in (("POST", "/roster_admin/refresh"), ("GET", "/roster_admin/refresh/alice"),
                         ("GET", "/roster_admin"), ("GET", "/metrics"), ("GET", "/health"),
                         ("GET", "/api/users/alice/sessions"), ("POST", "/api/messages")):
        reply = requests.request(method, nginx.base_url + path, json=["alice"] if method == "POST" else None, timeout=5)
        assert reply.status_code == 403, (method, path, reply.status_code)
    assert requests.get(server.base_url + "/health", timeout=5).status_code == 200
    assert requests.post(server.base_url + "/roster_admin/refresh", json=["alice"], timeout=10).json()["status"] == "ok"


def test_static_demo_page_is_served_by_nginx(proxied):
    _, nginx, _ = proxied
    reply = requests.get(nginx.base_url + "/", timeout=5)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/html")
    assert "boshroster demo chat" in reply.text and "vendor/converse/converse.min.js" in reply.text
    if os.path.isfile(os.path.join(ROOT, "static", "vendor", "converse", "converse.min.js")):
        js = requests.get(nginx.base_url + "/vendor/converse/converse.min.js", timeout=10)
        assert js.status_code == 200 and js.headers["Content-Type"].startswith("application/javascript")
    assert requests.get(nginx.base_url + "/no-such-file.html", timeout=5).status_code == 404


def test_host_meta_through_nginx_points_at_nginx(proxied):
    _, nginx, _ = proxied
    xrd = requests.get(nginx.base_url + "/.well-known/host-meta", timeout=5)
    assert xrd.status_code == 200
    assert xrd.raw.headers.getlist("Access-Control-Allow-Origin") == ["*"]
    links = {link.get("rel"): link.get("href") for link in ET.fromstring(xrd.content)}
    assert links == {"urn:xmpp:alt-connections:xbosh": nginx.bosh_url,
                     "urn:xmpp:alt-connections:websocket": nginx.ws_url}
    js = requests.get(nginx.base_url + "/.well-known/host-meta.json", timeout=5)
    assert js.status_code == 200 and js.raw.headers.getlist("Access-Control-Allow-Origin") == ["*"]
    assert {link["rel"]: link["href"] for link in js.json()["links"]} == links


def test_cors_headers_come_once_through_nginx(proxied):
    _, nginx, _ = proxied
    origin = {"Origin": "http://app.example"}
    pre = requests.options(nginx.bosh_url, headers={**origin, "Access-Control-Request-Method": "POST",
                                                    "Access-Control-Request-Headers": "content-type"}, timeout=5)
    assert pre.status_code == 200
    assert len(pre.raw.headers.getlist("Access-Control-Allow-Origin")) == 1
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    created = requests.post(nginx.bosh_url, headers={**origin, "Content-Type": "text/xml; charset=utf-8"},
                            data=f"<body xmlns='{NS_BOSH}' rid='77' to='localhost' wait='5' hold='1' ver='1.6'/>", timeout=10)
    assert created.status_code == 200 and len(created.raw.headers.getlist("Access-Control-Allow-Origin")) == 1


def test_forwarded_headers_through_nginx(proxied):
    """nginx appends the peer to X-Forwarded-For and *replaces* X-Forwarded-Proto with
    its own scheme; the server believes them because nginx (127.0.0.1) is a trusted
    proxy. 203.0.113.7 (TEST-NET-3, only a header value here) plays a client that an
    earlier proxy reported: the server takes it as the client address, so the
    connection is no longer loopback and PLAIN is not offered over plain http, even
    when the client claims https (nginx overwrote that claim with "http")."""
    server, nginx, _ = proxied
    plain = raw_bosh_create(nginx.bosh_url, 5)
    assert "PLAIN" in offered_mechanisms(plain)  # loopback client: PLAIN allowed
    assert plain.get("secure") == "false"

    forwarded = raw_bosh_create(nginx.bosh_url, 5, {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"})
    assert offered_mechanisms(forwarded) and "PLAIN" not in offered_mechanisms(forwarded)
    assert forwarded.get("secure") == "false"
    assert "BOSH session created for 203.0.113.7" in server.log()

    # The same headers sent straight to the server by a trusted peer are believed,
    # proto included: that is why nginx must overwrite X-Forwarded-Proto.
    direct = raw_bosh_create(server.bosh_url, 5, {"X-Forwarded-For": "203.0.113.8", "X-Forwarded-Proto": "https"})
    assert direct.get("secure") == "true" and "PLAIN" in offered_mechanisms(direct)


@pytest.mark.run_last
def test_a_bosh_page_reload_through_nginx_loses_no_stanza(proxied):
    """The browser closes the connection of its held request (a page reload): nginx closes its
    upstream connection (proxy_ignore_client_abort off, its default), the server drops the held
    request, and a message that arrives then comes with the session's next request instead of
    going into the closed connection (transports/bosh_watch.py; tests/test_bosh_continuity.py)."""
    from harness import wait_for
    from test_bosh_continuity import bodies, held_session, post, post_held

    server, nginx, _ = proxied
    bob = WsClient(server.ws_url)
    bob.login("bob", resource="reload")
    bob.presence()
    alice = held_session(nginx.bosh_url)
    try:
        rid = alice.rid + 1
        post_held(nginx.port, bob, alice, rid).close()
        gone = f"BOSH request {rid} of {alice.jid}: the client closed its connection before the answer"
        wait_for(lambda: gone in server.log(), timeout=15, what="the server noticed the closed connection")
        bob.message(alice.jid, "while the page reloads")
        bob.sync()
        reply = post(nginx.bosh_url, f"<body xmlns='{NS_BOSH}' rid='{rid + 1}' sid='{alice.sid}'/>")
        assert bodies(reply) == ["while the page reloads"], ET.tostring(reply)
    finally:
        alice.stop()
        bob.close()


def test_held_bosh_request_outlasts_nginx_default_timeout(proxied):
    """Last in the run: the request the fixture parked at its start comes back
    as an ordinary empty body after ~wait - 1 s (61 s), past the 60 s at which an
    nginx with the default proxy_read_timeout would have answered 504."""
    _, nginx, hold = proxied
    out, _ = hold.communicate(timeout=LONG_WAIT + 40)
    result = json.loads(out)
    assert hold.wait_value == str(LONG_WAIT)
    assert result["status"] == 200, (result, nginx.logs())
    body = ET.fromstring(result["body"].encode("utf-8"))
    assert body.tag == q(NS_BOSH, "body") and body.get("type") is None and len(body) == 0
    assert 60 < result["seconds"] < LONG_WAIT + 2, result["seconds"]
