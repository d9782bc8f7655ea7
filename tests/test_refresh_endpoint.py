"""Issue 3, HTTP side: the refresh endpoint of the mod_http_roster_admin contract.

``POST /roster_admin/refresh`` and ``GET /roster_admin/refresh/<user>`` on a
real server subprocess: the documented JSON reply, ``400`` JSON errors that
name what is wrong with a body, bounded answer times when the backend hangs,
and the endpoint's protection (shared secret, source networks, trusted
proxies), each refusal logged.  Pushes and presence caused by a refresh are
checked over XMPP in test_roster_e2e.py.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from backend_app import TestBackend
from conftest import demo_contacts
from harness import BoshClient, ServerProcess, WsClient

JSON = "application/json"


def ok(updated, errors=0) -> dict:
    return {"status": "ok", "message": "roster update complete", "updated": updated, "errors": errors}


def post(server, body, headers=None, timeout=15.0) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) or body is None or hasattr(body, "__next__") else json.dumps(body)
    return requests.post(server.base_url + "/roster_admin/refresh", data=data, headers=headers or {}, timeout=timeout)


def get(server, username, headers=None, timeout=15.0) -> requests.Response:
    return requests.get(server.base_url + "/roster_admin/refresh/" + username, headers=headers or {}, timeout=timeout)


def json_reply(reply: requests.Response, status: int) -> dict:
    assert reply.status_code == status, (reply.status_code, reply.text)
    assert reply.headers["Content-Type"].split(";")[0].strip() == JSON, reply.headers
    return reply.json()


def error_message(reply: requests.Response, status: int) -> str:
    payload = json_reply(reply, status)
    assert set(payload) == {"status", "message"} and payload["status"] == "error", payload
    assert isinstance(payload["message"], str) and payload["message"]
    return payload["message"]


def online(server, user, kind="websocket"):
    client = BoshClient(server.bosh_url, wait=5) if kind == "bosh" else WsClient(server.ws_url)
    client.login(user, resource="r")
    assert client.get_roster().get("type") == "result"
    return client


def stop(*made):
    for client in made:
        client.stop()
        if isinstance(client, BoshClient):
            client.http.close()


# -- bad bodies (one server for all: none of them may change anything) ----------------------------------


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    backend = TestBackend(demo_contacts()).start()
    server = ServerProcess(tmp_path_factory.mktemp("refresh"), http_roster_url=backend.url_template).start()
    alice = online(server, "alice")  # online and cached: a wrongly accepted body would fetch
    yield server, backend
    stop(alice)
    server.stop()
    backend.stop()


BAD_BODIES = [
    # (body, what the 400 message must say)
    (b"", "empty body"),
    (b"  \r\n ", "empty body"),
    (b'["alice"', "malformed JSON"),
    (b"{not json", "malformed JSON"),
    (b"['alice']", "malformed JSON"),
    (b"null", "got null"),
    (b"42", "got a number"),
    (b"3.5", "got a number"),
    (b"true", "got a boolean"),
    (b'"alice"', "got a string"),
    (b'{"users": ["alice"]}', "got an object"),
    (b"{}", "got an object"),
    (b"[1]", "entry 0 is a number"),
    (b'["alice", null]', "entry 1 is null"),
    (b'["alice", true]', "entry 1 is a boolean"),
    (b'[["alice"]]', "entry 0 is an array"),
    (b'[{"user": "alice"}]', "entry 0 is an object"),
    (b'["alice", "bad user"]', 'entry 1 ("bad user") is not a valid username'),
    (b'["alice@localhost"]', "is not a valid username"),
    (b'[""]', "entry 0 (\"\") is not a valid username"),
    (b'["\xff\xfe"]', "not valid UTF-8"),
]


@pytest.mark.parametrize("body,says", BAD_BODIES, ids=[repr(b)[2:22] for b, _ in BAD_BODIES])
def test_bad_body_is_a_400_json_error_naming_the_problem(quiet, body, says):
    server, backend = quiet
    before = backend.requests_for("alice")
    reply = post(server, body, headers={"Content-Type": JSON})
    assert says in error_message(reply, 400)
    assert backend.requests_for("alice") == before


def test_too_many_usernames(quiet):
    server, backend = quiet
    body = json.dumps([f"u{i}" for i in range(100_000)])  # under refresh_max_body, over refresh_max_users
    assert len(body) < 1048576
    started = time.monotonic()
    message = error_message(post(server, body), 400)
    assert "too many usernames: 100000, at most 10000" in message
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_refresh_max_body(quiet, chunked):
    server, backend = quiet
    body = json.dumps(["a" * 1000] * 2100).encode()  # ~2 MB, over the 1 MB default
    data = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    assert "body larger than 1048576 bytes" in error_message(post(server, data), 400)


def test_bad_username_in_get_url(quiet):
    server, _ = quiet
    assert "not a valid username" in error_message(get(server, "bad%20user"), 400)


def test_empty_array_answers_at_once(quiet):
    server, backend = quiet
    started = time.monotonic()
    assert json_reply(post(server, b"[]"), 200) == ok(0)
    assert time.monotonic() - started < 0.5


def test_many_offline_users_are_counted_without_fetching(quiet):
    server, backend = quiet
    names = [f"user{i}" for i in range(10_000)]
    started = time.monotonic()
    assert json_reply(post(server, names), 200) == ok(10_000)
    assert time.monotonic() - started < 5
    assert backend.requests_for("user1") == 0 and backend.requests_for("user9999") == 0


def test_bad_requests_are_logged(quiet):
    server, _ = quiet
    post(server, b"null")  # the server logs before it answers (line-buffered stderr)
    assert "bad refresh request from 127.0.0.1: expected a JSON array of usernames, got null" in server.log()


# -- the documented replies ------------------------------------------------------------------------------


def test_refresh_replies_as_documented(make_server, backend):
    server = make_server()  # refresh_secret = "" (the default): no secret needed from an allowed network
    alice = online(server, "alice", "bosh")
    try:
        backend.contacts["alice"] = {"zoe@example.org": {"name": "Zoe"}}
        reply = post(server, ["alice"], headers={"Content-Type": JSON})
        assert json_reply(reply, 200) == ok(1)
        assert reply.text == json.dumps(ok(1))  # byte for byte what Prosody's backends parse
        assert backend.requests_for("alice") == 2
        assert json_reply(get(server, "alice"), 200) == ok(1)
        assert backend.requests_for("alice") == 3
        # Duplicates (after username preparation) are fetched once and counted once.
        assert json_reply(post(server, ["alice", "alice", "Alice"]), 200) == ok(1)
        assert backend.requests_for("alice") == 4
        # Offline users: counted as updated, never fetched.
        assert json_reply(post(server, ["alice", "bob", "nobody"]), 200) == ok(3)
        assert backend.requests_for("bob") == 0 and backend.requests_for("nobody") == 0
        assert json_reply(get(server, "carol"), 200) == ok(1)
        assert backend.requests_for("carol") == 0
        # The body is read as JSON whatever the Content-Type (curl -d sends a form type).
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert json_reply(post(server, b'["nobody"]', headers=form), 200) == ok(1)
    finally:
        stop(alice)


# -- bounded in time -------------------------------------------------------------------------------------


def test_refresh_is_answered_in_bounded_time_when_the_backend_hangs(make_server, backend):
    server = make_server(refresh_timeout=0.6, roster_max_concurrency=2, roster_read_timeout=3.0)
    made = [online(server, user) for user in ("alice", "bob", "carol", "dave")]
    try:
        backend.set_fault("alice", "slow", 10)
        started = time.monotonic()
        assert json_reply(post(server, ["alice", "bob"]), 200) == ok(1, 1)
        assert time.monotonic() - started < 2.0
        started = time.monotonic()
        assert json_reply(get(server, "alice"), 200) == ok(0, 1)
        assert time.monotonic() - started < 2.0
        # More hanging users than roster_max_concurrency: still answered on time,
        # every user not refreshed by then counted as an error.
        for user in ("bob", "carol", "dave"):
            backend.set_fault(user, "slow", 10)
        started = time.monotonic()
        assert json_reply(post(server, ["alice", "bob", "carol", "dave"]), 200) == ok(0, 4)
        assert time.monotonic() - started < 2.0
        # The sessions are fine.
        for client in made:
            assert client.iq("<ping xmlns='urn:xmpp:ping'/>").get("type") == "result"
    finally:
        stop(*made)


# -- protection ---------------------------------------------------------------------------------------------


def refusals(server) -> list[str]:
    """The refusal lines logged so far (each is logged before its reply is written)."""
    return [line for line in server.log().splitlines() if "refresh refused" in line]


def test_shared_secret(make_server, backend):
    server = make_server(refresh_secret="s3cret-token", trusted_proxies=[])
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret-token-and-more"},
                    {"Authorization": "Basic czNjcmV0LXRva2Vu"}, {"Authorization": "s3cret-token"}):
        reply = post(server, ["nobody"], headers=headers)
        assert error_message(reply, 401)
        assert reply.headers.get("WWW-Authenticate", "").startswith("Bearer")
        # The body is not even looked at before the caller is authenticated.
        assert error_message(post(server, b"null", headers=headers), 401)
        assert error_message(get(server, "nobody", headers=headers), 401)
    assert "missing Authorization: Bearer token" in error_message(post(server, ["x"]), 401)
    right = {"Authorization": "Bearer s3cret-token"}
    assert json_reply(post(server, ["nobody"], headers=right), 200) == ok(1)
    assert json_reply(get(server, "nobody", headers=right), 200) == ok(1)
    assert json_reply(post(server, ["nobody"], headers={"Authorization": "bearer  s3cret-token "}), 200) == ok(1)
    # The peer (loopback) is not a trusted proxy: its X-Forwarded-For is ignored.
    spoofed = {**right, "X-Forwarded-For": "203.0.113.5"}
    assert json_reply(post(server, ["nobody"], headers=spoofed), 200) == ok(1)
    lines = refusals(server)
    assert len(lines) == 16, lines
    assert all("refresh refused (401) for 127.0.0.1" in line for line in lines)


def test_allowed_networks_without_loopback(make_server, backend):
    # No secret configured ("" = none required), but the allowlist still applies;
    # and with a secret, the right one does not help from the wrong network.
    for secret in ("", "s3cret"):
        server = make_server(refresh_secret=secret, refresh_allowed_networks=["10.0.0.0/8"], trusted_proxies=[])
        headers = {"Authorization": "Bearer s3cret"}
        for extra in ({}, {"X-Forwarded-For": "10.1.2.3"}):  # X-Forwarded-For from an untrusted peer: ignored
            assert "refresh not allowed from 127.0.0.1" in error_message(post(server, ["nobody"], {**headers, **extra}), 403)
            assert error_message(get(server, "nobody", {**headers, **extra}), 403)
        assert error_message(post(server, b"[]"), 403)
        lines = refusals(server)
        assert len(lines) == 5 and all("refresh refused (403) for 127.0.0.1" in line for line in lines), lines


def test_trusted_proxy_forwarded_for(make_server, backend):
    server = make_server(trusted_proxies=["127.0.0.1"], refresh_allowed_networks=["10.0.0.0/8"])
    assert json_reply(post(server, ["nobody"], {"X-Forwarded-For": "10.1.2.3"}), 200) == ok(1)
    assert json_reply(get(server, "nobody", {"X-Forwarded-For": "10.1.2.3"}), 200) == ok(1)
    # nginx appends the real client: the right-most untrusted hop counts, not what the client wrote.
    assert json_reply(post(server, ["nobody"], {"X-Forwarded-For": "203.0.113.5, 10.1.2.3"}), 200) == ok(1)
    for xff in ("203.0.113.5", "10.1.2.3, 203.0.113.5", "not-an-ip"):
        message = error_message(post(server, ["nobody"], {"X-Forwarded-For": xff}), 403)
        assert message == f"refresh not allowed from {xff.split(', ')[-1]}"
    # Without the header the client is the proxy itself, which is not allowed.
    assert error_message(post(server, ["nobody"]), 403) == "refresh not allowed from 127.0.0.1"
    lines = refusals(server)
    assert len(lines) == 4, lines
    assert "refresh refused (403) for 127.0.0.1: refresh not allowed from 203.0.113.5" in lines[0]


def test_bearer_scheme_is_case_insensitive_and_a_non_ascii_secret_works(make_server, backend):
    """Issue 10 point 16: RFC 7235 §2.1 schemes are case-insensitive; a secret outside ASCII
    must match whether the caller sends it in UTF-8 (a web app) or in latin-1 (Python's
    http.client for a str header), and a wrong or undecodable one is a 401, never a 500."""
    secret = "sécret-à-la-clé"
    server = make_server(refresh_secret=secret, trusted_proxies=[])
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        for sep in (" ", "  ", "\t"):
            headers = {"Authorization": f"{scheme}{sep}{secret}".encode("utf-8")}
            assert json_reply(post(server, ["nobody"], headers=headers), 200) == ok(1), (scheme, sep)
    assert json_reply(post(server, ["nobody"], headers={"Authorization": "Bearer " + secret}), 200) == ok(1)  # latin-1
    assert json_reply(get(server, "nobody", headers={"Authorization": f"Bearer {secret}".encode("utf-8")}), 200) == ok(1)
    for wrong in ("Bearer " + secret[:-1], "Bearer " + secret + "x", "Bearer sécret-à-la-cle", "Bearer \xff\xfe",
                  "Bearer 😀", "Bearer\u00a0" + secret, "Bearer" + secret, "Bearer " + secret.upper()):
        reply = post(server, ["nobody"], headers={"Authorization": wrong.encode("utf-8")})
        assert error_message(reply, 401), wrong
    emoji = make_server(refresh_secret="🔑 key", trusted_proxies=[])   # no latin-1 form at all
    assert json_reply(post(emoji, ["nobody"], headers={"Authorization": "Bearer 🔑 key".encode("utf-8")}), 200) == ok(1)
    assert error_message(post(emoji, ["nobody"], headers={"Authorization": b"Bearer \xf0\x9f\x94\x91"}), 401)
    for srv in (server, emoji):
        assert "Traceback" not in srv.log()
