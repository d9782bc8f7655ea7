"""The app's API (issue 13 item 3), end to end: ``/api/users/<user>/sessions`` and ``/api/messages``.

A real server subprocess, real BOSH and WebSocket clients (tests/harness.py),
plain HTTP requests as the web app would send them.  What is checked is what
a client sees (the system message arrives, live or at its next login; the
stream error that ends its session; a revoked token refused) and what the
app gets back (JSON, the documented statuses).  Protection is the refresh
endpoint's (403 outside ``refresh_allowed_networks``, 401 without the Bearer
secret); every bad request is a JSON error that names the problem and
changes nothing.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from datetime import datetime, timezone

import jwt
import pytest
import requests

from backend_app import TestBackend
from conftest import demo_contacts
from harness import NS_CLIENT, NS_SASL, NS_STREAM, BoshClient, ServerProcess, WsClient, q

JSON = {"Content-Type": "application/json"}
NS_DELAY = "urn:xmpp:delay"
NS_STREAMS_ERR = "urn:ietf:params:xml:ns:xmpp-streams"
SECRET = secrets.token_urlsafe(48)


def api(server, method, path, body=None, headers=None, raw=None, timeout=10) -> requests.Response:
    hdrs = dict(JSON if body is not None else {})
    hdrs.update(headers or {})
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    return requests.request(method, server.base_url + path, data=data, headers=hdrs, timeout=timeout)


def ok_json(reply: requests.Response) -> dict:
    assert reply.status_code == 200, (reply.status_code, reply.text)
    assert reply.headers["Content-Type"].startswith("application/json")
    return reply.json()


def error(reply: requests.Response, status: int) -> str:
    assert reply.status_code == status, (reply.status_code, reply.text)
    assert reply.headers["Content-Type"].startswith("application/json"), reply.headers
    payload = reply.json()
    assert payload["status"] == "error" and isinstance(payload["message"], str) and payload["message"], payload
    return payload["message"]


def online(server, user, kind, resource, presence: str | None = ""):
    """A logged-in client; ``presence`` is the inner XML of its initial presence (None: stays unavailable)."""
    client = BoshClient(server.bosh_url, wait=5) if kind == "bosh" else WsClient(server.ws_url)
    client.login(user, resource=resource)
    if presence is not None:
        client.presence(presence)
    client.iq("<ping xmlns='urn:xmpp:ping'/>")  # processed in order: the presence is in place
    return client


def stop(*clients):
    for client in clients:
        try:
            client.stop()
        except Exception:  # noqa: BLE001
            pass


def acted_on(el) -> bool:
    """A message or a stream error: what a wrongly accepted API call would cause."""
    return el.tag in (q(NS_CLIENT, "message"), q(NS_STREAM, "error"))


def stream_error(client, timeout=5) -> tuple[str, str | None]:
    """The condition and text of the <stream:error/> the client got (both transports put it in the inbox)."""
    el = client.recv(timeout, lambda e: e.tag == q(NS_STREAM, "error"))
    condition = next(c.tag.split("}")[1] for c in el if not c.tag.endswith("}text"))
    text = el.find(q(NS_STREAMS_ERR, "text"))
    return condition, text.text if text is not None else None


def parse_iso(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def body_of(message) -> str:
    return message.find(q(NS_CLIENT, "body")).text


# -- GET /api/users/<user>/sessions ---------------------------------------------------------------


def test_sessions_over_bosh_and_websocket_with_presence(server):
    before = time.time()
    laptop = online(server, "alice", "bosh", "laptop",
                    "<show>away</show><status>at lunch</status><priority>5</priority>")
    phone = online(server, "alice", "websocket", "phone", presence=None)
    after = time.time()
    try:
        listed = ok_json(api(server, "GET", "/api/users/alice/sessions"))
        assert listed["user"] == "alice" and listed["jid"] == "alice@localhost" and listed["online"] is True
        by_resource = {s["resource"]: s for s in listed["sessions"]}
        assert set(by_resource) == {"laptop", "phone"}
        assert by_resource["laptop"]["jid"] == "alice@localhost/laptop"
        assert by_resource["laptop"]["transport"] == "bosh"
        assert by_resource["phone"]["transport"] == "websocket"
        assert by_resource["laptop"]["presence"] == {"available": True, "show": "away", "status": "at lunch",
                                                     "priority": 5}
        assert by_resource["phone"]["presence"] == {"available": False}
        for session in listed["sessions"]:
            assert int(before) - 1 <= parse_iso(session["since"]) <= after + 1, session

        # Plain available (no <show/>) on the phone; the laptop logs out.
        phone.presence()
        phone.iq("<ping xmlns='urn:xmpp:ping'/>")
        laptop.close()
        listed = ok_json(api(server, "GET", "/api/users/alice/sessions"))
        assert [(s["resource"], s["presence"]) for s in listed["sessions"]] == [
            ("phone", {"available": True, "show": None, "status": None, "priority": 0})]
    finally:
        stop(laptop, phone)


def test_sessions_of_an_offline_user_and_of_nobody(server):
    assert ok_json(api(server, "GET", "/api/users/bob/sessions")) == {
        "user": "bob", "jid": "bob@localhost", "online": False, "sessions": []}
    assert "no such user: zed" in error(api(server, "GET", "/api/users/zed/sessions"), 404)
    # Usernames are prepared as in JIDs (RFC 7622): BOB is bob.
    assert ok_json(api(server, "GET", "/api/users/BOB/sessions"))["user"] == "bob"


# -- POST /api/messages -----------------------------------------------------------------------------


def test_system_message_delivered_live(server, transport):
    bob = online(server, "bob", transport, "desk")
    try:
        answer = ok_json(api(server, "POST", "/api/messages", {"to": "bob@localhost", "body": "Maintenance at 17:00 <&>"}))
        assert answer["status"] == "delivered" and answer["id"].startswith("api-")
        assert answer["from"] == "localhost" and answer["to"] == "bob@localhost"
        got = bob.recv_message(sender="localhost")
        assert got.get("from") == "localhost" and got.get("type") == "chat" and got.get("id") == answer["id"]
        assert body_of(got) == "Maintenance at 17:00 <&>"

        # A named system JID of the domain, a headline, a full JID, a bare username.
        answer = ok_json(api(server, "POST", "/api/messages", {
            "from": "notifications@localhost", "to": "bob@localhost/desk", "body": "You have 3 new orders",
            "type": "headline"}))
        assert answer["status"] == "delivered"
        got = bob.recv_message(sender="notifications@localhost")
        assert got.get("type") == "headline" and got.get("to") == "bob@localhost/desk"
        answer = ok_json(api(server, "POST", "/api/messages", {"to": "bob", "body": "héllo 😀", "type": "normal"}))
        assert answer["status"] == "delivered" and answer["to"] == "bob@localhost"
        got = bob.recv_message(sender="localhost")
        assert body_of(got) == "héllo 😀" and got.get("type") == "normal"
    finally:
        stop(bob)


def test_system_message_stored_offline_then_delivered_at_login(server, transport):
    answer = ok_json(api(server, "POST", "/api/messages", {"from": "localhost/announcements", "to": "carol@localhost",
                                                           "body": "Welcome back!"}))
    assert answer["status"] == "stored"
    # An online user with only a negative priority does not get it either: stored (RFC 6121 §8.5.2.2).
    answer2 = ok_json(api(server, "POST", "/api/messages", {"to": "carol", "body": "Second"}))
    assert answer2["status"] == "stored"
    # A headline is never stored (RFC 6121 §8.5.2.2.1): nobody got it.
    assert ok_json(api(server, "POST", "/api/messages", {"to": "carol", "body": "x", "type": "headline"}))["status"] == "dropped"

    carol = online(server, "carol", transport, "r")
    try:
        first = carol.recv_message(sender="localhost/announcements")
        assert first.get("id") == answer["id"] and body_of(first) == "Welcome back!"
        delay = first.find(q(NS_DELAY, "delay"))
        assert delay is not None and delay.get("from") == "localhost"
        second = carol.recv_message(sender="localhost")
        assert body_of(second) == "Second"
        carol.expect_nothing(0.5, lambda e: e.tag == q(NS_CLIENT, "message"))  # not the headline
    finally:
        stop(carol)


def test_full_mailbox_is_a_503_naming_the_condition(make_server):
    server = make_server(offline_max_per_user=1)
    assert ok_json(api(server, "POST", "/api/messages", {"to": "dave", "body": "one"}))["status"] == "stored"
    reply = api(server, "POST", "/api/messages", {"to": "dave", "body": "two"})
    assert "offline storage full" in error(reply, 503)
    assert reply.json()["condition"] == "service-unavailable"
    assert bodies_at_login(server, "dave") == ["one"]


def bodies_at_login(server, user):
    client = online(server, user, "websocket", "r")
    try:
        got = [body_of(client.recv_message())]
        client.expect_nothing(0.3, lambda e: e.tag == q(NS_CLIENT, "message"))
        return got
    finally:
        stop(client)


# -- DELETE /api/users/<user>/sessions ----------------------------------------------------------------


def test_delete_ends_every_session_with_the_stream_error(server):
    laptop = online(server, "alice", "bosh", "laptop")
    phone = online(server, "alice", "websocket", "phone")
    bob = online(server, "bob", "websocket", "r")
    try:
        answer = ok_json(api(server, "DELETE", "/api/users/alice/sessions",
                             {"condition": "conflict", "text": "your account was disabled"}))
        assert sorted(answer["ended"]) == ["alice@localhost/laptop", "alice@localhost/phone"]
        assert answer["condition"] == "conflict" and answer["tokens_revoked_before"] is None
        for client in (laptop, phone):
            assert stream_error(client) == ("conflict", "your account was disabled")
        phone.recv(5, lambda e: e.tag == "socket-closed")
        # XEP-0206 §4: a BOSH client gets it in a terminate body (conflict is no XEP-0124 condition)
        assert laptop.recv(5, lambda e: e.get("type") == "terminate").get("condition") == "remote-stream-error"
        assert ok_json(api(server, "GET", "/api/users/alice/sessions"))["sessions"] == []
        # bob is untouched, and sees alice go
        bob.recv_presence(sender="alice@localhost", type_="unavailable")
        assert [s["resource"] for s in ok_json(api(server, "GET", "/api/users/bob/sessions"))["sessions"]] == ["r"]

        # The default: policy-violation, also from query parameters alone.
        again = online(server, "alice", "websocket", "again")
        answer = ok_json(api(server, "DELETE", "/api/users/alice/sessions?text=bye"))
        assert answer["ended"] == ["alice@localhost/again"] and answer["condition"] == "policy-violation"
        assert stream_error(again) == ("policy-violation", "bye")
        # Nobody online: fine, nothing ended.
        assert ok_json(api(server, "DELETE", "/api/users/alice/sessions"))["ended"] == []
        assert "no such user" in error(api(server, "DELETE", "/api/users/zed/sessions"), 404)
    finally:
        stop(laptop, phone, bob)


@pytest.fixture
def jwt_secret(tmp_path):
    path = tmp_path / "jwt.secret"
    path.write_text(SECRET + "\n")
    return str(path)


def token(user="alice", iat=None, lifetime=300):
    now = int(time.time()) if iat is None else iat
    return jwt.encode({"jid": f"{user}@localhost", "iat": now, "exp": now + lifetime}, SECRET, algorithm="HS256")


def token_login(server, kind, user, password):
    client = BoshClient(server.bosh_url, wait=5) if kind == "bosh" else WsClient(server.ws_url)
    client.wait_features()
    reply = client.authenticate(user, password, "PLAIN")
    return client, "success" if reply.tag == q(NS_SASL, "success") else reply[0].tag.split("}")[1]


def test_delete_with_revoke_tokens_refuses_older_tokens(make_server, jwt_secret, transport):
    server = make_server(jwt_key=jwt_secret, password_logins=False)
    old = token(iat=int(time.time()) - 5)
    client, outcome = token_login(server, transport, "alice", old)
    assert outcome == "success"
    client.restart()
    client.wait_features()
    client.bind("tok")
    made = [client]
    try:
        answer = ok_json(api(server, "DELETE", "/api/users/alice/sessions", {"revoke_tokens": True}))
        assert answer["ended"] == ["alice@localhost/tok"]
        cutoff = parse_iso(answer["tokens_revoked_before"])
        assert abs(cutoff - time.time()) < 5
        assert stream_error(client)[0] == "policy-violation"

        # The old token (still unexpired) no longer logs in; the log says why, without the token.
        before = len(server.log())
        again, outcome = token_login(server, transport, "alice", old)
        made.append(again)
        assert outcome == "not-authorized"
        log = server.log()[before:]
        assert "issued before this user's tokens were revoked" in log and old[-30:] not in log
        # A token the app mints afterwards does; other users' tokens were never affected.
        fresh, outcome = token_login(server, transport, "alice", token(iat=int(time.time()) + 1))
        made.append(fresh)
        assert outcome == "success"
        other, outcome = token_login(server, transport, "bob", token("bob", iat=int(time.time()) - 5))
        made.append(other)
        assert outcome == "success"
        # Query form.
        assert ok_json(api(server, "DELETE", "/api/users/bob/sessions?revoke_tokens=true"))["tokens_revoked_before"]
    finally:
        stop(*made)


def test_revoke_tokens_without_jwt_key_is_a_400_and_ends_nothing(server):
    alice = online(server, "alice", "websocket", "r")
    try:
        message = error(api(server, "DELETE", "/api/users/alice/sessions", {"revoke_tokens": True}), 400)
        assert "jwt_key" in message
        assert "jwt_key" in error(api(server, "DELETE", "/api/users/alice/sessions?revoke_tokens=1"), 400)
        assert [s["resource"] for s in ok_json(api(server, "GET", "/api/users/alice/sessions"))["sessions"]] == ["r"]
        alice.expect_nothing(0.3, lambda e: e.tag == q(NS_STREAM, "error"))
    finally:
        stop(alice)


# -- protection: the refresh endpoint's rules -------------------------------------------------------

ENDPOINTS = [("GET", "/api/users/alice/sessions", None), ("DELETE", "/api/users/alice/sessions", None),
             ("POST", "/api/messages", {"to": "alice", "body": "x"}), ("GET", "/api/unknown", None)]


def test_bearer_secret_required(make_server):
    server = make_server(refresh_secret="s3cr3t-api")
    alice = online(server, "alice", "websocket", "r")
    try:
        for method, path, body in ENDPOINTS:
            reply = api(server, method, path, body)
            assert "missing Authorization" in error(reply, 401)
            assert reply.headers["WWW-Authenticate"].startswith("Bearer")
            assert "invalid bearer token" in error(api(server, method, path, body, {"Authorization": "Bearer nope"}), 401)
            assert error(api(server, method, path, body, {"Authorization": "Basic czNjcjN0LWFwaQ=="}), 401)
        alice.expect_nothing(0.3, acted_on)  # no message, no stream error: nothing happened
        good = {"Authorization": "Bearer s3cr3t-api"}
        assert ok_json(api(server, "GET", "/api/users/alice/sessions", headers=good))["online"] is True
        assert ok_json(api(server, "POST", "/api/messages", {"to": "alice", "body": "x"}, good))["status"] == "delivered"
        assert "WARNING boshroster.api: API GET /api/users/alice/sessions from 127.0.0.1: 401 missing" in server.log()
        metrics = requests.get(server.base_url + "/metrics", timeout=5).text
        assert 'boshroster_api_requests_total{outcome="refused"} 12.0' in metrics
    finally:
        stop(alice)


def test_callers_outside_the_allowed_networks_get_403(make_server):
    server = make_server(refresh_allowed_networks=["10.0.0.0/8"])
    alice = online(server, "alice", "websocket", "r")
    try:
        for method, path, body in ENDPOINTS:
            assert "API not allowed from 127.0.0.1" in error(api(server, method, path, body), 403)
        alice.expect_nothing(0.3, acted_on)
        log = server.log()
        assert "WARNING boshroster.api: API DELETE /api/users/alice/sessions from 127.0.0.1: 403" in log
    finally:
        stop(alice)


def test_forwarded_client_behind_a_trusted_proxy_is_the_caller(server):
    # 127.0.0.1 is a trusted proxy by default: the client is the X-Forwarded-For hop, outside 127/8.
    outside = {"X-Forwarded-For": "203.0.113.9"}
    assert "not allowed from 203.0.113.9" in error(api(server, "GET", "/api/users/alice/sessions", headers=outside), 403)
    inside = {"X-Forwarded-For": "127.0.0.5"}
    assert ok_json(api(server, "GET", "/api/users/alice/sessions", headers=inside))["user"] == "alice"


# -- bad input: one server for all of it, nothing may change -----------------------------------------


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    backend = TestBackend(demo_contacts()).start()
    server = ServerProcess(tmp_path_factory.mktemp("api"), http_roster_url=backend.url_template,
                           api_max_body=65536, stanza_size_limit=16384).start()
    bob = online(server, "bob", "websocket", "watch")
    yield server, bob
    stop(bob)
    server.stop()
    backend.stop()


def message(**fields):
    return {"to": "bob@localhost", "body": "hello", **fields}


BAD_MESSAGES = [
    # (raw body, content type, status, what the message says)
    (b"", "application/json", 400, "a JSON object is required"),
    (b"{not json", "application/json", 400, "malformed JSON"),
    (b'{"to": "bob", "body": "x"', "application/json", 400, "malformed JSON"),
    (b'["bob", "x"]', "application/json", 400, "must be a JSON object, got an array"),
    (b'"x"', "application/json", 400, "got a string"),
    (b"null", "application/json", 400, "got null"),
    (b'{"to": "bob", "body": NaN}', "application/json", 400, "NaN is not JSON"),
    (b'{"to": "bob", "to": "carol", "body": "x"}', "application/json", 400, "appears twice"),
    (b'{"to": "bob", "body": "\xff"}', "application/json", 400, "not valid UTF-8"),
    (b"[" * 100000 + b"]" * 100000, "application/json", 413, "larger than api_max_body"),
    (b"[" * 30000 + b"]" * 30000, "application/json", 400, "malformed JSON"),  # too deep for the parser
    (json.dumps(message()).encode(), "text/plain", 415, "Content-Type must be application/json"),
    (json.dumps(message()).encode(), "", 415, "Content-Type must be application/json"),
    (json.dumps(message()).encode(), "application/x-www-form-urlencoded", 415, "not 'application/x-www-form-urlencoded'"),
    (json.dumps(message(priority=1)).encode(), "application/json", 400, "unknown field(s): priority"),
    (json.dumps({"body": "x"}).encode(), "application/json", 400, "to must be"),
    (json.dumps({"to": "bob"}).encode(), "application/json", 400, "body must be a non-empty string"),
    (json.dumps(message(body="")).encode(), "application/json", 400, "body must be a non-empty string"),
    (json.dumps(message(body=42)).encode(), "application/json", 400, "body must be a non-empty string"),
    (json.dumps(message(body="bell \u0007")).encode(), "application/json", 400, "U+0007, which XML cannot carry"),
    (json.dumps(message(body="\ud800")).encode(), "application/json", 400, "U+D800"),
    (json.dumps(message(type="groupchat")).encode(), "application/json", 400, "type must be one of chat, normal, headline"),
    (json.dumps(message(type="error")).encode(), "application/json", 400, "type must be one of"),
    (json.dumps(message(to="bob@example.org")).encode(), "application/json", 400, "not a user of localhost"),
    (json.dumps(message(to="localhost")).encode(), "application/json", 404, "no such user: localhost"),
    (json.dumps(message(to="@localhost")).encode(), "application/json", 400, "not a valid JID"),
    (json.dumps(message(to="bob@localhost/")).encode(), "application/json", 400, "not a valid JID"),
    (json.dumps(message(to=["bob"])).encode(), "application/json", 400, "to must be"),
    (json.dumps(message(**{"from": "admin@example.org"})).encode(), "application/json", 400, "not a JID of localhost"),
    (json.dumps(message(**{"from": ""})).encode(), "application/json", 400, "from must be a JID of localhost"),
    (json.dumps(message(**{"from": "a b@localhost"})).encode(), "application/json", 400, "is not a valid JID"),
    (json.dumps(message(to="zed@localhost")).encode(), "application/json", 404, "no such user: zed"),
    (json.dumps(message(body="x" * 17000)).encode(), "application/json", 413, "over stanza_size_limit (16384)"),
    (json.dumps(message(body="x" * 70000)).encode(), "application/json", 413, "larger than api_max_body (65536 bytes)"),
]


@pytest.mark.parametrize("raw,ctype,status,says", BAD_MESSAGES, ids=[f"{i}-{s}" for i, (_, _, s, _) in enumerate(BAD_MESSAGES)])
def test_bad_messages_are_clear_errors_and_deliver_nothing(quiet, raw, ctype, status, says):
    server, bob = quiet
    reply = requests.post(server.base_url + "/api/messages", data=raw, headers={"Content-Type": ctype} if ctype else {},
                          timeout=10)
    assert says in error(reply, status)
    bob.expect_nothing(0.05, lambda e: e.tag == q(NS_CLIENT, "message"))


def test_huge_chunked_body_is_413(quiet):
    server, bob = quiet

    def chunks():
        for _ in range(200):  # 200 x 1 KiB, no Content-Length
            yield b" " * 1024

    reply = requests.post(server.base_url + "/api/messages", data=chunks(), headers=JSON, timeout=10)
    assert "larger than api_max_body" in error(reply, 413)
    # A declared size over the limit is refused before reading a byte of it (raw socket: requests
    # would correct the header).
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /api/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 99999999999\r\n\r\n{}")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ") and b"larger than api_max_body" in answer, answer


BAD_DELETES = [
    ("/api/users/alice/sessions", {"condition": "system-shutdown"}, 400, "condition must be one of policy-violation, conflict"),
    ("/api/users/alice/sessions?condition=see-other-host", None, 400, "condition must be one of"),
    ("/api/users/alice/sessions", {"text": "x" * 1025}, 400, "text must be a string of at most 1024"),
    ("/api/users/alice/sessions", {"text": 5}, 400, "text must be a string"),
    ("/api/users/alice/sessions", {"text": "nul \u0000"}, 400, "text must be a string"),
    ("/api/users/alice/sessions", {"revoke_tokens": "yes"}, 400, "revoke_tokens must be true or false"),
    ("/api/users/alice/sessions?revoke_tokens=maybe", None, 400, "revoke_tokens must be true or false"),
    ("/api/users/alice/sessions?force=1", None, 400, "unknown query parameter 'force'"),
    ("/api/users/alice/sessions", {"reason": "x"}, 400, "unknown field(s): reason"),
    ("/api/users/alice/sessions", [], 400, "must be a JSON object"),
    ("/api/users/a%20b/sessions", None, 400, "is not a valid username"),
    ("/api/users/zed/sessions", None, 404, "no such user: zed"),
]


@pytest.mark.parametrize("path,body,status,says", BAD_DELETES, ids=[p[-30:] + str(i) for i, (p, *_rest) in enumerate(BAD_DELETES)])
def test_bad_deletes_end_nothing(quiet, path, body, status, says):
    server, bob = quiet
    path = path.replace("alice", "bob")
    assert says.replace("alice", "bob") in error(api(server, "DELETE", path, body), status)
    bob.expect_nothing(0.05, lambda e: e.tag == q(NS_STREAM, "error"))
    assert [s["resource"] for s in ok_json(api(server, "GET", "/api/users/bob/sessions"))["sessions"]] == ["watch"]


def test_delete_body_needs_the_json_content_type(quiet):
    server, bob = quiet
    reply = api(server, "DELETE", "/api/users/bob/sessions", raw=b'{"condition": "conflict"}',
                headers={"Content-Type": "text/plain"})
    assert "Content-Type must be application/json" in error(reply, 415)
    bob.expect_nothing(0.05, lambda e: e.tag == q(NS_STREAM, "error"))


def test_unknown_paths_methods_and_usernames(quiet):
    server, _bob = quiet
    assert "no such API endpoint: /api/users/bob" in error(api(server, "GET", "/api/users/bob"), 404)
    assert "no such API endpoint" in error(api(server, "POST", "/api/nothing", {}), 404)
    reply = api(server, "PUT", "/api/users/bob/sessions", {})
    assert "PUT is not allowed here" in error(reply, 405) and reply.headers["Allow"] == "GET, DELETE"
    assert "allowed: POST" in error(api(server, "GET", "/api/messages"), 405)
    assert "is not a valid username" in error(api(server, "GET", "/api/users/bob%40localhost/sessions"), 400)
    # Nothing of the above reached bob, who is still there and still gets a good message.
    assert ok_json(api(server, "POST", "/api/messages", message(body="still here")))["status"] == "delivered"
    _bob.recv_message(sender="localhost")
    metrics = requests.get(server.base_url + "/metrics", timeout=5).text
    assert 'boshroster_api_requests_total{outcome="bad-request"}' in metrics
