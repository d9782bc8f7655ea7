"""The offline-message webhook (issue 13 item 3), end to end.

A real server subprocess with ``offline_message_webhook_url`` pointing at
``Receiver``, a real HTTP server in this process (gevent pywsgi, like
tests/backend_app.py) that records every POST and can answer 200, another
status, hang until released, or fail a number of times first.  Users send
messages over WebSocket and BOSH with the harness clients; what is checked is
what the receiver gets (one POST per message stored offline, the fields, the
secret), what the counters on /metrics say, and that a receiver that is down,
slow, failing or flooded never touches delivery: the messages are stored and
arrive at the next login, and the sender's stream keeps flowing.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone

import gevent
import gevent.event
import pytest
import requests
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from backend_app import closed_port_url_template
from harness import NS_CLIENT, NS_STANZAS, BoshClient, ServerProcess, WsClient, q

SECRET = "hook-s3cret"


class Receiver:
    """The web app's webhook endpoint: records each request, answers as told.

    ``status``: what to answer; ``fail_first``: answer 500 that many times first;
    ``gate``: when set to an unset Event, requests wait for it (a hanging endpoint)."""

    def __init__(self, status: int = 200, fail_first: int = 0, hold: bool = False):
        self.status = status
        self.fail_first = fail_first
        self.gate = gevent.event.Event()
        if not hold:
            self.gate.set()
        self.requests: list[dict] = []
        self.arrived = gevent.event.Event()
        self._server = WSGIServer(("127.0.0.1", 0), self._app, spawn=Pool(), log=None, error_log=None)
        self._server.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/chat/offline-message"

    def _app(self, environ, start_response):
        body = environ["wsgi.input"].read()
        self.requests.append({
            "method": environ["REQUEST_METHOD"], "path": environ["PATH_INFO"],
            "headers": {k[5:].replace("_", "-").title(): v for k, v in environ.items() if k.startswith("HTTP_")},
            "content_type": environ.get("CONTENT_TYPE"), "body": body,
        })
        self.arrived.set()
        self.gate.wait()
        status = self.status
        if self.fail_first > 0:
            self.fail_first -= 1
            status = 500
        start_response(f"{status} Answer", [("Content-Type", "application/json"), ("Content-Length", "2")])
        return [b"{}"]

    def payloads(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests]

    def wait_for(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            assert time.monotonic() < deadline, f"{len(self.requests)} webhook requests, expected {count}"
            gevent.sleep(0.02)

    def stop(self) -> None:
        self.gate.set()
        self._server.stop(timeout=0)


@pytest.fixture
def receiver():
    made = []

    def make(**kwargs):
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def counters(server) -> dict[str, float]:
    text = requests.get(server.base_url + "/metrics", timeout=5).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^boshroster_offline_webhook_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}


def wait_counter(server, outcome: str, value: float, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        now = counters(server)
        if now.get(outcome) == value:
            return now
        assert time.monotonic() < deadline, f"{outcome} is {now.get(outcome)}, expected {value}: {now}"
        gevent.sleep(0.05)


def online(server, user, kind="websocket", resource="r"):
    client = BoshClient(server.bosh_url, wait=5) if kind == "bosh" else WsClient(server.ws_url)
    client.login(user, resource=resource)
    client.presence()
    return client


def sync(client):
    """A round trip: every stanza the client sent before has been routed."""
    reply = client.iq("<ping xmlns='urn:xmpp:ping'/>")
    assert reply.get("type") == "result"


def bodies_at_login(server, user, count, kind="websocket"):
    client = online(server, user, kind)
    try:
        got = [client.recv_message(timeout=10) for _ in range(count)]
        client.expect_nothing(0.3, lambda e: e.tag == q(NS_CLIENT, "message") and e.find(q(NS_CLIENT, "body")) is not None)
        return [m.find(q(NS_CLIENT, "body")).text for m in got]
    finally:
        client.stop()


def no_errors_for(client):
    client.expect_nothing(0.2, lambda e: e.get("type") == "error")


def webhook_server(make_server, url, **settings):
    settings.setdefault("offline_message_webhook_backoff", 0.05)
    return make_server(offline_message_webhook_url=url, **settings)


# -- the good path --------------------------------------------------------------------------------


def test_one_post_per_message_stored_offline_with_the_fields(make_server, receiver, transport):
    hook = receiver()
    server = webhook_server(make_server, hook.url, offline_message_webhook_secret=SECRET)
    bob = online(server, "bob", transport, "desk")
    carol = online(server, "carol", "websocket")
    sync(carol)  # carol's initial presence is processed: a message to her is live, not stored
    try:
        before = time.time()
        bob.message("alice@localhost", "first <&> 😀")
        bob.message("alice@localhost", "second", type_="normal")
        bob.message("carol@localhost", "carol is online: no webhook")
        bob.send_xml(f"<message xmlns='{NS_CLIENT}' to='alice@localhost' type='chat'>"
                     "<composing xmlns='http://jabber.org/protocol/chatstates'/></message>")  # stored, but no body
        sync(bob)
        carol.recv_message(sender="bob@localhost")
        # A system message from the app's API to the offline user is notified too.
        api = requests.post(server.base_url + "/api/messages", json={"to": "alice", "body": "from the app"}, timeout=10)
        assert api.json()["status"] == "stored"
        hook.wait_for(3)
        wait_counter(server, "sent", 3)
        after = time.time()

        assert [p["body"] for p in hook.payloads()] == ["first <&> 😀", "second", "from the app"]
        for request, payload in zip(hook.requests, hook.payloads()):
            assert set(payload) == {"to", "from", "body", "stamp"}
            assert payload["to"] == "alice@localhost"
            assert request["method"] == "POST" and request["path"] == "/chat/offline-message"
            assert request["content_type"] == "application/json"
            assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
            assert re.fullmatch(r"[0-9a-f]{32}", request["headers"]["X-Boshroster-Delivery"])
            stamp = datetime.strptime(payload["stamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
            assert before - 1 <= stamp <= after + 1
        assert [p["from"] for p in hook.payloads()] == ["bob@localhost/desk", "bob@localhost/desk", "localhost"]
        assert len({r["headers"]["X-Boshroster-Delivery"] for r in hook.requests}) == 3
        gevent.sleep(0.3)
        assert len(hook.requests) == 3  # nothing for carol (online) nor for the chat state
        assert counters(server) == {"sent": 3.0, "failed": 0.0, "dropped": 0.0, "retried": 0.0}
        assert bodies_at_login(server, "alice", 3) == ["first <&> 😀", "second", "from the app"]
    finally:
        bob.stop()
        carol.stop()


def test_no_secret_no_authorization_header(make_server, receiver):
    hook = receiver()
    server = webhook_server(make_server, hook.url)
    bob = online(server, "bob")
    try:
        bob.message("dave@localhost", "hi")
        hook.wait_for(1)
        assert "Authorization" not in hook.requests[0]["headers"]
    finally:
        bob.stop()


# -- a receiver that fails: log lines and counters, never lost or late messages ------------------


def test_receiver_down(make_server, transport):
    url = closed_port_url_template().replace("/contacts/%s", "/hook")
    server = webhook_server(make_server, url, offline_message_webhook_retries=2)
    bob = online(server, "bob", transport)
    try:
        for i in range(3):
            bob.message("alice@localhost", f"m{i}")
        sync(bob)
        no_errors_for(bob)  # stored: the sender hears nothing
        now = wait_counter(server, "failed", 3)
        assert now == {"sent": 0.0, "failed": 3.0, "dropped": 0.0, "retried": 6.0}
        log = server.log()
        warnings = re.findall(r"WARNING boshroster.webhook: .*", log)
        assert len(warnings) == 1, warnings  # one line while it keeps failing, not one per message
        assert "after 3 attempt(s): Connection refused" in warnings[0] and "messages stay stored" in warnings[0]
        assert "Traceback" not in log
        assert bodies_at_login(server, "alice", 3) == ["m0", "m1", "m2"]
    finally:
        bob.stop()


def test_receiver_500_is_retried_with_the_same_delivery_id(make_server, receiver):
    hook = receiver(fail_first=2)
    server = webhook_server(make_server, hook.url, offline_message_webhook_retries=3)
    bob = online(server, "bob")
    try:
        bob.message("alice@localhost", "retry me")
        wait_counter(server, "sent", 1)
        assert counters(server) == {"sent": 1.0, "failed": 0.0, "dropped": 0.0, "retried": 2.0}
        assert len(hook.requests) == 3
        assert len({r["headers"]["X-Boshroster-Delivery"] for r in hook.requests}) == 1
        assert [p["body"] for p in hook.payloads()] == ["retry me"] * 3
    finally:
        bob.stop()


@pytest.mark.parametrize("status", [400, 404, 401])
def test_a_refusal_is_not_retried(make_server, receiver, status):
    hook = receiver(status=status)
    server = webhook_server(make_server, hook.url, offline_message_webhook_retries=3)
    bob = online(server, "bob")
    try:
        bob.message("alice@localhost", "no")
        now = wait_counter(server, "failed", 1)
        assert now["retried"] == 0.0 and len(hook.requests) == 1
        assert f"after 1 attempt(s): HTTP {status}" in server.log()
    finally:
        bob.stop()


def test_slow_receiver_times_out_and_never_holds_delivery(make_server, receiver):
    hook = receiver(hold=True)  # accepts the request, never answers until released
    server = webhook_server(make_server, hook.url, offline_message_webhook_timeout=0.5,
                            offline_message_webhook_retries=1)
    bob = online(server, "bob")
    carol = online(server, "carol")
    try:
        bob.message("alice@localhost", "while the app hangs")
        hook.arrived.wait(10)
        # The webhook's request is hanging right now; messages and IQs still flow, and more
        # messages for alice are stored.
        bob.message("carol@localhost", "live")
        carol.recv_message(sender="bob@localhost")
        bob.message("alice@localhost", "and another")
        sync(bob)
        assert not hook.gate.is_set()  # not one webhook request has been answered meanwhile
        no_errors_for(bob)
        now = wait_counter(server, "failed", 2)
        assert now["sent"] == 0.0 and now["retried"] == 2.0
        assert "no answer within 0.5s" in server.log() or "timed out" in server.log()
        assert bodies_at_login(server, "alice", 2) == ["while the app hangs", "and another"]
    finally:
        bob.stop()
        carol.stop()


def test_full_queue_drops_and_counts(make_server, receiver):
    hook = receiver(hold=True)
    server = webhook_server(make_server, hook.url, offline_message_webhook_queue=1,
                            offline_message_webhook_timeout=30.0)
    bob = online(server, "bob")
    try:
        bob.message("alice@localhost", "m0")
        hook.arrived.wait(10)  # the worker holds m0: the queue is empty
        for i in range(1, 5):
            bob.message("alice@localhost", f"m{i}")  # m1 waits in the queue, m2..m4 are dropped
        sync(bob)
        no_errors_for(bob)
        assert counters(server)["dropped"] == 3.0
        assert len(re.findall(r"WARNING boshroster.webhook: offline webhook: queue full", server.log())) == 3
        hook.gate.set()
        wait_counter(server, "sent", 2)
        assert [p["body"] for p in hook.payloads()] == ["m0", "m1"]
        assert bodies_at_login(server, "alice", 5) == ["m0", "m1", "m2", "m3", "m4"]  # every message kept
    finally:
        bob.stop()


def test_full_offline_storage_bounces_and_notifies_nothing(make_server, receiver):
    hook = receiver()
    server = webhook_server(make_server, hook.url, offline_max_per_user=1)
    bob = online(server, "bob")
    try:
        bob.message("alice@localhost", "kept")
        bob.message("alice@localhost", "refused")
        bounce = bob.recv(5, lambda e: e.tag == q(NS_CLIENT, "message") and e.get("type") == "error")
        assert bounce.find(f"{q(NS_CLIENT, 'error')}/{q(NS_STANZAS, 'service-unavailable')}") is not None
        hook.wait_for(1)
        gevent.sleep(0.3)
        assert [p["body"] for p in hook.payloads()] == ["kept"]
    finally:
        bob.stop()


# -- settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings,says", [
    ({"offline_message_webhook_url": "ftp://example.org/hook"}, "must be an http:// or https:// URL"),
    ({"offline_message_webhook_secret": "x"}, "offline_message_webhook_secret needs offline_message_webhook_url"),
    ({"offline_message_webhook_url": "http://127.0.0.1:1/", "offline_message_webhook_timeout": 0}, "must be > 0"),
    ({"offline_message_webhook_url": "http://127.0.0.1:1/", "offline_message_webhook_queue": 0}, "must be >= 1"),
])
def test_bad_settings_stop_the_server_with_a_clear_message(tmp_path, settings, says):
    server = ServerProcess(tmp_path, users=(), **settings)
    with pytest.raises(RuntimeError) as failed:
        server.start()
    server.stop()
    assert says in str(failed.value)
