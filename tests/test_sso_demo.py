"""Single sign-on in the demo (issue 13 item 2): the demo web app's login, its credentials URL, and
Converse.js logging in with the tokens it mints.

The demo app (scripts/demo_backend.py) runs as a real subprocess with its own users, a session
cookie and the JWT secret the real server (a ServerProcess) checks tokens with; its contacts are
the server's rosters.  The first tests talk HTTP to the app and XMPP to the server with the
harness clients; the last one drives Converse.js in headless Chromium (tests/js/sso_demo_e2e.js):
sign into the app, open the chat, be in it without a chat password; the token expires; the app's
API drops the connection; Converse fetches new credentials and reconnects.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time

import jwt
import pytest
import requests

from harness import NS_SASL, ROOT, BoshClient, ServerProcess, WsClient, q
from realclients import artifacts_dir, require, require_node, run_node_script
from test_converse_browser import chromium_path

SCRIPT = os.path.join(ROOT, "scripts", "demo_backend.py")
STATIC = os.path.join(ROOT, "static")


class DemoApp:
    """scripts/demo_backend.py on a free port; stopped by its PID."""

    def __init__(self, tmp_path, *extra):
        contacts = tmp_path / "contacts.json"
        shutil.copy(os.path.join(ROOT, "conf", "demo-contacts.json"), contacts)
        cmd = [sys.executable, SCRIPT, "--host", "127.0.0.1", "--port", "0", "--contacts", str(contacts), *extra]
        self.log_path = tmp_path / "demo_app.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log_file, text=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(20)
        if not line or "listening on http://" not in line[0]:
            self.stop()
            raise AssertionError(f"demo app did not start: {line}\n{self.log()}")
        self.url = line[0].split("listening on ")[1].split()[0].rstrip("/")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.log_file.close()


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "jwt.secret"
    path.write_text(secrets.token_urlsafe(48) + "\n")
    return path


@pytest.fixture
def sso(tmp_path, secret_file):
    """make(...) -> (server, demo app): the server checks tokens with the app's secret and gets its
    rosters from the app; the app mints tokens, refreshes and points its chat page at the server."""
    made = []

    def make(lifetime=300, **settings):
        workdir = tmp_path / f"sso{len(made)}"
        workdir.mkdir()
        server = ServerProcess(workdir, jwt_key=str(secret_file), **settings)  # its port is chosen, not yet open
        app = DemoApp(workdir, "--jwt-key", str(secret_file), "--token-lifetime", str(lifetime),
                      "--chat-server", server.base_url, "--refresh-url", server.base_url + "/roster_admin/refresh",
                      "--static", STATIC)
        made.append((server, app))
        server.settings.update(http_roster_url=app.url + "/contacts/%s", cors_allowed_origins=[app.url])
        server._write_config()
        return server.start(), app

    yield make
    for server, app in made:
        server.stop()
        app.stop()


def sign_in(app, user="alice", password="password") -> requests.Session:
    browser = requests.Session()
    reply = browser.post(app.url + "/login", data={"username": user, "password": password, "next": "/chat/"},
                         allow_redirects=False, timeout=10)
    assert reply.status_code == 303 and reply.headers["Location"] == "/chat/", (reply.status_code, reply.text)
    cookie = reply.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
    return browser


def plain_login(server, kind, user, password):
    client = BoshClient(server.bosh_url, wait=5) if kind == "bosh" else WsClient(server.ws_url)
    client.wait_features()
    reply = client.authenticate(user, password, "PLAIN")
    return client, "success" if reply.tag == q(NS_SASL, "success") else reply[0].tag.split("}")[1]


# -- the app's side: login, cookie, credentials ---------------------------------------------------


def test_signed_in_user_gets_a_token_the_server_accepts(sso, secret_file, transport):
    server, app = sso(lifetime=300)
    anonymous = requests.get(app.url + "/chat/credentials", timeout=10)
    assert anonymous.status_code == 401 and "not signed in" in anonymous.json()["error"]

    browser = sign_in(app)
    reply = browser.get(app.url + "/chat/credentials", timeout=10)
    assert reply.status_code == 200 and reply.headers["Cache-Control"] == "no-store"
    assert "Access-Control-Allow-Origin" not in reply.headers  # other origins cannot read it
    creds = reply.json()
    assert creds["jid"] == "alice@localhost"
    claims = jwt.decode(creds["password"], secret_file.read_bytes().removesuffix(b"\n"), algorithms=["HS256"])
    assert claims["jid"] == "alice@localhost" and claims["exp"] - claims["iat"] == 300 and claims["jti"]
    assert abs(claims["iat"] - time.time()) < 5
    assert browser.get(app.url + "/chat/credentials", timeout=10).json()["password"] != creds["password"]

    # The token logs in to the real server as alice: bind, roster from the app.
    client, outcome = plain_login(server, transport, "alice", creds["password"])
    try:
        assert outcome == "success"
        client.restart()
        client.wait_features()
        assert client.bind("sso") == "alice@localhost/sso"
        names = {item.get("jid"): item.get("name") for item in client.get_roster()[0]}
        assert names == {"bob@localhost": "Bob Builder", "carol@localhost": "Carol Singer", "dave@localhost": "Dave Digger"}
    finally:
        client.stop()
    # It is alice's token, not bob's.
    other, outcome = plain_login(server, transport, "bob", creds["password"])
    other.stop()
    assert outcome == "not-authorized"
    assert "minted a 300s chat token for alice@localhost" in app.log()
    assert creds["password"] not in app.log() and creds["password"][-30:] not in server.log()


def test_login_form_cookie_and_logout(sso):
    _server, app = sso()
    page = requests.get(app.url + "/chat/", allow_redirects=False, timeout=10)
    assert page.status_code == 303 and page.headers["Location"].endswith("/login?next=%2Fchat%2F")
    # The page's own parameters survive the detour through the login form.
    page = requests.get(app.url + "/chat/?transport=bosh", allow_redirects=False, timeout=10)
    assert page.headers["Location"].endswith("/login?next=%2Fchat%2F%3Ftransport%3Dbosh")
    form = requests.get(app.url + "/login?next=/chat/", timeout=10)
    assert form.status_code == 200 and 'name="password"' in form.text and "Not signed in" in form.text

    wrong = requests.post(app.url + "/login", data={"username": "alice", "password": "nope"}, allow_redirects=False,
                          timeout=10)
    assert wrong.status_code == 401 and "Wrong username or password" in wrong.text and "Set-Cookie" not in wrong.headers
    nobody = requests.post(app.url + "/login", data={"username": "mallory", "password": "password"},
                           allow_redirects=False, timeout=10)
    assert nobody.status_code == 401
    # Login CSRF: a form posted from another site is refused.
    forged = requests.post(app.url + "/login", data={"username": "alice", "password": "password"},
                           headers={"Origin": "http://evil.example"}, allow_redirects=False, timeout=10)
    assert forged.status_code == 403 and "Set-Cookie" not in forged.headers
    # An open redirect through ?next= is not possible.
    outside = requests.post(app.url + "/login", data={"username": "alice", "password": "password",
                                                      "next": "//evil.example/x"}, allow_redirects=False, timeout=10)
    assert outside.status_code == 303 and outside.headers["Location"] == "/chat/"

    browser = sign_in(app)
    assert "Signed in as <b>alice</b>" in browser.get(app.url + "/login", timeout=10).text
    # /chat/ fills in what the page needs: the server and a same-origin credentials URL.
    page = browser.get(app.url + "/chat/?transport=bosh", allow_redirects=False, timeout=10)
    assert page.status_code == 303
    location = page.headers["Location"]
    assert "credentials_url=credentials" in location and "transport=bosh" in location
    served = browser.get(location, timeout=10)
    assert served.status_code == 200 and "credentials_url" in served.text and "converse.initialize" in served.text
    # Static files of the page, not the rest of the checkout.
    assert browser.get(app.url + "/chat/..%2f..%2fconf%2fdemo-users.txt", timeout=10).status_code in (403, 404)

    logout = browser.post(app.url + "/logout", allow_redirects=False, timeout=10)
    assert logout.status_code == 303
    assert browser.get(app.url + "/chat/credentials", timeout=10).status_code == 401


def test_without_a_jwt_key_the_credentials_url_says_so(tmp_path):
    app = DemoApp(tmp_path, "--refresh-url", "")
    try:
        browser = sign_in(app)
        reply = browser.get(app.url + "/chat/credentials", timeout=10)
        assert reply.status_code == 503 and "--jwt-key" in reply.json()["error"]
    finally:
        app.stop()


# -- Converse.js in Chromium ------------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("transport", ["websocket", "bosh"])
def test_converse_single_sign_on_in_chromium(sso, secret_file, transport, tmp_path):
    require_node("playwright-core")
    chromium = chromium_path()
    require(chromium is not None, "chromium is not installed (apt-get install chromium)")
    require(os.path.isfile(os.path.join(STATIC, "vendor", "converse", "converse.min.js")),
            "static/vendor/converse/ is missing (run scripts/fetch_web_assets)")
    lifetime = 8  # seconds: the test waits for the first token to expire
    server, app = sso(lifetime=lifetime, jwt_leeway=0.0, bosh_max_wait=5)
    secret = secret_file.read_bytes().removesuffix(b"\n")
    dropped_at = {}

    def sessions(msg):
        reply = requests.get(server.base_url + "/api/users/alice/sessions", timeout=10)
        assert reply.status_code == 200, reply.text
        return {"sessions": reply.json()["sessions"]}

    def expired(msg):
        claims = jwt.decode(msg["token"], secret, algorithms=["HS256"])
        wait = claims["exp"] + 1.2 - time.time()
        assert wait < lifetime + 2, wait
        if wait > 0:
            time.sleep(wait)
        before = len(server.log())
        client, outcome = plain_login(server, "websocket", "alice", msg["token"])
        client.stop()
        reason = [line for line in server.log()[before:].splitlines() if "token login refused" in line]
        return {"refused": outcome == "not-authorized", "reason": reason[-1] if reason else None}

    def drop(msg):
        dropped_at["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        reply = requests.delete(server.base_url + "/api/users/alice/sessions",
                                json={"text": "the app ended this session"}, timeout=10)
        assert reply.status_code == 200, reply.text
        return {"ended": reply.json()["ended"], "at": dropped_at["at"]}

    steps = ("signed_out_goes_to_the_app_login", "sign_in_to_the_app_and_be_in_the_chat",
             "roster_without_a_chat_password", "token_expires", "dropped_then_reconnected_with_fresh_credentials")
    result = run_node_script(
        "sso_demo_e2e.js",
        ["--app", app.url, "--transport", transport, "--artifacts", artifacts_dir(), "--chromium", chromium],
        server=server, backend=None, timeout=170, stderr_path=str(tmp_path / "sso-stderr.log"),
        handlers={"sessions": sessions, "expired": expired, "drop": drop},
    )
    with open(os.path.join(artifacts_dir(), f"sso-{transport}-steps.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in result.lines)
    summary = "\n".join(json.dumps(result.results.get(s, {"scenario": s, "missing": True}), ensure_ascii=False)[:1500]
                        for s in steps)
    failed = [s for s in steps if not result.results.get(s, {}).get("ok")]
    assert not failed, (f"single sign-on over {transport}: failed steps {failed}\n{summary}\n--- node stderr ---\n"
                        f"{result.stderr_tail(40)}\n--- server log ---\n{''.join(server.log().splitlines(True)[-40:])}"
                        f"\n--- demo app log ---\n{app.log()[-3000:]}")
    assert "expired" in (result.results["token_expires"]["detail"]["reason"] or "")
    log = server.log()
    # Both logins were token logins over the transport asked for: the first token, a fresh one after the drop.
    assert log.count("token login for 'alice'") >= 2, log[-3000:]
    assert log.count(f"login alice from 127.0.0.1 ({transport})") >= 2, log[-3000:]
    assert app.log().count("minted a 8s chat token for alice@localhost") >= 2
