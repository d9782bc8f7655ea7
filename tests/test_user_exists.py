"""Does a user exist with auth = "http" (issue 10 point 15, the auth side)?

Before: with ``auth = "http"`` every username existed; messages to 300 made-up
names were stored offline (340 KB, nothing bounced).  Now the authenticator
answers ``user_exists`` from ``http_user_exists_url`` (2xx yes, 404/410 no,
anything else: assume yes and back off), cached.

These tests drive HttpUserCheck / HttpAuthenticator against a real HTTP app
(an in-process gevent server), and the bounce end to end through the server.
"""

from __future__ import annotations

import json
from urllib.parse import unquote

import gevent
import pytest
from gevent.pywsgi import WSGIServer

from backend_app import closed_port_url_template
from boshroster.auth import http_check
from boshroster.auth.http_check import HttpAuthenticator, HttpUserCheck
from harness import NS_CLIENT, NS_STANZAS, BoshClient, WsClient, q


class UserApp:
    """The app: POST /check (alice, bob / "secret"), GET /users/<name> (200 known, 404 else)."""

    def __init__(self, users=("alice", "bob", "carol")):
        self.users = set(users)
        self.gets: list[str] = []
        self.status: int | None = None  # force a status for GET /users/
        self.delay = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        self.server = WSGIServer(("127.0.0.1", 0), self.app, log=None, error_log=None)
        self.server.start()
        base = f"http://127.0.0.1:{self.server.server_port}"
        self.check_url = base + "/check"
        self.users_url = base + "/users/%s"

    def app(self, environ, start_response):
        path = environ["PATH_INFO"]
        if environ["REQUEST_METHOD"] == "POST" and path == "/check":
            body = json.loads(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)) or b"{}")
            ok = body.get("username") in ("alice", "bob") and body.get("password") == "secret"
            start_response("204 No Content" if ok else "403 Forbidden", [])
            return []
        if path.startswith("/users/"):
            name = unquote(environ.get("RAW_URI", path).split("/users/", 1)[1])
            self.gets.append(name)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if self.delay:
                    gevent.sleep(self.delay)
            finally:
                self.in_flight -= 1
            if self.status is not None:
                start_response(f"{self.status} Whatever", [("Content-Type", "text/plain")])
                return [b"x"]
            if name in self.users:
                start_response("200 OK", [("Content-Type", "application/json")])
                return [b"{}"]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"no such user"]
        start_response("404 Not Found", [])
        return []

    def stop(self):
        self.server.stop(timeout=0)


@pytest.fixture
def app():
    server = UserApp()
    yield server
    server.stop()


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_answers_are_cached_yes_and_no(app):
    clock = Clock()
    check = HttpUserCheck(app.users_url, timeout=2, cache_seconds=60, clock=clock)
    assert check.user_exists("alice") is True
    assert check.user_exists("ghost") is False
    assert check.user_exists("ghost") is False and check.user_exists("alice") is True
    assert app.gets == ["alice", "ghost"]
    clock.now += 61
    assert check.user_exists("ghost") is False
    assert app.gets == ["alice", "ghost", "ghost"]


def test_username_is_url_encoded(app):
    app.users.add("o'neil/x y")
    check = HttpUserCheck(app.users_url, timeout=2)
    assert check.user_exists("o'neil/x y") is True
    assert app.gets == ["o'neil/x y"]


@pytest.mark.parametrize("status", [500, 503, 401, 302])
def test_other_statuses_count_as_exists_and_back_off(app, status):
    clock = Clock()
    app.status = status
    check = HttpUserCheck(app.users_url, timeout=2, clock=clock)
    assert check.user_exists("ghost") is True
    assert check.user_exists("ghost2") is True  # not asked: the backend is having trouble
    assert len(app.gets) == 1
    clock.now += http_check._DOWN_SECONDS + 1
    app.status = None
    assert check.user_exists("ghost2") is False


def test_410_means_gone(app):
    app.status = 410
    assert HttpUserCheck(app.users_url, timeout=2).user_exists("alice") is False


def test_backend_down_or_slow_fails_open(app, caplog):
    down = HttpUserCheck(closed_port_url_template(), timeout=1)
    assert down.user_exists("anyone") is True
    assert "could not reach" in caplog.text
    app.delay = 3
    slow = HttpUserCheck(app.users_url, timeout=0.5)
    started = gevent.get_hub().loop.now()
    assert slow.user_exists("ghost") is True
    assert gevent.get_hub().loop.now() - started < 2


def test_concurrent_checks_are_bounded(app):
    app.delay = 0.5
    check = HttpUserCheck(app.users_url, timeout=5)
    results = [gevent.spawn(check.user_exists, f"ghost{i}") for i in range(30)]
    gevent.joinall(results, timeout=10)
    answers = [g.value for g in results]
    assert app.max_in_flight <= http_check._MAX_IN_FLIGHT
    assert len(app.gets) == http_check._MAX_IN_FLIGHT
    assert answers.count(False) == http_check._MAX_IN_FLIGHT  # asked: no such user
    assert answers.count(True) == 30 - http_check._MAX_IN_FLIGHT  # not asked: assumed


def test_http_authenticator_user_exists(app):
    plain = HttpAuthenticator(app.check_url, "localhost", timeout=2)
    assert plain.user_exists("ghost") is True  # no URL: cannot tell, store as before
    check = HttpUserCheck(app.users_url, timeout=2)
    auth = HttpAuthenticator(app.check_url, "localhost", timeout=2, user_check=check)
    assert auth.user_exists("ghost") is False
    app.users.discard("bob")  # the directory is behind, the password check is not
    assert auth.check_password("bob", "secret") is True
    assert auth.user_exists("bob") is True  # a user who just logged in exists, no GET
    assert app.gets == ["ghost"]


@pytest.mark.parametrize("transport", ["bosh", "websocket"])
def test_messages_to_made_up_users_bounce_end_to_end(make_server, app, transport):
    server = make_server(auth="http", http_auth_url=app.check_url, http_user_exists_url=app.users_url,
                         users=(), bosh_max_wait=5)
    client = BoshClient(server.bosh_url, wait=5) if transport == "bosh" else WsClient(server.ws_url)
    try:
        client.login("alice", "secret", mechanism="PLAIN", resource="a")
        ids = {}
        for to in [f"madeup{i}" for i in range(30)] + ["carol"]:
            mid = client.new_id()
            client.send_xml(f"<message xmlns='{NS_CLIENT}' to='{to}@localhost' id='{mid}' type='chat'>"
                            f"<body>hello</body></message>")
            ids[mid] = to
        errors = {}
        while True:  # collect errors until none comes for 2 s
            try:
                reply = client.recv(2, lambda e: e.get("id") in ids and e.get("type") == "error")
            except TimeoutError:
                break
            err = reply.find(q(NS_CLIENT, "error"))
            errors[ids[reply.get("id")]] = [c.tag.split("}")[1] for c in err
                                            if c.tag.startswith(f"{{{NS_STANZAS}}}")][0]
        # carol exists (the app says so): stored offline, no error.
        assert errors == {f"madeup{i}": "service-unavailable" for i in range(30)}
        assert sorted(set(app.gets)) == sorted({f"madeup{i}" for i in range(30)} | {"carol"})
    finally:
        client.stop()
